"""Fused GPU kernels (Triton) behind plain functions, with the PyTorch path as their reference.

    from splatopt.kernels import available, field_loss, fused_field_loss, linear_cross_entropy
    loss, terms = field_loss(splats, target, token_mask, "mse")     # fused where available
    loss = fused_field_loss(mu, log_sigma, weight_logit, v, slot_mask, target, token_mask, "mse")
    ce = linear_cross_entropy(q, embeddings, bias, ids, token_mask)  # [B], logits never stored
    params, state, skipped = fused_adam_step(params, state, slot_mask, target, token_mask, coef, lrs, optimizer)

The fused field loss renders the additive Gaussian field, scores it (relative MSE and/or cosine)
and differentiates it in one Triton kernel: the target is read once per step and the rendered
field [B, L, d] is never written to memory. ``fused_adam_step`` goes one further for a relative MSE
alone: it takes Adam's step on each tile of the embeddings as soon as its gradient is complete, so
one inner step moves only the target and the parameters with their moments (:mod:`.step`).
Triton is imported only when a kernel runs, so this package imports everywhere; ``available``
says whether the fused path can run.

``linear_cross_entropy`` is the decode-aware term's vocabulary projection + cross-entropy without
materialized logits (:mod:`.linear_ce`): on CUDA one Triton kernel sweeping the vocabulary once per
block of rows (:mod:`.triton_linear_ce`), elsewhere (and on request) PyTorch in row chunks.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ..objectives import Objective, objective_terms
from ..render import render
from ..splats import SplatSet
from .fused import fused_field_loss, fused_field_terms, interpreting
from .linear_ce import linear_cross_entropy
from .step import FusedAdamLoop, fused_adam_step, mse_coefficients

__all__ = ["FusedAdamLoop", "available", "field_loss", "fused_adam_step", "fused_field_loss", "fused_field_terms", "linear_cross_entropy",
           "mse_coefficients", "unavailable_reason"]


def unavailable_reason(device: torch.device | str, kernel: str = "gaussian", mode: str = "additive",
                       truncate: float | None = None, objective: str | Objective | dict = "mse") -> str | None:
    """Why the fused field loss cannot run for these settings, or None if it can."""
    device = torch.device(device)
    if kernel != "gaussian" or mode != "additive" or truncate is not None:
        return f"the fused kernel renders kernel='gaussian', mode='additive', no truncation (got {kernel!r}, {mode!r}, truncate={truncate})"
    obj = Objective.parse(objective)
    if obj.ce:
        return f"objective {str(obj)!r} has a cross-entropy term, which needs the rendered field"
    if not (obj.mse or obj.cosine):
        return f"objective {str(obj)!r} has no mse or cosine term"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or a CUDA build of torch, which ships it)"
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"the fused kernel needs a CUDA device (got {device}; TRITON_INTERPRET=1 runs it on the CPU, slowly, for tests)"


def available(device: torch.device | str, kernel: str = "gaussian", mode: str = "additive", truncate: float | None = None) -> bool:
    """Whether the fused field loss runs on ``device`` for this rendering: a CUDA device, triton
    importable, kernel "gaussian", mode "additive", no truncation.

    The CPU interpreter (``TRITON_INTERPRET=1``) is not counted: it is for tests, far slower than
    the PyTorch path; ask for it explicitly with ``field_loss(..., fused=True)``.
    """
    device = torch.device(device)
    return device.type == "cuda" and unavailable_reason(device, kernel, mode, truncate) is None


def field_loss(
    splats: SplatSet,
    target: Tensor,
    token_mask: Tensor,
    objective: str | Objective | dict = "mse",
    fused: bool | None = None,
    kernel: str = "gaussian",
    mode: str = "additive",
    truncate: float | None = None,
    precision: str = "ieee",
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss [B], {term: unweighted value [B]}) of a field-only objective, as ``objective_terms``.

    splats: SplatSet of B prompts; target: [B, L, d]; token_mask: [B, L] bool; objective: a
    field-only objective ("mse", "cosine", "mse+0.1*cosine"; "ce" needs the unfused path with
    ``objective_terms``). fused: None picks the fused kernel where :func:`available` (and the
    objective has no "ce"), True insists (ValueError saying why it cannot), False renders with
    PyTorch. kernel, mode, truncate: the rendering (:func:`splatopt.render`); the fused kernel
    renders only "gaussian", "additive", untruncated. precision: the fused kernel's float32
    products ("ieee", "tf32x3" or "tf32", see :func:`fused_field_loss`). The terms of the fused
    path carry no gradient; its loss does (mu, log_sigma, weight_logit, v), to first order only:
    differentiating through its gradients (``create_graph=True``, meta-training) raises, so pass
    fused=False there. The "cosine" term is the mean cosine (the loss adds weight x (1 - it)).
    """
    L = target.shape[1]
    if fused is None:
        fused = available(target.device, kernel, mode, truncate) and not Objective.parse(objective).ce
    if not fused:
        return objective_terms(Objective.parse(objective), render(splats, L, kernel, mode, truncate), target, token_mask)
    reason = unavailable_reason(target.device, kernel, mode, truncate, objective)
    if reason is not None:
        raise ValueError(f"fused=True but {reason}")
    loss, mse, cos = fused_field_terms(splats.mu, splats.log_sigma, splats.weight_logit, splats.v, splats.mask,
                                       target, token_mask, objective, precision=precision)
    obj = Objective.parse(objective)
    terms = {}
    if obj.mse:
        terms["mse"] = mse
    if obj.cosine:
        terms["cosine"] = cos
    return loss, terms
