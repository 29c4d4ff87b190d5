"""The README's set-up commands stay true: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    readme = (ROOT / "README.md").read_text()
    assert ci_command[0] in readme, "README's test command and .ci/run differ"


def test_readme_main_command_runs_the_demo(tmp_path, monkeypatch, capsys):
    """The README's first command ends in ``splatopt demo``: run it (few steps) as a user would, in
    an empty folder, and check it writes the fit and the trajectory plot it promises."""
    readme = (ROOT / "README.md").read_text()
    assert readme.split("```")[1].strip().endswith("splatopt demo")
    from splatopt.cli import main
    from splatopt.fit import FitResult

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "5", "--device", "cpu", "--quiet"]) == 0
    assert "decoded:" in capsys.readouterr().out
    assert (tmp_path / "splatopt-demo.png").stat().st_size > 10_000
    result = FitResult.load(tmp_path / "splatopt-demo.safetensors")
    assert int(result.splats.mask.sum()) == 8  # "fits 8 splats to a 30-token sample text"
