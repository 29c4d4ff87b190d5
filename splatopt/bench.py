"""Benchmark of one inner step (render + objective + backward + Adam) on synthetic targets.

Reports prompt-steps per second for the eager path, the ``torch.compile`` path, the fused Triton
field loss (``"fused"``, :mod:`splatopt.kernels`) and, for an objective with a cross-entropy term,
the projection + cross-entropy without materialized logits (``"fused_ce"``:
:func:`splatopt.kernels.linear_cross_entropy` with its default implementation, on CUDA the one-sweep
Triton kernel with bf16 products; ``"chunked_ce"``: the same function's row-chunk implementation,
for comparison) measured in the same run, so their ratios are meaningful; results are saved
as JSON with the device named. "eager" and "compile" materialize the float32 logits [B·L, V]. Each
path's Adam step is the same eager ``adam_step``, except "fused" with a relative MSE alone, which
is fit's fused step (:class:`splatopt.kernels.FusedAdamLoop`: loss, backward and Adam in two
kernels, launched every step). ``"graph"`` is the step ``fit`` takes on CUDA, pairs of steps replayed
as one CUDA graph: that fused loop for a relative MSE alone, else :class:`splatopt.graphs.AdamLoop`
over the fused field loss (cosine terms) or the ``"fused_ce"`` objective (a cross-entropy term); its
ratio to "fused" / "fused_ce" is the launch overhead that capture saves. ``loss_backward_ms`` times the render + loss + backward part alone (for "fused", the
fused loss kernel and its backward).

The roofline: a step must at least read the target once and read and write the splat parameters
and Adam's two moments, ``target + 6 x params`` bytes; ``hbm_roofline_fraction`` is that over the
step time, over the device's peak memory bandwidth (``PEAK_GBS`` by device name, or ``peak_gbs``).

With a cross-entropy term the step is compute-bound instead, dominated by the vocabulary
projection. ``projection_flops = 4 B L d V``: the logits ``[B·L, d] x [d, V]`` (2 B L d V, multiply
and add) plus the gradient wrt the decoder's features ``[B·L, V] x [V, d]`` (2 B L d V); no
gradient wrt the frozen embeddings is needed, and the head's small d x d layers, the softmax and
the render are not counted. ``tensor_core_fraction`` is ``projection_flops`` over the step time,
over the device's peak dense bf16 tensor-core rate (``PEAK_BF16_FLOPS`` by device name, or
``peak_tflops``): the share of the step the hardware would need for the projection alone.

Long documents (``run_long_bench``, ``splatopt bench --long``): one inner step on an L = 10,000
field with N = L/4 splats, rendered densely (``render`` with truncation: coefficients [B, L, N]) and
locally (``render_local``: tiles, O(L·k·d)), the same field both ways; peak GPU memory per path, and
an out-of-memory dense path recorded as such rather than crashing the run.

End to end (``run_e2e_bench``, ``splatopt bench --e2e``): issue 7's acceptance measure, P real
test-split prompts (L <= 64) encoded once, then fitted with ``splatopt.fit`` at N = L/2 for each of
several step budgets; wall seconds per fit, token accuracy reached, and whether the fit met the
target (>= 99 % pooled token accuracy in <= 60 s).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import platform
import re
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from fixedpos.cache import atomic_write_bytes, strict_json

from .graphs import AdamLoop
from .init import GridInit, TokenInit, resolve_initializer
from .objectives import Objective, objective_terms
from .optim import InnerOptimizer, adam_init, adam_step
from .render import render
from .render_local import DEFAULT_TILE, DEFAULT_TRUNCATE, plan_tiles, render_local

if TYPE_CHECKING:
    from .kernels import FusedAdamLoop


# peak HBM bandwidth, GB/s, by a substring of torch.cuda.get_device_name (first match wins)
PEAK_GBS = (
    ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("GH200", 4000.0), ("H200", 4800.0),
    ("A100-PCIE-40GB", 1555.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-40GB", 1555.0), ("A100", 2039.0),
    ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0), ("RTX 4090", 1008.0),
)


# peak dense (no sparsity) bf16 tensor-core FLOP/s with float32 accumulation, same matching
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12), ("H100", 989.4e12),  # SXM
    ("GH200", 989.4e12), ("H200", 989.4e12),
    ("A100", 312e12), ("L40S", 362.05e12), ("L4", 121e12),
)


DTYPES = ("float32", "float64", "bfloat16", "float16")


def _check_sizes(cfg) -> torch.dtype:
    """Refuse sizes and dtypes a step cannot take, before any work (some would be timed as if valid); the dtype."""
    for name in ("batch", "length", "dim", "iters"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.warmup < 0:
        raise ValueError(f"warmup={cfg.warmup} must be >= 0")
    if not 1 <= cfg.splats <= cfg.length:
        raise ValueError(f"splats={cfg.splats} must lie in 1..length={cfg.length}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, cfg.dtype)


def device_label(device: torch.device | str) -> str:
    """What a result records as its device: the CUDA device's name, else the CPU's model (Linux's
    /proc/cpuinfo, else ``platform.processor()``, else "cpu") and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:  # platform.processor() is empty on most Linux machines
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name or 'cpu'}, {torch.get_num_threads()} threads"


