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


# ---- the README's "Measured" numbers are typed by hand: they must stay the recorded results' ----------------

def _build():
    """papers/build.py, which computes the report's numbers from figures/data/ (and puts figures/ on sys.path)."""
    import importlib.util
    import sys

    if "papers_build" in sys.modules:
        return sys.modules["papers_build"]
    spec = importlib.util.spec_from_file_location("papers_build", ROOT / "papers" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["papers_build"] = module
    spec.loader.exec_module(module)
    return module


def _md_table(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header line starts with ``header_start``, cells
    stripped of bold marks and spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        line = line.strip()
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip("|").split("|")])
    return rows


def test_readme_decoder_head_table_is_the_shipped_heads_metadata():
    """README's round-trip table (typed by hand) holds the accuracies stored in the shipped heads, as the report's does."""
    readme = (ROOT / "README.md").read_text()
    values = _build().roundtrip_values()
    assert _md_table(readme, "| layer | stdlib validation") == _md_table(values["roundtrip_table"], "| layer |")
    assert f"512 prompts of at most {values['prompt_max_tokens']} tokens per corpus" in readme
    assert values["roundtrip_prompts"] == "512"
    assert f"plus {values['head_random_sequences']} random wordpiece" in readme.replace("\n", " ")
    assert f"{values['head_steps']} Adam steps of {values['head_batch_tokens']} tokens" in readme


def test_readme_fit_table_and_selection_numbers_are_core_acceptance_and_core_selection():
    readme = (ROOT / "README.md").read_text()
    flat = " ".join(readme.split())
    values = _build().fit_values()
    assert _md_table(readme, "| corpus | N = L/2 | N = L/4 | N = L/8 |") == _md_table(values["fit_table"], "| corpus |")
    assert f"{values['fit_prompts']} prompts per corpus, at most 64 tokens, {values['fit_steps']} steps" in readme
    assert f"selected on {values['select_prompts']} *validation* prompts among {values['select_variants']} variants" in flat
    assert f"N = L/4 gave {values['select_prev_test_quarter']} (test)" in flat
    assert f"({values['select_others_range']}, against {values['select_prev_acc']} for the previous default)" in flat
    assert f"token-anchored init is clearly worse ({values['select_tokens_init_acc']})" in flat
    sel = _build().figure_io.load_json("core_selection.json")
    lic = next(r for r in sel["rows"] if r["corpus"] == "licenses" and r["variant"] == "default" and r["n_splats"] == 0.25)
    assert f"{100 * lic['token_accuracy']:.2f} % (licences)" in flat


def test_stdlib_passage_count_in_readme_and_report_is_the_shipped_snapshots():
    """README and the report's template type the snapshot's passage count: it is the count of the shipped file."""
    from fixedpos.corpus import STDLIB_SNAPSHOT, stdlib_passages

    count = f"{len(stdlib_passages()):,}"
    version = STDLIB_SNAPSHOT.name.removeprefix("stdlib-py").removesuffix(".txt.gz")
    readme = " ".join((ROOT / "README.md").read_text().split())
    template = " ".join((ROOT / "papers" / "report.template.md").read_text().split())
    assert f"{version}'s standard library: {count} passages in `fixedpos/corpora/{STDLIB_SNAPSHOT.name}`" in readme
    assert f"Python {version}'s docstrings ({count} passages)" in template


def test_readme_rate_distortion_tables_are_the_reports():
    """Every cell of README's two rate-distortion tables is the report's mean for that method, budget and corpus."""
    readme = (ROOT / "README.md").read_text()
    report_rows = _md_table(_build().density_values()["rd_table"], "| corpus | method |")
    budgets = {"1/16": 2, "1/8": 3, "1/4": 4, "1/2": 5}  # the report's columns N = L/16 ... L/2
    mean = {(r[0].split(" (")[0], r[1], b): r[col].split(" ±")[0] for r in report_rows for b, col in budgets.items()}
    test, lic = "stdlib test", "licences"
    main = ["mobile splats", "splats + adaptive density", "splats + budget relocation", "fixed-grid Gaussians", "DCT",
            "segments (mean-pooling)"]
    rows = _md_table(readme, "| N/L | splats | + adaptive")
    assert [r[0] for r in rows] == list(budgets)
    for r in rows:
        assert r[1:7] == [mean[test, m, r[0]] for m in main], r
        assert r[7].split(" / ") == [mean[lic, m, r[0]] for m in ("mobile splats", "fixed-grid Gaussians", "DCT")], r
    learned = ["splats, learned init (solved v)", "splats, solved v", "fixed grid, solved v", "DCT, solved v"]
    rows = _md_table(readme, "| N/L | splats, learned init")
    assert [r[0] for r in rows] == ["1/16", "1/8", "1/4"]
    for r in rows:
        assert [r[1].split(" (")[0], *r[2:5]] == [mean[test, m, r[0]] for m in learned], r
        assert r[5].split(" / ")[0] == mean[lic, learned[0], r[0]], r


