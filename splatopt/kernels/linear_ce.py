"""Vocabulary projection + cross-entropy without materialized logits: one fused kernel, or row chunks.

    loss = linear_cross_entropy(q, weight, bias, ids, mask)      # [B], = decode_cross_entropy(q @ W.T + b, ids, mask)

The decode-aware objective scores every vocabulary entry at every token: logits [B·L, V] in fp32
are 21 GB at B = 512, L = 64, V = 30522, and moving them dominates the step. Here the
logits of a block of rows (the fused kernel) or of ``chunk_rows`` rows (Liger Kernel style) are
projected, reduced to their log-sum-exp and loss, turned into the gradient wrt ``q`` (softmax
minus one-hot, times ``W``) *in the forward itself* and dropped. Backward only scales the kept
gradient [B, L, d] by the incoming per-prompt gradient. Peak extra memory is O(chunk_rows·V) (the
fused kernel: a copy of W) plus that gradient (the size of ``q``), independent of how many rows
there are.

Two implementations (``impl``):

- "fused" (the default on CUDA for bf16/fp16 products, :mod:`.triton_linear_ce`): one Triton kernel
  projects, reduces and differentiates a block of rows while sweeping the vocabulary once; logits
  never reach memory (Cut Cross-Entropy / flash-attention style), padding rows cost nothing.
- "chunked" (the reference, and everything else: CPU, float32/float64 products): the rows in
  chunks of ``chunk_rows``; on CUDA ``compute_dtype=torch.bfloat16`` runs both products on tensor
  cores with float32 accumulation and float32 logits, and the log-sum-exp and softmax run in
  float32 (a Triton kernel on CUDA, :mod:`.triton_ce`; PyTorch operations elsewhere).

``SPLATOPT_LINEAR_CE_IMPL`` (auto, fused, chunked) sets the default, e.g. to compare the two in a run.

Limits, by design: ``weight`` and ``bias`` are frozen (the decoder head is never trained here;
passing tensors that require grad raises). First order only: the gradient comes from the forward,
so differentiating it again (``create_graph=True``, meta-training through the inner loop) raises
in backward; use the materialized path there (``objective_terms(..., fused_ce=False)``).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

# float32 logits of one chunk; with the bf16 softmax-gradient copy and q a chunk holds ~1.6x this
CHUNK_LOGIT_BYTES = 256 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: float32 logits of at most ``CHUNK_LOGIT_BYTES``, a multiple of 64 (2176 at V = 30522)."""
    return max(64, CHUNK_LOGIT_BYTES // (4 * vocab_size) // 64 * 64)


IMPLS = ("auto", "fused", "chunked")
IMPL_ENV = "SPLATOPT_LINEAR_CE_IMPL"


def resolve_impl(impl: str | None, device: torch.device, compute_dtype: torch.dtype | None) -> str:
    """"fused" or "chunked" for ``impl`` (None: $SPLATOPT_LINEAR_CE_IMPL, else "auto") on ``device``.

    auto: fused on CUDA when the products are bf16/fp16 and triton is installed. fused insists
    (ValueError if it cannot run: other products, or no CUDA and no TRITON_INTERPRET=1).
    """
    from .fused import interpreting

    impl = impl or os.environ.get(IMPL_ENV) or "auto"
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy impl {impl!r}: choose among {', '.join(IMPLS)}")
    half = compute_dtype in (torch.bfloat16, torch.float16)
    triton_ok = importlib.util.find_spec("triton") is not None
    if impl == "auto":
        return "fused" if device.type == "cuda" and half and triton_ok else "chunked"
    if impl == "fused" and not (half and triton_ok and (device.type == "cuda" or interpreting())):
        raise ValueError(f"impl='fused' needs compute_dtype bf16/fp16 (got {compute_dtype}), triton, and a CUDA "
                         f"device (got {device}) or TRITON_INTERPRET=1")
    return impl


def _uses_triton(device: torch.device, acc: torch.dtype) -> bool:
    # the kernel takes float32 logits; float64 and CPU tensors take the PyTorch operations
    return device.type == "cuda" and acc == torch.float32 and importlib.util.find_spec("triton") is not None


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b in ``acc`` (float32/64) for operands in a compute dtype (float32/64, or bf16/fp16)."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and acc == torch.float32:
        # cuBLAS accumulates half-precision products in float32; out_dtype keeps the logits float32
        # rather than rounding them to bf16, which resolves only 1.0 at the decoder's logits of ~170
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(acc)


def _ce_rows_torch(logits: Tensor, bias: Tensor | None, ids: Tensor, need_grad: bool,
                   grad_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(loss [C], softmax minus one-hot [C, V] or None) of ``logits + bias``; works in place on ``logits``.

    As log_softmax, the loss is ``(max - x_t) + log sum exp(x - max)``, never ``lse - x_t``: the
    decoder's logits reach ~170, where float32 resolves 1.5e-5, while a well-decoded token's loss
    is 1e-12 — the difference of two rounded large numbers would be all rounding.
    """
    if bias is not None:
        logits.add_(bias)
    logits.sub_(logits.amax(-1, keepdim=True))  # x - max: exact for the logits near the max
    shifted_target = logits.gather(1, ids[:, None]).squeeze(1)
    e = logits.exp_()
    total = e.sum(-1)
    loss = total.log() - shifted_target
    if not need_grad:
        return loss, None
    p = e.div_(total[:, None])
    p.scatter_add_(1, ids[:, None], p.new_full((len(ids), 1), -1.0))
    return loss, p.to(grad_dtype)


def _chunked(q, weight, bias, ids, valid, row_weight, chunk_rows, acc, cdt, need_grad):
    """(ce [rows], grad [rows, d] or None) of the rows chunk by chunk (module notes), in ``acc``."""
    # padding rows are zeroed (NaN or inf there would reach the gradient through 0 * NaN) and
    # read id 0 (padding ids may lie outside the vocabulary); their losses are dropped below
    B, L, d = q.shape
    rows = B * L
    qf = torch.where(valid[:, None], q.reshape(rows, d), 0).to(cdt)
    idf = torch.where(valid, ids.reshape(rows), 0).long()
    w = weight.to(cdt)  # [V, d]: one cast per call, shared by every chunk
    b = None if bias is None else bias.to(acc).contiguous()
    ce = torch.empty(rows, device=q.device, dtype=acc)
    grad = torch.empty(rows, d, device=q.device, dtype=acc) if need_grad else None
    triton_rows = _uses_triton(q.device, acc)
    if triton_rows:
        from .triton_ce import ce_rows
    for r0 in range(0, rows, chunk_rows):
        r1 = min(r0 + chunk_rows, rows)
        logits = _mm(qf[r0:r1], w.T, acc)  # [c, V], the only chunk-sized tensors are this and p
        if triton_rows:
            ce[r0:r1], p = ce_rows(logits, b, idf[r0:r1], need_grad, cdt)
        else:
            ce[r0:r1], p = _ce_rows_torch(logits, b, idf[r0:r1], need_grad, cdt)
        if need_grad:
            # the per-row weight scales [c, d] after the product rather than p [c, V] before it
            grad[r0:r1] = _mm(p, w, acc) * row_weight[r0:r1, None]
        del logits, p  # free this chunk before the next one is allocated: one chunk alive at a time
    return ce, grad


def _fused(q, weight, bias, ids, valid, row_weight, cdt, need_grad):
    """(ce [rows] float32, grad [rows, d] float32 or None) from the one-sweep Triton kernel."""
    from .triton_linear_ce import fused_linear_ce, launch_config, pad_weight

    V, d = weight.shape
    cfg = launch_config(d, V)
    w, b = pad_weight(weight, bias, cfg, cdt)
    # valid rows first, counted on the device (no host sync): the kernel skips the blocks past them
    order = torch.argsort((~valid).to(torch.int8), stable=True).to(torch.int32)
    n_rows = valid.sum(dtype=torch.int32).reshape(1)
    return fused_linear_ce(q, w, b, V, ids, order, n_rows, row_weight.float(), need_grad, cfg)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, weight, bias, ids, mask, chunk_rows, compute_dtype, need_grad, impl):
        B, L, d = q.shape
        rows = B * L
        acc = torch.promote_types(q.dtype, torch.float32)
        cdt = compute_dtype or acc
        valid = mask.reshape(rows)
        count = mask.sum(-1).clamp_min(1).to(acc)  # [B] tokens per prompt
        row_weight = (mask.to(acc) / count[:, None]).reshape(rows)  # d loss_b / d ce_row
        if impl == "fused":
            ce, grad = _fused(q.reshape(rows, d), weight, bias, ids.reshape(rows), valid, row_weight, cdt, need_grad)
            ce = ce.to(acc)
            grad = grad.to(acc) if need_grad else None
        else:
            ce, grad = _chunked(q, weight, bias, ids, valid, row_weight, chunk_rows, acc, cdt, need_grad)
        loss = torch.where(mask, ce.view(B, L), 0.0).sum(-1) / count
        if need_grad:
            ctx.save_for_backward(grad.view(B, L, d))
            ctx.q_dtype = q.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # the engine enables grad mode in backward only for create_graph=True
            raise RuntimeError("linear_cross_entropy is first-order: its gradient is computed in the forward and "
                               "cannot be differentiated again (create_graph=True); use fused_ce=False there")
        (grad,) = ctx.saved_tensors
        grad_q = (grad * grad_loss.to(grad.dtype)[:, None, None]).to(ctx.q_dtype)
        return grad_q, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    q: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ids: Tensor,
    mask: Tensor,
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype | None = None,
    impl: str | None = None,
) -> Tensor:
    """Per-prompt mean cross-entropy [B] of ``q @ weight.T + bias`` against ``ids`` over ``mask``.

    q: [B, L, d] queries (the decoder's features of the field), differentiable. weight: [V, d] and
    bias: [V] (or None), frozen: they must not require grad. ids: [B, L] int64 target tokens, in
    [0, V) where ``mask`` is set; anything (-100, V + 5) at padding. mask: [B, L] bool; a prompt
    with no token gets 0. chunk_rows: rows (tokens) projected at once (default
    :func:`default_chunk_rows`: 256 MB of float32 logits). compute_dtype: dtype of the two matrix
    products' operands (None: q's dtype, at least float32; ``torch.bfloat16`` on CUDA for tensor
    cores, float32 accumulation); logits, log-sum-exp and softmax are float32 (float64 for float64 q).
    impl: "auto" (None: $SPLATOPT_LINEAR_CE_IMPL or auto), "fused" or "chunked" (see the module
    notes and :func:`resolve_impl`); chunk_rows applies to "chunked" only.

    Returns [B] in q's dtype promoted to at least float32 — what ``decode_cross_entropy`` returns
    for the materialized logits. Without grad mode or without ``q.requires_grad`` only the loss
    is computed (one product per chunk instead of two). First order only (see the module notes).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, L, d], got shape {tuple(q.shape)}")
    B, L, d = q.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be [V, d={d}], got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be [V={V}], got shape {tuple(bias.shape)}")
    if tuple(ids.shape) != (B, L) or tuple(mask.shape) != (B, L):
        raise ValueError(f"ids and mask must be [B={B}, L={L}], got {tuple(ids.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, not {mask.dtype}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    need_grad = torch.is_grad_enabled() and q.requires_grad
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("linear_cross_entropy keeps weight and bias frozen and gives them no gradient; "
                         "pass weight.detach() and bias.detach()")
    impl = resolve_impl(impl, q.device, compute_dtype)
    return _LinearCrossEntropy.apply(q, weight, bias, ids, mask, chunk_rows or default_chunk_rows(V), compute_dtype,
                                     need_grad, impl)