def _by_device_name(table: tuple[tuple[str, float], ...], device_name: str) -> float | None:
    """The value of the first (name part, value) row of ``table`` whose part is in ``device_name`` (any case); None if none."""
    return next((value for key, value in table if key.lower() in device_name.lower()), None)


def device_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 tensor-core FLOP/s of a device named like ``torch.cuda.get_device_name``; None if unknown."""
    return _by_device_name(PEAK_BF16_FLOPS, device_name)


def device_peak_gbs(device_name: str) -> float | None:
    """Peak memory bandwidth (GB/s) of a device named like ``torch.cuda.get_device_name``; None if unknown."""
    return _by_device_name(PEAK_GBS, device_name)


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
    fused_precision: str | None = None  # tl.dot precision of the fused path ("ieee", "tf32x3", "tf32"; None: the kernel's default)


def _timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls.

    CUDA: ``iters`` calls back to back between two events, as an inner loop runs them (the host
    enqueues the next step while the device works on this one), the median of 3 such runs. CPU:
    the median single call.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3 / iters)
        return sorted(times)[1]
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_bench(cfg: BenchConfig, device: str | torch.device | None = None, paths: tuple[str, ...] = ("eager", "compile"), model=None,
              peak_gbs: float | None = None, peak_tflops: float | None = None, progress: bool = False) -> dict:
    """Time one inner step for ``cfg`` on ``device`` per path ("eager", "compile", "fused", "graph", "fused_ce", "chunked_ce"); a JSON-able dict.

    model: the field model whose decoder a cross-entropy objective uses (default: the embedded one).
    peak_gbs: the device's peak memory bandwidth for the roofline fraction (default: ``PEAK_GBS``).
    peak_tflops: its peak dense bf16 TFLOP/s for ``tensor_core_fraction`` (default: ``PEAK_BF16_FLOPS``).
    progress: a bar on stderr naming the path being timed.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, peak in (("peak_gbs", peak_gbs), ("peak_tflops", peak_tflops)):
        if peak is not None and not (isinstance(peak, (int, float)) and math.isfinite(peak) and peak > 0):
            raise ValueError(f"{name}={peak!r}: the device's peak must be a finite number > 0 (or leave it out to look it up by the device name)")
    unknown = set(paths) - {"eager", "compile", "fused", "graph", "fused_ce", "chunked_ce"}
    if unknown:
        raise ValueError(f"bench paths {sorted(unknown)}: choose among eager, compile, fused, graph, fused_ce, chunked_ce")
    dtype = _check_sizes(cfg)
    if dtype in (torch.float16, torch.bfloat16):  # the long bench (no solve) takes them
        raise ValueError(f"dtype={cfg.dtype!r}: the step bench starts from the grid initializer, whose linear solve has no "
                         f"{cfg.dtype} kernel on the CPU or on CUDA: use float32 or float64")
    objective = Objective.parse(cfg.objective)
    for p in ("fused_ce", "chunked_ce"):
        if p in paths and not objective.ce:
            raise ValueError(f"bench path {p!r} times the cross-entropy term; objective {cfg.objective!r} has none (try mse+ce)")
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

    def loss_fn(params: dict[str, torch.Tensor], fused_ce: bool = False, ce_impl: str | None = None) -> torch.Tensor:
        field = render(splats.with_params(params), cfg.length, cfg.kernel)
        return objective_terms(objective, field, target, mask, ids, decode, fused_ce, ce_impl)[0].sum()

    # "graph" takes fit's CUDA step: the fused field loss without a cross-entropy term, else fused_ce
    fused_field = "fused" in paths or ("graph" in paths and not objective.ce)
    if fused_field:
        from .kernels import FusedAdamLoop, field_loss, mse_coefficients, unavailable_reason

        reason = unavailable_reason(device, cfg.kernel, "additive", None, objective)
        if reason is not None:
            raise ValueError(f"bench path {'fused' if 'fused' in paths else 'graph'}: {reason}")

        def fused_loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return field_loss(splats.with_params(params), target, mask, objective, fused=True,
                              kernel=cfg.kernel, precision=cfg.fused_precision or "ieee")[0].sum()

        # as in fit: a relative MSE alone takes the whole step fused (loss, backward, Adam)
        fused_step = not objective.cosine
        coef = mse_coefficients(target, mask, objective) if fused_step else None
    else:
        fused_step = False

    results: dict[str, dict[str, Any]] = {}  # path -> its JSON record
    for path in _paths_progress(paths, "step bench", progress):
        fn: Callable[..., torch.Tensor]
        if path == "compile":
            fn = torch.compile(loss_fn)
        elif path == "fused" or (path == "graph" and fused_field):
            fn = fused_loss_fn
        elif path == "chunked_ce":
            fn = partial(loss_fn, fused_ce=True, ce_impl="chunked")
        else:
            fn = partial(loss_fn, fused_ce=path in ("fused_ce", "graph"))
        params = {k: t.detach().clone() for k, t in splats.params().items()}
        state = adam_init(params)
        holder = {"params": params, "state": state}
        per_call = 2 if path == "graph" else 1  # a graph replays two steps (the loops' unroll)
        total = per_call * (cfg.warmup + 3 * cfg.iters)
        loop: FusedAdamLoop | AdamLoop | None = None
        if path in ("fused", "graph") and fused_step:
            assert coef is not None  # computed above whenever fused_step
            loop = FusedAdamLoop(params, state, splats.mask, target, mask, coef, opt, total, v_scale,
                                 cuda_graphs=path == "graph",
                                 config={"precision": cfg.fused_precision} if cfg.fused_precision else None)
        elif path == "graph":
            def gradients(p: dict[str, torch.Tensor], fn=fn) -> dict[str, torch.Tensor]:
                live = {k: t.detach().requires_grad_(True) for k, t in p.items()}
                return dict(zip(live, torch.autograd.grad(fn(live), list(live.values()))))

            loop = AdamLoop(gradients, params, state, opt, total, v_scale, cuda_graphs=True)

        def step():
            if loop is not None:
                loop.run(loop.step + per_call)
                holder["params"] = loop.params
                return
            live = {k: t.detach().requires_grad_(True) for k, t in holder["params"].items()}
            grads = torch.autograd.grad(fn(live), list(live.values()))
            holder["params"], holder["state"], _ = adam_step(holder["params"], dict(zip(live, grads)), holder["state"], opt.learning_rates(1, 2, v_scale), opt)

        def loss_backward():
            live = {k: t.detach().requires_grad_(True) for k, t in holder["params"].items()}
            torch.autograd.grad(fn(live), list(live.values()))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _timed(step, cfg.warmup, cfg.iters, device) / per_call
        results[path] = {
            "step_ms": seconds * 1e3,
            "prompt_steps_per_s": cfg.batch / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "loss_backward_ms": _timed(loss_backward, cfg.warmup, cfg.iters, device) * 1e3,
        }
    device_name = device_label(device)
    target_bytes = target.numel() * target.element_size()
    param_bytes = sum(t.numel() * t.element_size() for t in splats.params().values())
    roofline_bytes = target_bytes + 6 * param_bytes  # target read; params and both moments read + written
    peak = peak_gbs if peak_gbs is not None else (device_peak_gbs(device_name) if device.type == "cuda" else None)
    peak_flops = peak_tflops * 1e12 if peak_tflops is not None else (device_peak_flops(device_name) if device.type == "cuda" else None)
    projection_flops = 4 * cfg.batch * cfg.length * cfg.dim * model.vocab_size if decode is not None else None
    out = {
        "config": asdict(cfg),
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "results": results,
        "target_bytes": target_bytes,
        "param_bytes": param_bytes,
        "roofline_bytes": roofline_bytes,
        "peak_gbs": peak,
        "roofline_ms": roofline_bytes / (peak * 1e9) * 1e3 if peak else None,
        "projection_flops": projection_flops,
        "peak_bf16_flops": peak_flops,
    }
    if fused_step:
        from .kernels.step import step_config

        out["fused_step_config"] = {**step_config(cfg.length, cfg.splats, cfg.dim),
                                    **({"precision": cfg.fused_precision} if cfg.fused_precision else {})}
    for path, r in results.items():
        r["hbm_roofline_fraction"] = roofline_bytes / (r["step_ms"] / 1e3) / (peak * 1e9) if peak else None
        if projection_flops is not None:
            r["tensor_core_fraction"] = projection_flops / (r["step_ms"] / 1e3) / peak_flops if peak_flops else None
        if "eager" in results:
            r["speedup_vs_eager"] = results["eager"]["step_ms"] / r["step_ms"]
    return out