def test_readme_inner_step_speed_numbers_are_the_bench_files():
    """README's eager/compiled step times, speed-ups, peak memory and fused-step figures are the recorded bench JSON's."""
    import json

    bench = ROOT / "figures" / "data" / "bench"
    mse = json.loads((bench / "step-cuda-mse-B4096-L64-N16-d384.json").read_text())["results"]
    ce = json.loads((bench / "step-cuda-mse_ce-B512-L64-N16-d384-compile.json").read_text())["results"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    eager, compiled, fused = mse["eager"], mse["compile"], mse["fused"]
    assert (f"| MSE | {eager['step_ms']:.2f} ms | {compiled['step_ms']:.2f} ms | "
            f"{eager['step_ms'] / compiled['step_ms']:.2f}× |") in readme
    assert (f"| MSE + CE (logits materialized) | {ce['eager']['step_ms']:.1f} ms | {ce['compile']['step_ms']:.1f} ms | "
            f"{ce['eager']['step_ms'] / ce['compile']['step_ms']:.2f}× |") in readme
    assert (f"Peak memory: {eager['peak_memory_gb']:.1f} GB eager and {compiled['peak_memory_gb']:.1f} GB compiled for MSE, "
            f"{ce['eager']['peak_memory_gb']:.1f} GB and {ce['compile']['peak_memory_gb']:.1f} GB for MSE + CE") in readme
    assert (f"{fused['step_ms']:.2f} ms per step against {eager['step_ms']:.2f} ms eager, ×{eager['step_ms'] / fused['step_ms']:.1f}, "
            f"at {100 * fused['hbm_roofline_fraction']:.1f} % of the HBM roofline") in readme


def test_readme_fixed_basis_comparison_sentences_are_the_reports_numbers():
    """README's prose on the learned start against fixed bases (small-budget selection, 60 steps, field cosine) quotes
    the values papers/build.py computes from the same studies."""
    b = _build()
    d, sb, s60 = b.density_values(), b.small_budget_values(), b.steps60_values()
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"| 1/8 | **{d['rd_test_L8_splats_learned'].removesuffix(' %')}** ({d['rd_test_L8_learned_margin']} over the DCT) |" in readme
    assert (f"{sb['sb_test_L8_margin']} points at L/8 on test ({sb['sb_test_L8_splats'].removesuffix(' %')} ± {sb['sb_test_L8_splats_ci']} "
            f"vs {sb['sb_test_L8_fixed'].removesuffix(' %')} ± {sb['sb_test_L8_fixed_ci']} %") in readme
    assert f"{sb['sb_licenses_L8_margin']} on the licences; at L/16 the margins shrink to {sb['sb_test_L16_margin']} and {sb['sb_licenses_L16_margin']}" in readme
    assert (f"the best of {s60['s60_test_n_fixed']} fixed-basis configurations by {s60['s60_test_L8_margin'].lstrip('+')} points at L/8 on test "
            f"({s60['s60_test_L8_learned'].removesuffix(' %')} vs {s60['s60_test_L8_fixed']}), {s60['s60_licenses_L8_margin'].lstrip('+')} "
            f"on the licences, but at L/4 by only {s60['s60_test_L4_margin'].lstrip('+')} and {s60['s60_licenses_L4_margin'].lstrip('+')}") in readme
    assert (f"field cosine: {d['rd_test_L8_splats_cos']} at L/8 against {d['rd_test_L8_fixed_grid_cos']} (fixed grid) and "
            f"{d['rd_test_L8_dct_cos']} (DCT)") in readme
