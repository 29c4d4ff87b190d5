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
    (["--device", "gpu0"], "--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
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


@pytest.mark.parametrize("sub", [[], ["x"]])
def test_bench_refuses_a_file_as_out_folder_before_timing(sub, tmp_path, no_timing, capsys):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    out = taken.joinpath(*sub)
    assert main(["bench", *TINY, "--paths", "eager", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"splatopt: error: --out {out} cannot be a folder")


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
