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


def test_readme_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The README's first Python block (fit, the result's fields, save, render) runs unchanged, and
    the shapes its comments promise hold: a stale name or signature in the README fails here."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n")[1].split("```")[0]
    assert "splatopt.fit(" in block and "result.save(" in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    result, field = scope["result"], scope["field"]
    B = len(result.input_texts)
    assert result.token_accuracy.shape == result.field_error.shape == result.cosine.shape == (B,)
    assert result.history["token_accuracy"].shape[1] == B
    assert result.trajectory["mu"].shape[1:] == result.splats.mu.shape  # [S, B, N]
    assert field.shape == (B, 40, scope["model"].dim)
    assert (tmp_path / "run.safetensors").is_file()


def test_both_commands_run_as_python_modules():
    """``python -m splatopt`` and ``python -m fixedpos`` are the console scripts (for a venv whose
    bin/ is not on PATH, and for ``torchrun -m``)."""
    import subprocess
    import sys

    for package in ("splatopt", "fixedpos"):
        out = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"usage: {package} ")


def test_every_public_class_and_function_has_its_own_docstring_and_fit_result_hints_allow_none():
    import inspect
    import typing

    import fixedpos
    import splatopt

    for package in (splatopt, fixedpos):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                # a class without one shows its base's (Protocol's "Base class for protocol classes")
                assert obj.__doc__ and obj.__doc__.strip(), f"{package.__name__}.{name} has no docstring of its own"
    hints = typing.get_type_hints(splatopt.FitResult)
    assert type(None) in typing.get_args(hints["splats"]), "a fixed-basis fit holds splats=None"