@dataclass
class LongBenchConfig:
    batch: int = 1
    length: int = 10_000
    splats: int = 2_500
    dim: int = 384
    objective: str = "mse"
    kernel: str = "gaussian"
    mode: str = "additive"
    truncate: float = DEFAULT_TRUNCATE
    tile: int = DEFAULT_TILE
    dtype: str = "float32"
    warmup: int = 3
    iters: int = 10


def run_long_bench(cfg: LongBenchConfig, device: str | torch.device | None = None,
                   paths: tuple[str, ...] = ("dense", "local"), progress: bool = False) -> dict:
    """Time one inner step (render + objective + backward + Adam) of long documents, per path; a JSON-able dict.

    paths: "dense" (``render`` with ``truncate``: coefficients [B, L, N]) and "local"
    (``render_local``). Targets are random [B, L, d]; splats start token-anchored (``TokenInit``:
    evenly spaced, sigma 0.6 x spacing). Per path: step_ms (median), peak_memory_gb (the device's
    peak during the path's steps, inputs included) and step_memory_gb (that peak over the memory
    held before the path), or ``error`` if it ran out of memory. ``max_abs_diff``: between the two
    paths' fields at the start; ``speedup_vs_dense``: dense step_ms over local step_ms.
    Field-only objectives: a cross-entropy's [B, L, V] logits would dwarf the rendering measured here.
    progress: a bar on stderr naming the path being timed.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(paths) - {"dense", "local"}
    if unknown:
        raise ValueError(f"long bench paths {sorted(unknown)}: choose among dense, local")
    objective = Objective.parse(cfg.objective)
    if objective.needs_decoder:
        raise ValueError(f"the long bench times rendering with a field-only objective (mse, cosine), not {cfg.objective!r}")
    dtype = _check_sizes(cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    target = torch.randn(cfg.batch, cfg.length, cfg.dim, generator=gen).to(device, dtype)
    mask = torch.ones(cfg.batch, cfg.length, dtype=torch.bool, device=device)
    splats = TokenInit()(target, mask, torch.full((cfg.batch,), cfg.splats, device=device))
    opt = InnerOptimizer()
    v_scale = torch.ones(cfg.batch, 1, 1, device=device, dtype=dtype)
    draw = {
        "dense": lambda s: render(s, cfg.length, cfg.kernel, cfg.mode, cfg.truncate),
        "local": lambda s: render_local(s, cfg.length, cfg.kernel, cfg.mode, cfg.truncate, cfg.tile),
    }
    cuda = device.type == "cuda"
    results: dict[str, dict[str, Any]] = {}  # path -> its JSON record
    fields: dict[str, torch.Tensor] = {}
    for path in _paths_progress(paths, "long bench", progress):
        holder: dict[str, dict] = {"params": {k: t.detach().clone() for k, t in splats.params().items()}}
        holder["state"] = adam_init(holder["params"])

        def step():
            live = {k: t.detach().requires_grad_(True) for k, t in holder["params"].items()}
            loss = objective_terms(objective, draw[path](splats.with_params(live)), target, mask)[0].sum()
            grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
            holder["params"], holder["state"], _ = adam_step(holder["params"], grads, holder["state"],
                                                             opt.learning_rates(1, 2, v_scale), opt)

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device) if cuda else 0
        try:
            with torch.no_grad():  # on the host, so that one path's field does not weigh on the other's peak
                fields[path] = draw[path](splats).cpu()
            seconds = _timed(step, cfg.warmup, cfg.iters, device)
        except torch.cuda.OutOfMemoryError as err:  # the dense path at large B·L·N: record it, go on
            results[path] = {"error": "out of memory", "message": str(err).splitlines()[0]}
            fields.pop(path, None)
            continue
        finally:
            holder.clear()
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        results[path] = {
            "step_ms": seconds * 1e3,
            "prompt_steps_per_s": cfg.batch / seconds,
            "peak_memory_gb": peak / 1e9 if peak is not None else None,  # None: not CUDA
            "step_memory_gb": (peak - held) / 1e9 if peak is not None else None,
        }
    if "step_ms" in results.get("dense", {}) and "step_ms" in results.get("local", {}):
        results["local"]["speedup_vs_dense"] = results["dense"]["step_ms"] / results["local"]["step_ms"]
    mu, sigma = splats.mu, splats.sigma
    plan = plan_tiles(mu, sigma, splats.mask, cfg.length, min(cfg.tile, cfg.length), cfg.truncate)
    device_name = device_label(device)
    return {
        "bench": "long",
        "config": asdict(cfg),
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "results": results,
        "dense_coefficient_bytes": cfg.batch * cfg.length * cfg.splats * target.element_size(),  # one A [B, L, N]
        "tile_candidates": plan.width,  # S: splats evaluated per tile (padded to a multiple of 8)
        "max_abs_diff": float((fields["dense"] - fields["local"]).abs().max()) if len(fields) == 2 else None,
    }


@dataclass
class E2EBenchConfig:
    """What ``run_e2e_bench`` fits: ``prompts`` prompts of at most ``max_tokens`` tokens sampled from
    ``corpus`` (a ``fixedpos.load_corpus_spec`` name or file), ``splats_fraction`` x L splats each,
    once per step budget in ``steps``. batch_size: prompts per chunk of the fit (None: fit's default,
    16384 // L). warmup_steps: an untimed fit of the first chunk's worth of prompts first (CUDA context,
    kernel compilation; 0 = none). The target: pooled token accuracy >= ``target_accuracy`` within
    ``target_seconds`` of wall time.
    """

    prompts: int = 10_000
    corpus: str = "stdlib:test"
    max_tokens: int = 64
    splats_fraction: float = 0.5
    steps: tuple[int, ...] = (100, 150, 200)
    batch_size: int | None = None
    init: str = "grid"
    objective: str = "mse+ce"
    seed: int = 0
    warmup_steps: int = 2
    target_accuracy: float = 0.99
    target_seconds: float = 60.0


def _paths_progress(paths: tuple[str, ...], what: str, progress: bool) -> Iterable[str]:
    """``paths`` under a progress bar on stderr naming the path being timed (compilation and warm-up can
    take a minute on a CPU); the plain tuple when ``progress`` is False."""
    if not progress:
        return paths
    from tqdm.auto import tqdm

    def named() -> Iterator[str]:
        bar = tqdm(paths, desc=what, unit="path")
        for path in bar:
            bar.set_postfix_str(path)
            yield path

    return named()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_e2e_sizes(cfg: E2EBenchConfig) -> None:
    """Refuse sizes no fit of the e2e bench can take, before the prompts are sampled and encoded (seconds
    to minutes): fit's rules where fit has one (``check_options``, ``Objective.parse``)."""
    from fixedpos.corpus import check_corpus_spec

    from .fit import check_options

    if isinstance(cfg.prompts, bool) or not isinstance(cfg.prompts, int) or cfg.prompts < 1 or not cfg.steps:
        raise ValueError(f"e2e bench: prompts={cfg.prompts!r} must be an int >= 1 and steps={cfg.steps} non-empty")
    if isinstance(cfg.max_tokens, bool) or not isinstance(cfg.max_tokens, int) or cfg.max_tokens < 8:
        raise ValueError(f"e2e bench: max_tokens={cfg.max_tokens!r} (--length) must be an int >= 8: prompts are cut from "
                         "passages of at least 8 tokens")
    for name, value in [("steps", k) for k in cfg.steps] + [("warmup_steps", cfg.warmup_steps)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"e2e bench: {name}={value!r} must be an int >= 0")
    check_options(batch_size=cfg.batch_size, seed=cfg.seed)  # fit's names and rules
    # The bench takes a fraction only (fit's n_splats also takes counts, which this message must not offer).
    fraction = cfg.splats_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"e2e bench: splats_fraction={fraction!r} (--splats-fraction) is the number of splats as a "
                         "fraction of each prompt's length and must lie in (0, 1], e.g. 0.25 for N = L/4")
    for name, value, ok, rule in (("target_accuracy", cfg.target_accuracy, lambda x: 0 <= x <= 1, "in [0, 1]"),
                                  ("target_seconds", cfg.target_seconds, lambda x: x > 0, "> 0")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
            raise ValueError(f"e2e bench: {name}={value!r} must be a number {rule}")
    Objective.parse(cfg.objective)
    check_corpus_spec(cfg.corpus)


def run_e2e_bench(cfg: E2EBenchConfig, device: str | torch.device | None = None, model=None,
                  fused: bool | None = None, cuda_graphs: bool | None = None) -> dict:
    """Fit ``cfg.prompts`` real prompts end to end for each step budget; a JSON-able dict.

    Prompts come from ``fixedpos.sample_prompts`` (deterministic in ``cfg.seed``); a corpus with
    fewer usable passages than ``cfg.prompts`` is cycled to that number (``distinct_prompts`` and
    ``note`` say so). The prompts are tokenized and encoded once (``encode_seconds``, not part of
    any fit's time) and every budget fits the same ``Targets`` (field [P, L, d], mask, ids) with
    ``splatopt.fit(..., record_every=0)``. Per budget (``runs``): ``wall_seconds`` around the fit
    call (device synchronized; includes final decoding and detokenizing), ``fit_seconds`` (the
    fit's own timer: inner loops and final metrics), token accuracy pooled over all tokens, mean
    and minimum over prompts, prompts below the target, relative field error, peak GPU memory (GB),
    whether the fused field loss and CUDA graphs were used, and ``meets_accuracy`` / ``meets_time`` / ``meets_target``.
    model: the field model (default: the embedded one). fused, cuda_graphs: passed to ``fit``.
    """
    import fixedpos

    from .fit import Targets, fit

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_e2e_sizes(cfg)
    model = model if model is not None else fixedpos.load()
    resolve_initializer(cfg.init, model)  # a bad init (or no learned one for this model) before sampling, not after
    started = time.perf_counter()
    distinct = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec(cfg.corpus), cfg.prompts,
                                       max_tokens=cfg.max_tokens, seed=cfg.seed)
    if not distinct:
        raise ValueError(f"e2e bench: corpus {cfg.corpus!r} has no passage of at least 8 tokens")
    prompts = [distinct[i % len(distinct)] for i in range(cfg.prompts)]
    sample_s = time.perf_counter() - started

    _sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        batch = model.tokenize(prompts, device=device)
        targets = Targets(model.encode(batch), batch.mask, batch.ids)
    _sync(device)
    encode_s = time.perf_counter() - started

    kw: dict[str, Any] = dict(n_splats=cfg.splats_fraction, objective=cfg.objective, init=cfg.init, seed=cfg.seed,
                              device=device, record_every=0, progress=False, batch_size=cfg.batch_size, fused=fused,
                              cuda_graphs=cuda_graphs)
    warmup_s = None
    if cfg.warmup_steps:
        w = min(cfg.prompts, cfg.batch_size or 16384 // targets.field.shape[1])
        started = time.perf_counter()
        fit(Targets(targets.field[:w], batch.mask[:w], batch.ids[:w]), model, steps=cfg.warmup_steps, **kw)
        _sync(device)
        warmup_s = time.perf_counter() - started

    cuda = device.type == "cuda"
    lengths = batch.mask.sum(-1)
    runs = []
    for steps in cfg.steps:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        started = time.perf_counter()
        result = fit(targets, model, steps=steps, **kw)
        _sync(device)
        wall = time.perf_counter() - started
        summary = result.summary()
        assert result.token_accuracy is not None  # fit with a model decodes: it scores every prompt
        acc = result.token_accuracy.float().cpu()
        pooled = summary["token_accuracy_pooled"]
        runs.append({
            "steps": steps,
            "wall_seconds": wall,
            "fit_seconds": result.seconds,
            "prompts_per_s": cfg.prompts / wall,
            "token_accuracy_pooled": pooled,
            "token_accuracy_mean": summary["token_accuracy"],
            "token_accuracy_min": float(acc.min()),
            "prompts_below_target": int((acc < cfg.target_accuracy).sum()),
            "field_error": summary["field_error"],
            "splats": summary["splats"],
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "fused": result.config["fused"],
            "cuda_graphs": result.config["cuda_graphs"],
            "meets_accuracy": pooled >= cfg.target_accuracy,
            "meets_time": wall <= cfg.target_seconds,
            "meets_target": pooled >= cfg.target_accuracy and wall <= cfg.target_seconds,
        })
    note = None
    if len(distinct) < cfg.prompts:
        note = (f"{cfg.corpus} gave {len(distinct)} distinct prompts of <= {cfg.max_tokens} tokens; "
                f"they were cycled to {cfg.prompts} (each fitted about {cfg.prompts / len(distinct):.1f} times)")
    return {
        "bench": "e2e",
        "config": asdict(cfg),
        "cuda_graphs_requested": cuda_graphs,
        "device": device_label(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "model": getattr(model, "name", None),
        "layer": getattr(model, "layer", None),
        "prompts": cfg.prompts,
        "distinct_prompts": len(distinct),
        "note": note,
        "tokens": int(lengths.sum()),
        "max_length": int(lengths.max()),
        "mean_length": float(lengths.float().mean()),
        "sample_seconds": sample_s,
        "encode_seconds": encode_s,
        "warmup_seconds": warmup_s,
        "runs": runs,
        "met": any(r["meets_target"] for r in runs),
    }


def _bench_identity(result: dict) -> dict:
    """What a bench result measured (its configuration, the paths timed, the device type, whether CUDA
    graphs were asked for): two results with the same identity are the same measurement."""
    timed = result.get("results")
    return {"config": result["config"], "paths": sorted(timed) if isinstance(timed, dict) else None, "bench": result.get("bench"),
            "device_type": result.get("device_type"), "cuda_graphs": result.get("cuda_graphs_requested")}


def save_bench(result: dict, out_dir: str | Path = "figures/data/bench") -> Path:
    """Write a bench result as JSON under ``out_dir``, named after its configuration; returns the path.

    A file of that name holding another configuration (the name leaves out dtype, kernel, the paths
    timed, ...) is kept: this one gets the name plus a short digest of what it measured."""
    cfg = result["config"]
    if result.get("bench") == "e2e":
        corpus = re.sub(r"[^A-Za-z0-9.]+", "_", Path(cfg["corpus"]).name)
        batch = f"-b{cfg['batch_size']}" if cfg["batch_size"] else ""
        name = (f"e2e-{result['device_type']}-P{cfg['prompts']}-{corpus}-L{cfg['max_tokens']}-n{cfg['splats_fraction']:g}"
                f"-{re.sub(r'[^A-Za-z0-9.]+', '_', cfg['objective'])}-{cfg['init']}-K{'_'.join(map(str, cfg['steps']))}{batch}"
                f"{'-nographs' if result.get('cuda_graphs_requested') is False else ''}")
    else:
        prefix = "long" if result.get("bench") == "long" else "step"
        name = f"{prefix}-{result['device_type']}-{cfg['objective'].replace('+', '_')}-B{cfg['batch']}-L{cfg['length']}-N{cfg['splats']}-d{cfg['dim']}"
    path = Path(out_dir) / f"{name}.json"
    if path.is_file():
        try:
            earlier = _bench_identity(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError):  # not a bench result: never overwritten either
            earlier = None
        if earlier != _bench_identity(result):
            digest = hashlib.sha256(strict_json(_bench_identity(result)).encode()).hexdigest()[:8]
            path = path.with_name(f"{name}-{digest}.json")
    # atomic: an interrupted write must not leave a truncated JSON where a good one stood
    atomic_write_bytes(path, strict_json(result, indent=1).encode())
    return path
