"""The annotations users' type checkers read (both packages ship py.typed) check clean under mypy."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_packages_ship_a_py_typed_marker():
    for package in ("splatopt", "fixedpos"):
        assert (ROOT / package / "py.typed").is_file(), f"{package}/py.typed is missing: type checkers would skip it"


def test_splatopt_and_fixedpos_type_check_clean_under_mypy(tmp_path):
    """mypy with the project's [tool.mypy] settings (pyproject.toml), a fresh cache so no stale result passes."""
    mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the dev extra: pip install -e '.[dev]'")
    stdout, stderr, status = mypy_api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path),
                                           str(ROOT / "splatopt"), str(ROOT / "fixedpos")])
    assert status == 0, f"mypy found type errors:\n{stdout}{stderr}"
