"""Benchmark of one inner step (render + objective + backward + Adam) on synthetic targets.

Reports prompt-steps per second for the eager path and the ``torch.compile`` path measured in the
same run, so their ratio is meaningful; results are saved as JSON with the device named.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .init import GridInit
from .objectives import Objective, objective_terms
from .optim import InnerOptimizer, adam_init, adam_step
from .render import render


@dataclass
class BenchConfig:
    batch: int = 4096
    length: int = 64
    splats: int = 16
    dim: int = 384
    objective: str = "mse"
    kernel: str = "gaussian"
    dtype: str = "float32"
    warmup: int = 5
    iters: int = 20


def _timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_bench(cfg: BenchConfig, device: str | torch.device | None = None, paths: tuple[str, ...] = ("eager", "compile"), model=None) -> dict:
    """Time one inner step for ``cfg`` on ``device`` for each path; returns a JSON-able dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype)
    objective = Objective.parse(cfg.objective)
    decode = None
    if objective.needs_decoder:
        if model is None:
            import fixedpos

            model = fixedpos.load()
        if cfg.dim != model.dim:
            raise ValueError(f"a cross-entropy benchmark needs dim = the model's d = {model.dim}, not {cfg.dim}")
        decode = model.decode
    gen = torch.Generator(device="cpu").manual_seed(0)
    target = torch.randn(cfg.batch, cfg.length, cfg.dim, generator=gen).to(device, dtype)
    mask = torch.ones(cfg.batch, cfg.length, dtype=torch.bool, device=device)
    ids = torch.randint(1000, 30000, (cfg.batch, cfg.length), generator=gen).to(device) if decode else None
    counts = torch.full((cfg.batch,), cfg.splats, device=device)
    splats = GridInit()(target, mask, counts)
    opt = InnerOptimizer()
    v_scale = torch.ones(cfg.batch, 1, 1, device=device, dtype=dtype)

    def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        field = render(splats.with_params(params), cfg.length, cfg.kernel)
        return objective_terms(objective, field, target, mask, ids, decode)[0].sum()

    results = {}
    for path in paths:
        fn = torch.compile(loss_fn) if path == "compile" else loss_fn
        params = {k: t.detach().clone() for k, t in splats.params().items()}
        state = adam_init(params)
        holder = {"params": params, "state": state}

        def step():
            live = {k: t.detach().requires_grad_(True) for k, t in holder["params"].items()}
            grads = torch.autograd.grad(fn(live), list(live.values()))
            holder["params"], holder["state"], _ = adam_step(holder["params"], dict(zip(live, grads)), holder["state"], opt.learning_rates(1, 2, v_scale), opt)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _timed(step, cfg.warmup, cfg.iters, device)
        results[path] = {
            "step_ms": seconds * 1e3,
            "prompt_steps_per_s": cfg.batch / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        }
    out = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "results": results,
        "target_bytes": target.numel() * target.element_size(),
    }
    if "eager" in results:
        for path, r in results.items():
            r["speedup_vs_eager"] = results["eager"]["step_ms"] / r["step_ms"]
    return out


def save_bench(result: dict, out_dir: str | Path = "figures/data/bench", name: str | None = None) -> Path:
    cfg = result["config"]
    name = name or f"step-{result['device_type']}-{cfg['objective'].replace('+', '_')}-B{cfg['batch']}-L{cfg['length']}-N{cfg['splats']}-d{cfg['dim']}"
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path
