"""``splatopt bench``: bad sizes, dtypes and output folders are refused before any timing."""

from __future__ import annotations

import json

import pytest

from splatopt import bench
from splatopt.cli import main

TINY = ["--batch", "2", "--length", "8", "--splats", "2", "--dim", "8", "--warmup", "0", "--iters", "1", "--device", "cpu"]
TINY_LONG = ["--long", "--batch", "1", "--length", "16", "--splats", "4", "--dim", "8", "--warmup", "0", "--iters", "1",
             "--device", "cpu"]


@pytest.fixture
def no_timing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("timed before the input was checked")

    monkeypatch.setattr(bench, "_timed", refuse)


@pytest.mark.parametrize("bad, message", [
    (["--splats", "0"], "splats=0 must lie in 1..length=8"),
    (["--splats", "-2"], "splats=-2 must lie in 1..length=8"),
    (["--splats", "20"], "splats=20 must lie in 1..length=8"),
    (["--dim", "0"], "dim=0 must be >= 1"),
    (["--batch", "0"], "batch=0 must be >= 1"),
    (["--length", "0"], "length=0 must be >= 1"),
    (["--iters", "0"], "iters=0 must be >= 1"),
    (["--warmup", "-1"], "warmup=-1 must be >= 0"),
    (["--dtype", "bogus"], "dtype='bogus': choose one of float32, float64, bfloat16, float16"),
    (["--dtype", "float16"], "dtype='float16': the step bench starts from the grid initializer"),
    (["--dtype", "bfloat16"], "dtype='bfloat16': the step bench starts from the grid initializer"),
    (["--peak-gbs", "-1"], "peak_gbs=-1.0: the device's peak must be a finite number > 0"),
    (["--peak-tflops", "0"], "peak_tflops=0.0: the device's peak must be a finite number > 0"),
    (["--peak-gbs", "nan"], "peak_gbs=nan: the device's peak must be a finite number > 0"),
    (["--device", "gpu0"], "--device gpu0 is not a device; give auto, cpu, cuda or cuda:N"),
])
def test_bench_refuses_bad_sizes_and_dtypes_before_timing(bad, message, tmp_path, no_timing, capsys):
    assert main(["bench", *TINY, "--paths", "eager", *bad, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"splatopt: error: {message}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad, message", [
    (["--iters", "0"], "iters=0 must be >= 1"),
    (["--dim", "0"], "dim=0 must be >= 1"),
    (["--batch", "0"], "batch=0 must be >= 1"),
    (["--dtype", "bogus"], "dtype='bogus': choose one of"),
])
def test_long_bench_refuses_bad_sizes_and_dtypes_before_timing(bad, message, tmp_path, no_timing, capsys):
    assert main(["bench", *TINY_LONG, *bad, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"splatopt: error: {message}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad, message", [
    (["--splats-fraction", "2"], "splats_fraction=2.0 (--splats-fraction) is the number of splats as a fraction"),
    (["--splats-fraction", "0"], "splats_fraction=0.0 (--splats-fraction) is the number of splats as a fraction"),
    (["--splats-fraction", "nan"], "splats_fraction=nan (--splats-fraction)"),
    (["--length", "4"], "max_tokens=4 (--length) must be an int >= 8"),
    (["--steps", "10", "-1"], "steps=-1 must be an int >= 0"),
    (["--warmup", "-1"], "warmup_steps=-1 must be an int >= 0"),
    (["--batch-size", "0"], "batch_size=0: give the prompts per chunk"),
    (["--prompts", "0"], "prompts=0 must be an int >= 1"),
    (["--objective", "bogus"], "bogus"),
    (["--corpus", "stdlib:bogus"], "bogus"),
])
def test_e2e_bench_refuses_bad_sizes_before_sampling_prompts(bad, message, tmp_path, monkeypatch, capsys):
    """--splats-fraction 2 (and the others) used to be refused by fit, only after the prompts were
    sampled and encoded (about 4 s at the defaults, minutes at 10k prompts on a CPU)."""
    import fixedpos

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model or sampled prompts before the input was checked")

    monkeypatch.setattr(fixedpos, "load", refuse)
    monkeypatch.setattr(fixedpos, "sample_prompts", refuse)
    assert main(["bench", "--e2e", "--device", "cpu", *bad, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splatopt: error: ") and message in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("field, value", [("target_accuracy", 1.5), ("target_accuracy", float("nan")),
                                          ("target_seconds", 0), ("target_seconds", "60"), ("splats_fraction", 2)])
def test_e2e_bench_config_refuses_targets_it_cannot_judge_before_sampling_prompts(field, value, monkeypatch):
    """A target accuracy of 1.5 or a time limit of 0 s made every run 'miss its target' after minutes of
    fitting; an int splats_fraction of 2 was offered fit's advice to 'use an int for a count'."""
    import fixedpos

    monkeypatch.setattr(fixedpos, "sample_prompts", lambda *a, **k: pytest.fail("sampled before checking the config"))
    with pytest.raises(ValueError, match=f"e2e bench: {field}="):
        bench.run_e2e_bench(bench.E2EBenchConfig(prompts=2, **{field: value}), "cpu", model=object())


def test_e2e_bench_refuses_a_bad_init_before_sampling_prompts(model, monkeypatch):
    """--init bogus was refused by fit, only after the prompts were sampled and encoded."""
    import fixedpos

    monkeypatch.setattr(fixedpos, "sample_prompts", lambda *a, **k: pytest.fail("sampled before checking init"))
    with pytest.raises(ValueError, match="init='bogus': choose one of"):
        bench.run_e2e_bench(bench.E2EBenchConfig(prompts=2, init="bogus"), "cpu", model=model)


@pytest.mark.parametrize("sub", [[], ["x"]])
def test_bench_refuses_a_file_as_out_folder_before_timing(sub, tmp_path, no_timing, capsys):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    out = taken.joinpath(*sub)
    assert main(["bench", *TINY, "--paths", "eager", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"splatopt: error: --out {out}: ") and ("is a file; give a folder" in err or "is a file, not a folder" in err)


def test_bench_writes_json_for_valid_tiny_sizes(tmp_path, capsys):
    assert main(["bench", *TINY, "--paths", "eager", "--out", str(tmp_path / "new")]) == 0
    (path,) = (tmp_path / "new").iterdir()
    result = json.loads(path.read_text())
    assert result["config"]["splats"] == 2 and "eager" in result["results"]


def test_saved_bench_json_is_strict_json_with_a_diverged_time_as_null(tmp_path):
    # Python's json writes NaN / Infinity, which jq, R and browsers refuse; a diverged or unmeasured
    # figure must read back as null instead
    result = {"config": {"objective": "mse", "batch": 2, "length": 8, "splats": 2, "dim": 4}, "device_type": "cpu",
              "results": {"eager": {"ms": float("nan"), "speedup": float("inf"), "samples": [1.0, float("-inf")]}}}
    path = bench.save_bench(result, tmp_path)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back["results"]["eager"] == {"ms": None, "speedup": None, "samples": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written through a temporary file, none left over


@pytest.mark.parametrize("kind", [TINY + ["--paths", "eager"], TINY_LONG])  # eager only: compiling costs seconds
def test_bench_names_each_path_it_times_on_stderr_unless_quiet(kind, tmp_path, capsys):
    """bench --long ran 47 s on a CPU with no sign of life; both benches now show the path being timed."""
    assert main(["bench", *kind, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "bench" in err and ("local" in err if kind is TINY_LONG else "eager" in err)
    assert main(["bench", *kind, "--quiet", "--out", str(tmp_path)]) == 0
    assert "path" not in capsys.readouterr().err


def test_a_bench_of_another_configuration_does_not_overwrite_one_with_the_same_name(tmp_path, capsys):
    """The step bench's name leaves out dtype and kernel: a float64 erf run replaced the float32 one."""
    common = ["bench", *TINY, "--paths", "eager", "--out", str(tmp_path)]
    assert main(common) == 0
    assert main(common) == 0  # the same measurement again: replaced
    assert len(list(tmp_path.iterdir())) == 1
    assert main([*common, "--dtype", "float64", "--kernel", "erf"]) == 0
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and {json.loads(f.read_text())["config"]["dtype"] for f in files} == {"float32", "float64"}


@pytest.mark.parametrize("kind, other, flag", [
    (["--e2e", "--device", "cpu"], ["--batch", "2048"], "--batch"),
    (["--e2e", "--device", "cpu"], ["--kernel", "erf"], "--kernel"),
    (TINY_LONG, ["--fused"], "--fused"),
    (TINY_LONG, ["--peak-gbs", "3000"], "--peak-gbs"),
    (TINY + ["--paths", "eager"], ["--prompts", "5"], "--prompts"),
    (TINY + ["--paths", "eager"], ["--mode", "normalized"], "--mode"),
])
def test_bench_refuses_an_option_the_chosen_bench_does_not_read(kind, other, flag, tmp_path, no_timing, monkeypatch, capsys):
    """`--e2e --batch 2048` timed fit's own chunking and said nothing; each bench now names what it ignored."""
    import fixedpos

    monkeypatch.setattr(fixedpos, "sample_prompts", lambda *a, **k: pytest.fail("sampled before checking the options"))
    assert main(["bench", *kind, *other, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splatopt: error: ") and f"does not read {flag}: drop it" in err
    assert not list(tmp_path.iterdir())
