"""The fused field loss as a ``torch.autograd.Function``: the thin layer over ``triton_field``.

Forward launches one Triton kernel that renders, scores and differentiates in one pass (see
``triton_field``'s docstring) and keeps the gradients; backward only scales them by the incoming
gradient ``dloss [B]`` (and, for the MSE, by 2 w_mse / ref, which the single-sweep kernel cannot
know while it writes them). Nothing of size [B, L, d] is allocated.

First order only: differentiating the gradients again (``create_graph=True``, meta-training through
the unrolled inner loop) raises; use the PyTorch path (``field_loss(..., fused=False)``) there.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import Tensor

from ..objectives import Objective
from ..splats import SIGMA_MAX, SIGMA_MIN

COS_EPS = 1e-8  # mean_cosine's eps (torch.cosine_similarity)
REF_MIN = torch.finfo(torch.float32).tiny  # relative_mse's clamp of the target's squared norm (float32 kernels)
MAX_SLOTS = 128  # a[BLOCK_L, BLOCK_N] lives in registers; beyond this the unfused path is the better one
PRECISIONS = ("ieee", "tf32x3", "tf32")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _pow2(n: int, lo: int = 16) -> int:
    # tl.dot needs every block dimension >= 16
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def launch_config(L: int, N: int, D: int, precision: str = "ieee") -> dict:
    """Block sizes, warps and pipeline stages for L tokens, N slots, width D (the one place to tune them).

    Chosen so that ptxas (sm_90, Triton 3.9) spills no registers: the float32 tl.dot operands of the
    three small matrix products are replicated across threads, and register pressure, not shared
    memory, bounds the tiles. ``SPLATOPT_FUSED_CONFIG='{"BLOCK_D": 32, "num_warps": 8}'`` overrides
    any of them (``python -m splatopt.kernels.tune`` times the alternatives on a GPU).
    """
    block_n = _pow2(N)
    if block_n <= 16:
        block_l, block_d, warps = 64, (64 if precision == "ieee" else 32), 8
    elif block_n <= 32:
        block_l, block_d, warps = 32, 32, 8
    elif block_n <= 64:
        block_l, block_d, warps = 16, 32, 8
    else:
        block_l, block_d, warps = 16, 16, 4
    cfg = {"BLOCK_L": min(block_l, _pow2(L)), "BLOCK_N": block_n, "BLOCK_D": min(block_d, _pow2(D)),
           "num_warps": warps, "num_stages": 1}
    override = os.environ.get("SPLATOPT_FUSED_CONFIG")
    if override:
        extra = json.loads(override)
        unknown = set(extra) - {"BLOCK_L", "BLOCK_D", "num_warps", "num_stages"}
        if unknown:
            raise ValueError(f"SPLATOPT_FUSED_CONFIG: unknown keys {sorted(unknown)}")
        cfg.update(extra)
    return cfg


def _default_split(B: int, D: int, block_d: int, device: torch.device) -> int:
    """d-slices per prompt for the MSE kernel: enough programs to fill the GPU when B is small."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(math.ceil(D / block_d), math.ceil(4 * sms / B)))


def _weights(objective) -> tuple[float, float]:
    obj = Objective.parse(objective)
    if obj.ce:
        raise ValueError(f"objective {objective!r}: the fused field loss computes mse and cosine terms only, "
                         "a cross-entropy term needs the rendered field (use the unfused path)")
    if not (obj.mse or obj.cosine):
        raise ValueError(f"objective {objective!r} has no mse or cosine term")
    return float(obj.mse), float(obj.cosine)


