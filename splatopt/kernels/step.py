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


def mse_coefficients(target: Tensor, token_mask: Tensor, objective="mse") -> Tensor:
    """[B] float32 ``2 w_mse / sum|T|^2``: the relative MSE's gradient is ``coef_b (F - T)`` on valid tokens.

    ValueError unless the objective is a weighted relative MSE alone (the fused step's objective).
    """
    obj = Objective.parse(objective)
    if obj.ce or obj.cosine or not obj.mse:
        raise ValueError(f"the fused step optimizes a relative MSE alone; objective {str(obj)!r} needs fused_field_loss "
                         "or the PyTorch path")
    t = torch.where(token_mask[..., None], target, 0).float()
    return 2.0 * float(obj.mse) / (t * t).sum((1, 2)).clamp_min(REF_MIN)


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
    """
    from .triton_step import step_geometry_kernel, step_v_kernel

    if optimizer.clip is not None:
        raise ValueError("the fused step takes no gradient clipping (optimizer.clip is set); use the PyTorch step")
    v = params["v"]
    B, N, D = v.shape
    L = target.shape[1]
    if N > MAX_SLOTS:
        raise ValueError(f"the fused step holds at most {MAX_SLOTS} splat slots per prompt, got {N}")
    if tuple(target.shape) != (B, L, D) or tuple(token_mask.shape) != (B, L) or tuple(slot_mask.shape) != (B, N):
        raise ValueError(f"shapes disagree: v {tuple(v.shape)}, target {tuple(target.shape)}, "
                         f"token_mask {tuple(token_mask.shape)}, slot_mask {tuple(slot_mask.shape)}")
    if any(params[k].dtype != torch.float32 for k in params):
        raise TypeError("the fused step updates float32 parameters")
    devices = {str(t.device) for t in (*params.values(), slot_mask, target, token_mask, coef)}
    if len(devices) != 1:
        raise ValueError(f"the fused step needs every tensor on one device, got {sorted(devices)}")
    if target.device.type != "cuda" and not interpreting():
        raise ValueError(f"the fused step runs on CUDA tensors (got {target.device}); set TRITON_INTERPRET=1 before "
                         "importing splatopt.kernels to run it in Triton's (slow) CPU interpreter")
    cfg = {**step_config(L, N, D), **(config or {})}
    dev = v.device
    S = cfg.get("d_split") or _default_split(B, D, cfg["BLOCK_D"], dev)
    t = state["t"] + 1
    b1, b2 = optimizer.beta1, optimizer.beta2
    hyper = (b1, b2, optimizer.eps, optimizer.eps_root, 1 - b1**t, 1 - b2**t)
    old = {k: params[k].contiguous() for k in params}
    m_old = {k: state["m"][k].contiguous() for k in params}
    s_old = {k: state["v"][k].contiguous() for k in params}
    new = {k: torch.empty_like(old[k]) for k in params}
    m_new = {k: torch.empty_like(old[k]) for k in params}
    s_new = {k: torch.empty_like(old[k]) for k in params}
    on = slot_mask.contiguous().view(torch.uint8)
    tk = target if target.stride(-1) == 1 else target.contiguous()
    tm = token_mask.contiguous().view(torch.uint8)
    lr_v = torch.as_tensor(lrs["v"], device=dev, dtype=torch.float32).expand(B, 1, 1).reshape(B).contiguous()
    free_f = free.to(torch.float32).contiguous() if free is not None else lr_v  # a dummy pointer without frozen slots
    geom = torch.empty(B, S, 3, cfg["BLOCK_N"], device=dev, dtype=torch.float32)
    bad = torch.empty(B, S, device=dev, dtype=torch.float32)
    step_v_kernel[(B, S)](
        old["mu"], old["log_sigma"], old["weight_logit"], on,
        old["v"], m_old["v"], s_old["v"], new["v"], m_new["v"], s_new["v"],
        tk, tk.stride(0), tk.stride(1), tm, tm.stride(0),
        coef.float().contiguous(), lr_v, free_f, geom, bad,
        N, L, D, S, math.log(SIGMA_MIN), math.log(SIGMA_MAX), *hyper,
        HAS_FREE=free is not None, ONE_TILE=cfg["one_tile"] and L <= cfg["BLOCK_L"], BLOCK_L=cfg["BLOCK_L"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=cfg["precision"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    skipped = torch.empty(B, device=dev, dtype=torch.uint8)
    mu_, ls_, wl_ = GEOMETRY
    step_geometry_kernel[(B,)](
        old[mu_], old[ls_], old[wl_],
        m_old[mu_], s_old[mu_], m_old[ls_], s_old[ls_], m_old[wl_], s_old[wl_],
        new[mu_], new[ls_], new[wl_],
        m_new[mu_], s_new[mu_], m_new[ls_], s_new[ls_], m_new[wl_], s_new[wl_],
        old["v"], m_old["v"], s_old["v"], new["v"], m_new["v"], s_new["v"],
        geom, bad, free_f, skipped,
        float(lrs[mu_]), float(lrs[ls_]), float(lrs[wl_]), N, D, S, *hyper,
        HAS_FREE=free is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_S=_pow2(S, 1), BLOCK_COPY=1024, num_warps=4,
    )
    return new, {"m": m_new, "v": s_new, "t": t}, skipped.bool()
