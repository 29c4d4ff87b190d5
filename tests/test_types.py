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


def _public_functions():
    """(qualified name, function) of everything the packages export: ``__all__`` of splatopt, fixedpos and
    splatopt.kernels, splatopt.ablate's public names, and the public methods of the exported classes."""
    import inspect

    import fixedpos
    import splatopt
    import splatopt.kernels

    exported = [(pkg.__name__, name, getattr(pkg, name)) for pkg in (splatopt, fixedpos, splatopt.kernels) for name in pkg.__all__]
    exported += [(splatopt.ablate.__name__, name, obj) for name, obj in vars(splatopt.ablate).items()
                 if not name.startswith("_") and getattr(obj, "__module__", None) == splatopt.ablate.__name__]
    for module, name, obj in exported:
        if inspect.isfunction(obj):
            yield f"{module}.{name}", obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else getattr(member, "fget", member)
                ours = inspect.isfunction(fn) and fn.__module__.partition(".")[0] in ("splatopt", "fixedpos")  # not Protocol's __init__
                if ours and (not attr.startswith("_") or attr in ("__init__", "__call__")):
                    yield f"{module}.{name}.{attr}", fn


def test_every_exported_function_annotates_its_parameters_and_return():
    """mypy checks only what is annotated: fit's init and density, render's length_or_positions, edit's device,
    SplatSet.to/select/load, the fixedpos functions' model and others were bare, so a user's type checker took
    any value there and mypy skipped the bodies of the functions that lacked every annotation."""
    import inspect

    missing = {}
    for qualname, fn in _public_functions():
        names = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")] + ["return"]
        bare = [p for p in names if p not in fn.__annotations__]
        if bare:
            missing[qualname] = bare
    assert not missing, f"unannotated parameters or returns: {missing}"