class FusedFieldLoss(torch.autograd.Function):
    """(loss [B], relative MSE [B], mean cosine [B]); only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, mu, log_sigma, weight_logit, v, slot_mask, target, token_mask, w_mse, w_cos, precision, d_split, config):
        from .triton_field import field_loss_kernel

        B, N = mu.shape
        L, D = target.shape[1], target.shape[2]
        need_grad = any(ctx.needs_input_grad[:4])
        has_cos = w_cos != 0.0
        cfg = config or launch_config(L, N, D, precision)
        S = 1 if has_cos else (d_split or _default_split(B, D, cfg["BLOCK_D"], target.device))
        dev = target.device
        f32 = torch.float32
        # tensors the kernel indexes with unit strides (small [B, N] ones are cheap to make contiguous)
        mu, log_sigma, weight_logit = (t.contiguous() for t in (mu, log_sigma, weight_logit))
        on = slot_mask.contiguous().view(torch.uint8)
        vk = v if v.stride(-1) == 1 else v.contiguous()
        tk = target if target.stride(-1) == 1 else target.contiguous()
        tm = token_mask.contiguous().view(torch.uint8)
        gv = torch.empty((B, N, D) if need_grad else (1,), device=dev, dtype=v.dtype)
        geom = torch.empty((B, S, 3, cfg["BLOCK_N"]) if need_grad else (1,), device=dev, dtype=f32)
        stats = torch.empty(B, S, 4, device=dev, dtype=f32)
        L_pad = math.ceil(L / cfg["BLOCK_L"]) * cfg["BLOCK_L"]
        scratch = torch.empty((B, L_pad, 2) if (has_cos and need_grad) else (1,), device=dev, dtype=f32)
        field_loss_kernel[(B, S)](
            mu, log_sigma, weight_logit, on,
            vk, vk.stride(0), vk.stride(1),
            tk, tk.stride(0), tk.stride(1),
            tm, tm.stride(0),
            gv, geom, stats, scratch,
            N, L, D, S, L_pad,
            math.log(SIGMA_MIN), math.log(SIGMA_MAX), w_mse, w_cos, COS_EPS,
            HAS_COS=has_cos, NEED_GRAD=need_grad,
            BLOCK_L=cfg["BLOCK_L"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=precision,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        err, ref, cos_sum, count = (stats.sum(1) if S > 1 else stats[:, 0]).unbind(-1)
        ref = ref.clamp_min(REF_MIN)
        mse = err / ref
        cos = cos_sum / count.clamp_min(1.0)
        # as objective_terms: a term with weight 0 is not added (0 * NaN would still be NaN)
        loss = torch.zeros_like(mse)
        if w_mse:
            loss = loss + w_mse * mse
        if w_cos:
            loss = loss + w_cos * (1.0 - cos)
        out_dtype = torch.promote_types(mu.dtype, target.dtype)
        loss, mse, cos = (t.to(out_dtype) for t in (loss, mse, cos))
        if need_grad:
            # the MSE kernel's gradients lack 2 w_mse / ref; the cosine kernel's are final
            post = torch.ones_like(ref) if has_cos else (2.0 * w_mse) / ref
            ctx.save_for_backward(gv, geom.sum(1) if S > 1 else geom[:, 0], post)
            ctx.n_slots = N
            ctx.dtypes = (mu.dtype, log_sigma.dtype, weight_logit.dtype)
        ctx.mark_non_differentiable(mse, cos)
        return loss, mse, cos

    @staticmethod
    def backward(ctx, dloss, _dmse, _dcos):
        if torch.is_grad_enabled():  # the engine enables grad mode in backward only for create_graph=True
            raise RuntimeError("fused_field_loss is first-order: its gradients come from the forward kernel and "
                               "cannot be differentiated again (create_graph=True); use fused=False there")
        gv, geom, post = ctx.saved_tensors
        coef = dloss.to(torch.float32) * post  # [B]
        grads = [None] * 4
        geo = geom[:, :, : ctx.n_slots] * coef[:, None, None]  # [B, 3, N]
        for i in range(3):
            if ctx.needs_input_grad[i]:
                grads[i] = geo[:, i].to(ctx.dtypes[i])
        if ctx.needs_input_grad[3]:
            grads[3] = gv * coef.to(gv.dtype)[:, None, None]
        return (*grads, None, None, None, None, None, None, None, None)


def fused_field_terms(
    mu: Tensor, log_sigma: Tensor, weight_logit: Tensor, v: Tensor, slot_mask: Tensor,
    target: Tensor, token_mask: Tensor, objective: str | Objective | dict = "mse", *, precision: str = "ieee", d_split: int | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss [B], relative MSE [B], mean cosine [B]) of the additive Gaussian render, fused.

    Same arguments as :func:`fused_field_loss`; the two terms are returned whatever the objective's
    weights (the cosine is 0 when the objective has no cosine term) and carry no gradient.
    config: a full :func:`launch_config` dict instead of the default one (the tuner's).
    """
    w_mse, w_cos = _weights(objective)
    B, N = mu.shape
    if target.dim() != 3 or target.shape[0] != B:
        raise ValueError(f"target must be [B={B}, L, d]; got {tuple(target.shape)}")
    L, D = target.shape[1], target.shape[2]
    for name, t, shape in (("log_sigma", log_sigma, (B, N)), ("weight_logit", weight_logit, (B, N)),
                           ("slot_mask", slot_mask, (B, N)), ("v", v, (B, N, D)), ("token_mask", token_mask, (B, L))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if slot_mask.dtype != torch.bool or token_mask.dtype != torch.bool:
        raise TypeError("slot_mask and token_mask must be bool")
    if N > MAX_SLOTS:
        raise ValueError(f"the fused kernel holds at most {MAX_SLOTS} splat slots per prompt, got {N}; use fused=False")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    devices = {t.device for t in (mu, log_sigma, weight_logit, v, slot_mask, target, token_mask)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if target.device.type != "cuda" and not interpreting():
        raise ValueError(f"the fused field loss runs on CUDA tensors (got {target.device}); set TRITON_INTERPRET=1 "
                         "before importing splatopt.kernels to run it in Triton's (slow) CPU interpreter")
    if config is not None and config["BLOCK_N"] < N:
        raise ValueError(f"config BLOCK_N={config['BLOCK_N']} < {N} slots")
    return FusedFieldLoss.apply(mu, log_sigma, weight_logit, v, slot_mask, target, token_mask, w_mse, w_cos, precision,
                                d_split, config)


def fused_field_loss(
    mu: Tensor, log_sigma: Tensor, weight_logit: Tensor, v: Tensor, slot_mask: Tensor,
    target: Tensor, token_mask: Tensor, objective: str | Objective | dict = "mse", *, precision: str = "ieee", d_split: int | None = None,
) -> Tensor:
    """Per-prompt loss [B] of the additive Gaussian render against ``target``; Triton forward and backward.

    Equals ``objective_terms(objective, render(splats, L), target, token_mask)[0]`` with
    ``kernel="gaussian", mode="additive"`` and no truncation, without materializing the field.

    mu, log_sigma, weight_logit: [B, N] (tokens, log tokens, logit). v: [B, N, d]. slot_mask: [B, N]
    bool (inactive slots may hold NaN; they contribute nothing and get zero gradient).
    target: [B, L, d] float32 / bfloat16 / float16 (accumulated in float32). token_mask: [B, L] bool.
    objective: "mse" (relative MSE), "cosine" (1 - mean cosine) or a weighted sum such as
    "mse+0.1*cosine"; no "ce". precision: tl.dot precision for float32 ("ieee" exact, "tf32x3"
    nearly so and faster, "tf32" fast and ~1e-3 relative). d_split: slices of d per prompt for the
    MSE kernel (default: enough programs to fill the GPU).
    """
    return fused_field_terms(mu, log_sigma, weight_logit, v, slot_mask, target, token_mask, objective,
                             precision=precision, d_split=d_split)[0]
