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


def _documented_file_tensors() -> list[str]:
    """The tensor names of the README's fit-file table, as regular expressions (`<a, b>` alternatives, `<metric>` any)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Files: open formats", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            parts = re.split(r"(<[^>]+>)", name)
            patterns.append("".join(
                ("(" + "|".join(map(re.escape, (a.strip() for a in p[1:-1].split(",")))) + ")" if "," in p else r"\w+")
                if p.startswith("<") else re.escape(p) for p in parts))
    return patterns


def test_a_fit_file_reads_with_safetensors_and_json_alone_as_the_readme_documents_it(tmp_path):
    """The fit file's layout was documented nowhere (a third party had to read splatopt's source to learn
    that "meta" is a JSON string, that tensors carry an "extra." prefix, or how sigma and w are stored)."""
    import json
    import re

    import numpy as np
    from safetensors import safe_open

    import splatopt

    result = splatopt.fit(["Return the sum of a and b.", "Open a file."], n_splats=0.5, steps=2, device="cpu",
                          progress=False, record_every=1, dtype=__import__("torch").float64)
    with safe_open(str(result.save(tmp_path / "run.safetensors")), "np") as f:
        header, names = f.metadata(), set(f.keys())
        meta = json.loads(header["meta"])
        sigma, weight = np.exp(f.get_tensor("log_sigma")), 1 / (1 + np.exp(-f.get_tensor("weight_logit")))
        assert f.get_tensor("mu").dtype == np.float64 and f.get_tensor("mask").dtype == np.bool_
    patterns = _documented_file_tensors()
    undocumented = sorted(n for n in names if not any(re.fullmatch(p, n) for p in patterns))
    assert not undocumented, f"tensors in a fit file that README.md's table does not list: {undocumented}"
    always = [p for p in patterns if "\\w+" not in p and "(" not in p and p not in ("coefficients",)]
    assert all(any(re.fullmatch(p, n) for n in names) for p in always), sorted(set(always) - names)
    assert (header["format"], header["format_version"]) == ("splatopt.splats", "1")
    assert {"config", "texts", "decoded", "basis", "summary", "seconds", "encode_seconds", "versions", "model",
            "model_hash", "layer", "kernel", "mode", "truncate"} <= set(meta)
    np.testing.assert_allclose(sigma, result.splats.sigma.numpy()), np.testing.assert_allclose(weight, result.splats.weight.numpy())
    assert splatopt.fit_options(meta["config"])["dtype"] == result.splats.mu.dtype
