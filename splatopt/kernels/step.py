"""The fused inner step: render + relative MSE + backward + Adam in two Triton launches.

    coef = mse_coefficients(target, token_mask, "mse")           # once per fit: the target is fixed
    params, state, skipped = fused_adam_step(params, state, slot_mask, target, token_mask, coef, lrs, optimizer)

Equals ``optim.adam_step`` applied to the autograd gradients of the summed relative MSE of the
additive Gaussian render (``fit``'s step for an objective ``"mse"`` or ``"k*mse"``), with the
same per-prompt NaN guard and frozen slots, but moves only the roofline's bytes: the target once,
and the parameters and both Adam moments read and written once (see ``triton_step``). Functional:
new tensors are returned, the inputs are untouched. First order (no ``create_graph``): the
meta-trainer differentiates through the PyTorch step instead.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import Tensor

from ..objectives import Objective
from ..graphs import capture_steps, learning_rate_table, warm_up
from ..optim import InnerOptimizer
from ..splats import SIGMA_MAX, SIGMA_MIN
from .fused import MAX_SLOTS, REF_MIN, _default_split, _pow2, interpreting

GEOMETRY = ("mu", "log_sigma", "weight_logit")


def step_config(L: int, N: int, D: int) -> dict:
    """Block sizes and warps of the step kernel (``SPLATOPT_STEP_CONFIG`` JSON overrides any of them).

    ``precision`` is tl.dot's for the float32 products: "tf32x3" (three tensor-core passes,
    float32-accurate: gradients within ~1e-6 relative) by default; "ieee" (FMA, exact rounding,
    slower); "tf32" (one pass, ~1e-3 relative: fails the reference tests, offered for timing).
    ``one_tile``: prompts of at most BLOCK_L tokens take the single-tile sweep (``triton_step``).
    """
    block_n = _pow2(N)
    # timed on an H100 (python -m splatopt.kernels.tune --step): at L = 64, N = 16, d = 384 the
    # single-tile sweep with 32-wide d-tiles, 4 warps and 3 pipeline stages is the fastest
    cfg = {"BLOCK_L": min(64 if block_n <= 16 else 32, _pow2(L)), "BLOCK_N": block_n, "BLOCK_D": min(32, _pow2(D)),
           "num_warps": 4, "num_stages": 3, "precision": "tf32x3", "one_tile": True}
    override = os.environ.get("SPLATOPT_STEP_CONFIG")
    if override:
        extra = json.loads(override)
        unknown = set(extra) - {"BLOCK_L", "BLOCK_D", "num_warps", "num_stages", "precision", "d_split", "one_tile"}
        if unknown:
            raise ValueError(f"SPLATOPT_STEP_CONFIG: unknown keys {sorted(unknown)}")
        cfg.update(extra)
    if interpreting():
        cfg["precision"] = "ieee"  # the interpreter multiplies in float32 whatever is asked; say so
    return cfg


def mse_coefficients(target: Tensor, token_mask: Tensor, objective: str | Objective | dict = "mse") -> Tensor:
    """[B] float32 ``2 w_mse / sum|T|^2``: the relative MSE's gradient is ``coef_b (F - T)`` on valid tokens.

    ValueError unless the objective is a weighted relative MSE alone (the fused step's objective).
    """
    obj = Objective.parse(objective)
    if obj.ce or obj.cosine or not obj.mse:
        raise ValueError(f"the fused step optimizes a relative MSE alone; objective {str(obj)!r} needs fused_field_loss "
                         "or the PyTorch path")
    t = torch.where(token_mask[..., None], target, 0).float()
    return 2.0 * float(obj.mse) / (t * t).sum((1, 2)).clamp_min(REF_MIN)


SCHEDULE_COLUMNS = ("mu", "log_sigma", "weight_logit", "v", "bias1", "bias2")


def adam_schedule(optimizer: InnerOptimizer, total: int, t0: int = 0) -> Tensor:
    """[total, 6] float64 (CPU): each step's learning rates and Adam's bias corrections, as ``SCHEDULE_COLUMNS``.

    Row ``i`` is step ``i`` of a ``total``-step fit (``InnerOptimizer.learning_rates(i, total)``;
    "v" before the per-prompt target RMS) whose Adam state counted ``t0`` steps before it.
    """
    t = torch.arange(t0 + 1, t0 + total + 1, dtype=torch.float64)[:, None]
    bias = torch.cat([1 - optimizer.beta1**t, 1 - optimizer.beta2**t], 1)
    return torch.cat([learning_rate_table(optimizer, total), bias], 1)


def _check(params: dict[str, Tensor], slot_mask: Tensor, target: Tensor, token_mask: Tensor, coef: Tensor,
           optimizer: InnerOptimizer) -> None:
    """ValueError / TypeError naming what the fused step cannot take."""
    if optimizer.clip is not None:
        raise ValueError("the fused step takes no gradient clipping (optimizer.clip is set); use the PyTorch step")
    B, N, D = params["v"].shape
    L = target.shape[1]
    if N > MAX_SLOTS:
        raise ValueError(f"the fused step holds at most {MAX_SLOTS} splat slots per prompt, got {N}")
    if tuple(target.shape) != (B, L, D) or tuple(token_mask.shape) != (B, L) or tuple(slot_mask.shape) != (B, N):
        raise ValueError(f"shapes disagree: v {tuple(params['v'].shape)}, target {tuple(target.shape)}, "
                         f"token_mask {tuple(token_mask.shape)}, slot_mask {tuple(slot_mask.shape)}")
    if any(params[k].dtype != torch.float32 for k in params):
        raise TypeError("the fused step updates float32 parameters")
    devices = {str(t.device) for t in (*params.values(), slot_mask, target, token_mask, coef)}
    if len(devices) != 1:
        raise ValueError(f"the fused step needs every tensor on one device, got {sorted(devices)}")
    if target.device.type != "cuda" and not interpreting():
        raise ValueError(f"the fused step runs on CUDA tensors (got {target.device}); set TRITON_INTERPRET=1 before "
                         "importing splatopt.kernels to run it in Triton's (slow) CPU interpreter")


class _Launcher:
    """The two launches of one step, with everything that does not change between steps bound once.

    Scratch (geometry partials, non-finite counts, the skip flags) is allocated here, not per step:
    a captured CUDA graph then allocates nothing.
    """

    def __init__(self, slot_mask, target, token_mask, coef, v_scale, schedule, counter, optimizer, config):
        B, L, D = target.shape
        N = slot_mask.shape[1]
        self.cfg = cfg = {**step_config(L, N, D), **(config or {})}
        dev = target.device
        self.S = cfg.get("d_split") or _default_split(B, D, cfg["BLOCK_D"], dev)
        self.shape = (B, N, L, D)
        self.on = slot_mask.contiguous().view(torch.uint8)
        self.target = target if target.stride(-1) == 1 else target.contiguous()
        self.tm = token_mask.contiguous().view(torch.uint8)
        self.coef = coef.float().contiguous()
        self.v_scale = v_scale.float().reshape(B).contiguous()
        self.schedule, self.counter = schedule, counter
        self.hyper = (optimizer.beta1, optimizer.beta2, optimizer.eps, optimizer.eps_root)
        self.geom = torch.empty(B, self.S, 3, cfg["BLOCK_N"], device=dev, dtype=torch.float32)
        self.bad = torch.empty(B, self.S, device=dev, dtype=torch.float32)
        self.skipped = torch.empty(B, device=dev, dtype=torch.uint8)

    def __call__(self, old: tuple[dict[str, Tensor], ...], new: tuple[dict[str, Tensor], ...], free: Tensor | None) -> Tensor:
        """Step from ``old`` (params, first, second moments) into ``new``; returns the [B] uint8 skip flags."""
        from .triton_step import step_geometry_kernel, step_v_kernel

        (p, m, s), (p2, m2, s2), cfg = old, new, self.cfg
        B, N, L, D = self.shape
        S, tk = self.S, self.target
        free_f = free.to(torch.float32).contiguous() if free is not None else self.v_scale  # a dummy pointer
        step_v_kernel[(B, S)](
            p["mu"], p["log_sigma"], p["weight_logit"], self.on,
            p["v"], m["v"], s["v"], p2["v"], m2["v"], s2["v"],
            tk, tk.stride(0), tk.stride(1), self.tm, self.tm.stride(0),
            self.coef, self.v_scale, self.schedule, self.counter, free_f, self.geom, self.bad,
            N, L, D, S, math.log(SIGMA_MIN), math.log(SIGMA_MAX), *self.hyper,
            HAS_FREE=free is not None, ONE_TILE=cfg["one_tile"] and L <= cfg["BLOCK_L"], BLOCK_L=cfg["BLOCK_L"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=cfg["precision"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        mu_, ls_, wl_ = GEOMETRY
        step_geometry_kernel[(B,)](
            p[mu_], p[ls_], p[wl_],
            m[mu_], s[mu_], m[ls_], s[ls_], m[wl_], s[wl_],
            p2[mu_], p2[ls_], p2[wl_],
            m2[mu_], s2[mu_], m2[ls_], s2[ls_], m2[wl_], s2[wl_],
            p["v"], m["v"], s["v"], p2["v"], m2["v"], s2["v"],
            self.geom, self.bad, free_f, self.skipped, self.schedule, self.counter,
            N, D, S, *self.hyper,
            HAS_FREE=free is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_S=_pow2(S, 1), BLOCK_COPY=1024, num_warps=4,
        )
        self.counter.add_(1)  # the next step's schedule row; on the device, so a graph replays it
        return self.skipped


def fused_adam_step(
    params: dict[str, Tensor],
    state: dict,
    slot_mask: Tensor,
    target: Tensor,
    token_mask: Tensor,
    coef: Tensor,
    lrs: dict[str, Tensor | float],
    optimizer: InnerOptimizer,
    free: Tensor | None = None,
    config: dict | None = None,
) -> tuple[dict[str, Tensor], dict, Tensor]:
    """One Adam step of the relative MSE; returns (new params, new state, skipped [B] bool), as ``adam_step``.

    params: {"mu", "log_sigma", "weight_logit": [B, N], "v": [B, N, D]} float32. state: Adam's
    {"m": {...}, "v": {...}, "t": int} as ``adam_init`` makes it. slot_mask: [B, N] bool (inactive
    slots may hold NaN). target: [B, L, D] float32 / bf16 / fp16. token_mask: [B, L] bool.
    coef: [B] from :func:`mse_coefficients`. lrs: ``InnerOptimizer.learning_rates`` (floats, and
    a [B, 1, 1] tensor for v). free: [B, N] bool or float, slots that may change (frozen slots get
    learning rate 0, their moments still update, as in ``fit``). optimizer.clip must be None: a
    per-prompt clip needs the whole gradient's norm before any tile moves (use the PyTorch step).
    A fit's many steps take :class:`FusedAdamLoop` instead (no host work per step, CUDA graphs).
    """
    _check(params, slot_mask, target, token_mask, coef, optimizer)
    B, dev = params["v"].shape[0], params["v"].device
    t = state["t"] + 1
    row = [float(lrs[k]) for k in GEOMETRY] + [1.0, 1 - optimizer.beta1**t, 1 - optimizer.beta2**t]
    schedule = torch.tensor([row], device=dev, dtype=torch.float32)
    v_scale = torch.as_tensor(lrs["v"], device=dev, dtype=torch.float32).expand(B, 1, 1)
    launch = _Launcher(slot_mask, target, token_mask, coef, v_scale, schedule,
                       torch.zeros(1, device=dev, dtype=torch.int32), optimizer, config)
    old = tuple({k: d[k].contiguous() for k in params} for d in (params, state["m"], state["v"]))
    new = tuple({k: torch.empty_like(old[0][k]) for k in params} for _ in range(3))
    skipped = launch(old, new, free).bool()
    return new[0], {"m": new[1], "v": new[2], "t": t}, skipped


class FusedAdamLoop:
    """The fused step over a fit's steps, with no host work between them: ``fit``'s fused path.

        loop = FusedAdamLoop(params, state, slot_mask, target, token_mask, coef, optimizer, steps, v_scale)
        loop.run(100)          # steps 0..99
        loop.params, loop.state, loop.skipped

    Each step equals :func:`fused_adam_step` with ``optimizer.learning_rates(step, steps, v_scale)``.
    The schedule (:func:`adam_schedule`) sits in device memory and the kernels read their row
    through a step counter that the device increments; parameters and moments alternate between two
    buffer sets (the inputs are copied in, never written). So a step is the same launches every
    time, and with ``cuda_graphs`` pairs of steps are captured once as a CUDA graph and replayed:
    one host call per ``unroll`` steps instead of three launches per step, which is what bounds
    small batches. v_scale: [B] or [B, 1, 1], the per-prompt factor on ``lr_v`` (the target's RMS).
    """

    def __init__(self, params: dict[str, Tensor], state: dict, slot_mask: Tensor, target: Tensor, token_mask: Tensor,
                 coef: Tensor, optimizer: InnerOptimizer, steps: int, v_scale: Tensor, cuda_graphs: bool = False,
                 unroll: int = 2, config: dict | None = None) -> None:
        _check(params, slot_mask, target, token_mask, coef, optimizer)
        if cuda_graphs and target.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs CUDA tensors, got {target.device}")
        if unroll < 2 or unroll % 2:
            raise ValueError(f"unroll={unroll} must be an even number >= 2 (a graph must end in the buffers it began in)")
        dev = target.device
        self.step, self.total, self.t0 = 0, steps, state["t"]
        self.cuda_graphs, self.unroll = cuda_graphs, unroll
        self.counter = torch.zeros(1, device=dev, dtype=torch.int32)
        schedule = adam_schedule(optimizer, max(steps, 1), self.t0).to(device=dev, dtype=torch.float32)
        self._launch = _Launcher(slot_mask, target, token_mask, coef, v_scale, schedule, self.counter, optimizer, config)
        first = tuple({k: d[k].detach().clone(memory_format=torch.contiguous_format) for k in params}
                      for d in (params, state["m"], state["v"]))
        self._buffers = (first, tuple({k: torch.empty_like(t) for k, t in d.items()} for d in first))
        self._current = 0
        self._skipped = torch.zeros(target.shape[0], device=dev, dtype=torch.long)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def params(self) -> dict[str, Tensor]:
        """The parameters after ``self.step`` steps (the loop's buffers: the next step overwrites the other set)."""
        return self._buffers[self._current][0]

    @property
    def state(self) -> dict:
        """Adam's state after ``self.step`` steps, as ``adam_init`` / ``adam_step`` shape it."""
        _, m, v = self._buffers[self._current]
        return {"m": m, "v": v, "t": self.t0 + self.step}

    @property
    def skipped(self) -> Tensor:
        """[B] long: steps each prompt skipped (a non-finite gradient), as ``fit`` counts them."""
        return self._skipped

    def _one(self, free: Tensor | None) -> None:
        src, dst = self._buffers[self._current], self._buffers[1 - self._current]
        self._skipped.add_(self._launch(src, dst, free))
        self._current = 1 - self._current

    def run(self, stop: int, free: Tensor | None = None) -> None:
        """Take steps ``self.step .. stop - 1``. free: [B, N] bool, slots that may change in them (None: all)."""
        if not self.step <= stop <= self.total:
            raise ValueError(f"run({stop}): the loop is at step {self.step} of {self.total}")
        graphs = self.cuda_graphs and free is None
        while self.step < stop:
            if graphs and self._graphs and stop - self.step >= self.unroll:
                self._graphs[self._current].replay()
                self.step += self.unroll
                continue
            if graphs and not self._graphs:  # a first step compiles the kernels, which a capture must find compiled
                warm_up(lambda: self._one(None))
                self._capture()
            else:
                self._one(free)
            self.step += 1

    def _capture(self) -> None:
        # capturing records the work without running it: buffers, counter and tally stay as they are
        current = self._current
        for start in (0, 1):  # a graph from either buffer set: segments of odd length switch sets
            self._current = start
            self._graphs[start] = capture_steps(lambda: self._one(None), self.unroll)
        self._current = current
