"""Triton kernel of the row-wise cross-entropy of one chunk of logits, and its softmax gradient.

One program per row ``r`` of a logits chunk ``x [C, V]`` (float32, as the vocabulary projection
wrote it, bias not yet added):

    pass 1   m, s = online max and sum of exp(x[r] + b - m)
             loss[r] = (m - x[r, id_r] - b[id_r]) + log s
    pass 2   g[r, :] = exp((x[r] + b - m) - log s) - onehot(id_r)   (softmax minus one-hot)

in float32 whatever ``g``'s dtype (bfloat16 feeds the tensor-core product ``g @ W``; float32 may
overwrite ``x`` in place). The loss is never formed as ``lse - x_t``: logits reach ~170, where
float32 resolves 1.5e-5, while a well-decoded token's loss is 1e-12 (as in log_softmax).

Pass 2 re-reads the row right after pass 1 read it (120 KB at V = 30522: L2-resident in
practice), so the chunk costs one write of ``x`` by the matrix product, about one read here and
one write of ``g`` — against the 5-7 full [C, V] passes of separate PyTorch operations (bias add,
max, exp, sum, scatter, cast), which bound the speed of the decode-aware step once the products
run on tensor cores.

The caller maps masked rows' ids to 0 beforehand; an id outside [0, V) in a row still gives a NaN
loss rather than reading out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK_V = 32768  # one [BLOCK_V] tile covers a 30522-word vocabulary; larger vocabularies loop


@triton.jit
def ce_rows_kernel(
    x_ptr, x_stride, bias_ptr, ids_ptr, loss_ptr, g_ptr, g_stride, V,
    HAS_BIAS: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    target = tl.load(ids_ptr + row)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inside = offs < V
        x = tl.load(x_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    log_s = tl.log(s)
    in_vocab = (target >= 0) & (target < V)
    x_t = tl.load(x_row + target, mask=in_vocab, other=float("nan")).to(tl.float32)
    if HAS_BIAS:
        x_t += tl.load(bias_ptr + target, mask=in_vocab, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, (m - x_t) + log_s)
    if NEED_GRAD:
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inside = offs < V
            x = tl.load(x_row + offs, mask=inside, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp((x - m) - log_s)
            p = tl.where(offs == target, p - 1.0, p)
            tl.store(g_row + offs, p.to(g_ptr.dtype.element_ty), mask=inside)


def ce_rows(
    logits: Tensor, bias: Tensor | None, ids: Tensor, need_grad: bool, grad_dtype: torch.dtype,
    block_v: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(loss [C] float32, softmax minus one-hot [C, V] in ``grad_dtype`` or None) of ``logits + bias``.

    logits: [C, V] float32 with unit stride along V; overwritten by the gradient when
    ``grad_dtype`` is float32 (the caller no longer needs it). bias: [V] or None. ids: [C] int64 in
    [0, V). block_v: the tile width (default: the vocabulary's power of two, at most 32768; tests
    pass small ones to exercise the loop).
    """
    C, V = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"ce_rows takes float32 logits with unit stride along V (got {logits.dtype}, strides {logits.stride()})")
    block = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(V))
    loss = torch.empty(C, device=logits.device, dtype=torch.float32)
    grad = None
    if need_grad:
        grad = logits if grad_dtype == torch.float32 else torch.empty(C, V, device=logits.device, dtype=grad_dtype)
    g = grad if grad is not None else logits  # an unused pointer when NEED_GRAD is off
    ce_rows_kernel[(C,)](
        logits, logits.stride(0), bias if bias is not None else logits, ids.contiguous(), loss, g, g.stride(0), V,
        HAS_BIAS=bias is not None, NEED_GRAD=need_grad, BLOCK_V=block,
        # a 32768-wide tile is 32 floats per thread at 32 warps (Liger's choice for the same loop)
        num_warps=32 if block >= 8192 else 8 if block >= 1024 else 4,
    )
    return loss, grad
