"""Vocabulary projection + cross-entropy + its gradient wrt q in one Triton kernel; logits never leave the chip.

    cfg = launch_config(d, V); w, b = pad_weight(weight, bias, cfg, torch.bfloat16)
    loss, grad = fused_linear_ce(q, w, b, V, ids, rows, n_rows, scale, need_grad, cfg)

One program per block of ``BLOCK_M`` rows (tokens) sweeps the vocabulary once, ``BLOCK_V`` words
at a time — flash attention's forward with keys = values = W (head dim d = 384). Per tile:

    x    = W_tile @ q_blk^T + b_tile            [BLOCK_V, BLOCK_M] fp32 logits^T (bf16 operands, tensor cores)
    m    = running max of x per row             (rescaled lazily, see RESCALE)
    p    = exp(x - m), 0 at each row's target word
    s_o  = s_o * alpha + sum_v p                 the non-target mass
    acc  = acc * alpha + W_tile^T @ p            [d, BLOCK_M] fp32, p cast to bf16 for the product

and at the end, with the target logit x_t = q . W[id] + b[id] (computed once, before the sweep,
from the same bf16-rounded operands), e_t = exp(x_t - m) and s = s_o + e_t, all float32:

    loss = -log(e_t / s) = log1p(s_o / e_t)     (a series while s_o / e_t < 1e-2, else (m - x_t) + log s)
    grad = (acc - s_o W[id]) / s * scale        = (softmax - onehot) @ W, times the row's weight

Precision. The target is kept out of ``acc`` and ``s_o``: a well-decoded token has p_t = 1 - 1e-12,
which bf16 would round to 1 (and p_t = 0.999 to 0.998: an error as large as the gradient), while
``p_t - 1 = -s_o / s`` keeps float32 precision relative to the gradient itself. The loss is never
``lse - x_t`` (logits reach ~170, where float32 resolves 1.5e-5, while such a token's loss is
1e-12): it is log1p of the non-target mass relative to the target's, accurate to float32 relative
precision of the loss whatever the logits' size. x_t itself is off by float32 rounding of a
d-term sum (~1e-5 at 170), like every logit of the tile; only the (m - x_t) + log s branch, for
losses above 0.01, sees it as such.

Lazy rescaling (FlashAttention-4's trick): rescaling ``acc`` (d x BLOCK_M) costs as much per tile
as the softmax; the running max only moves when some row's tile max exceeds it by more than
RESCALE nats, so p <= e^8 ~ 3000 in between — no overflow, and all sums share the same stale m.

Memory traffic per call, R rows: q (R d 4 bytes, read once, cast to bf16 on chip), W in bf16
(23 MB at V = 30522, d = 384, L2-resident on an H100's 50 MB), loss (R 4) and grad (R d 4)
written once: ~125 MB at R = 32768, against ~12 GB for the chunked path's logits and softmax.
Each program streams all of W from L2, (R / BLOCK_M) x 23 MB in all: 24 GB at BLOCK_M = 32,
12 GB at 64 — the kernel's likely bound, as the two products need 1.5 TFLOP (1.5 ms at peak).

Block sizes (sm_90, checked by compiling with Triton's ptxas, see tune_ce): the accumulator is
BLOCK_M x d fp32 in registers — 96 KB at BLOCK_M = 64, i.e. 96 of each thread's 255 registers at
8 warps, 192 at 4 (spills); BLOCK_M = 128 cannot fit. Everything is transposed (words x rows)
because with 8 warps Triton splits the first of two chained products along its M dimension only:
a [rows, words] tile of 64 rows would be computed twice, once per warpgroup; as [words, rows] with
BLOCK_V >= 128 each warpgroup takes 64 words. The W tile [BLOCK_V, d] (96 KB bf16 at BLOCK_V =
128), loaded by TMA once per iteration, serves both products; double-buffered it is 192 KB of
shared memory, plus q^T (BLOCK_M x d bf16). The default, BLOCK_M = 64, BLOCK_V = 128, 8 warps,
1 stage (no prefetch, half the L2 traffic of BLOCK_M = 32), was the fastest on an H100 at
R = 32768, d = 384, V = 30522 (``python -m splatopt.kernels.tune_ce``): 7.05 ms against 7.40 ms
for BLOCK_M = 32 with 2 stages (225 KB of shared memory, no spills) and 13.06 ms for the chunked
path; ``SPLATOPT_LINEAR_CE_CONFIG`` overrides (see launch_config). d is covered by NUM_K <= 4 chunks of
BLOCK_K (3 x 128 at d = 384: d need not be a power of two), each with its own accumulator.

Rows: ``rows`` [R] lists the rows to score (valid ones first) and ``n_rows`` [1] (on the device:
no host sync) how many; blocks past it exit at once, so padding tokens cost nothing. Rows not
scored keep loss 0 and grad 0. An id outside [0, V) gives a NaN loss and gradient, never an
out-of-bounds read.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .fused import interpreting

RESCALE = 8.0  # nats the running max may lag behind the true one before acc, s_o are rescaled
MAX_NUM_K = 4  # d chunks (accumulators) the kernel unrolls
CONFIG_ENV = "SPLATOPT_LINEAR_CE_CONFIG"
_STAGES: dict = {}  # pipeline stages that fit, per device and configuration (see fused_linear_ce)


def _pow2(n: int, lo: int = 16) -> int:
    # tl.dot needs every block dimension >= 16
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def launch_config(d: int, V: int) -> dict:
    """Block sizes, warps and stages for width d and V words (reasons in the module docstring).

    ``SPLATOPT_LINEAR_CE_CONFIG='{"BLOCK_M": 64, "num_stages": 1}'`` overrides any
    of BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages; NUM_K = ceil(d / BLOCK_K) follows (<= 4).
    """
    # 128-wide d chunks (3 at d = 384); wider ones only where 4 would not cover d
    block_k = max(min(128, _pow2(d)), _pow2(-(-d // MAX_NUM_K)))
    cfg = {"BLOCK_M": 64, "BLOCK_V": min(128, _pow2(V)), "BLOCK_K": block_k, "num_warps": 8, "num_stages": 1}
    override = os.environ.get(CONFIG_ENV)
    if override:
        extra = json.loads(override)
        unknown = set(extra) - set(cfg)
        if unknown:
            raise ValueError(f"{CONFIG_ENV}: unknown keys {sorted(unknown)}")
        cfg.update(extra)
    cfg["NUM_K"] = -(-d // cfg["BLOCK_K"])
    if cfg["NUM_K"] > MAX_NUM_K or min(cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_K"]) < 16:
        raise ValueError(f"linear CE launch config {cfg} for d={d}: needs ceil(d / BLOCK_K) <= {MAX_NUM_K} "
                         "and every block >= 16")
    return cfg


# INTERPRET works around two bugs of Triton 3.9's CPU interpreter (tests only; the GPU never takes
# these branches): its tl.dot multiplies bf16 operands' raw uint16 bits, and its float32 -> bf16
# cast truncates where the GPU rounds to nearest even.


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b, float32 accumulation (float32 copies of bf16 values are exact: same products)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _half(x, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 x in dtype dt (bf16/fp16), rounded to nearest even."""
    if INTERPRET:
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)  # now exact in bf16: the truncating cast keeps it
    return x.to(dt)


@triton.jit
def _w_tile(w_desc, v0, K0: tl.constexpr):
    """W[v0:v0 + BLOCK_V, K0:K0 + BLOCK_K] through the tensor memory accelerator: straight into shared
    memory, no per-thread addresses in registers."""
    return w_desc.load([v0, K0])


@triton.jit
def _qt_tile(q_ptr, q_stride, rows, row_ok, d, K0: tl.constexpr, BLOCK_K: tl.constexpr, dt: tl.constexpr,
             INTERPRET: tl.constexpr):
    """q[rows, K0:K0 + BLOCK_K]^T [BLOCK_K, BLOCK_M] in the products' dtype, zero past d or the valid rows."""
    ks = K0 + tl.arange(0, BLOCK_K)
    tile = tl.load(q_ptr + rows[None, :] * q_stride + ks[:, None], mask=row_ok[None, :] & (ks[:, None] < d), other=0.0)
    return _half(tile.to(tl.float32), dt, INTERPRET)


@triton.jit
def _target_part(qt, w_ptr, w_stride, ids, ok, K0: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k q[r, k] W[id_r, k] over one d chunk [BLOCK_M], float32 sums of the products' rounded operands."""
    ks = K0 + tl.arange(0, BLOCK_K)
    w_t = tl.load(w_ptr + ids[None, :] * w_stride + ks[:, None], mask=ok[None, :], other=0.0)
    return tl.sum(qt.to(tl.float32) * w_t.to(tl.float32), 0)


@triton.jit
def _store_grad(grad_ptr, grad_stride, rows, row_ok, d, acc_t, s_o, inv_s, scale, w_ptr, w_stride, ids, in_vocab,
                K0: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad[rows, K0:K0 + BLOCK_K] = (acc - s_o W[id]) / s * scale from acc^T [BLOCK_K, BLOCK_M]; W[id] as the
    products saw it (rounded to bf16), so that a well-decoded row's two terms cancel as they should."""
    ks = K0 + tl.arange(0, BLOCK_K)
    k_ok = ks[:, None] < d
    w_t = tl.load(w_ptr + ids[None, :] * w_stride + ks[:, None], mask=(row_ok & in_vocab)[None, :], other=0.0)
    g = (acc_t - s_o[None, :] * w_t.to(tl.float32)) * (inv_s * scale)[None, :]
    tl.store(grad_ptr + rows[None, :] * grad_stride + ks[:, None], g, mask=row_ok[None, :] & k_ok)


@triton.jit
def linear_ce_kernel(
    q_ptr, q_stride, w_desc, w_ptr, w_stride, bias_ptr, ids_ptr, rows_ptr, n_ptr, scale_ptr, loss_ptr, grad_ptr, grad_stride,
    V, d, NEED_GRAD: tl.constexpr, RESCALE_AT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
):
    # Everything is transposed (words x rows, d x rows) so that both products' wide dimension (BLOCK_V
    # words, then BLOCK_K of d) is the tensor cores' M: at BLOCK_M = 64 rows and 8 warps, a [rows,
    # words] logits tile would be computed twice, once per warpgroup (Triton splits the first of two
    # chained products along M only).
    n = tl.load(n_ptr)
    start = tl.program_id(0) * BLOCK_M
    if start >= n:  # a block of padding rows only
        return
    offs = start + tl.arange(0, BLOCK_M)
    row_ok = offs < n
    rows = tl.load(rows_ptr + offs, mask=row_ok, other=0).to(tl.int64)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    in_vocab = (ids >= 0) & (ids < V)
    ids = tl.where(in_vocab, ids, -1).to(tl.int32)  # int32 compares in the loop; -1 matches no word
    dt = w_ptr.dtype.element_ty
    # q^T stays on chip for the whole sweep: NUM_K chunks of [BLOCK_K, BLOCK_M]
    # and gives the target logits x_t, once, outside the loop (see the module notes on their precision)
    ok = row_ok & in_vocab
    x_t = tl.load(bias_ptr + ids, mask=ok, other=float("nan"))  # NaN: an id outside the vocabulary
    q0 = _qt_tile(q_ptr, q_stride, rows, row_ok, d, 0, BLOCK_K, dt, INTERPRET)
    x_t += _target_part(q0, w_ptr, w_stride, ids, ok, 0, BLOCK_K)
    if NUM_K > 1:
        q1 = _qt_tile(q_ptr, q_stride, rows, row_ok, d, BLOCK_K, BLOCK_K, dt, INTERPRET)
        x_t += _target_part(q1, w_ptr, w_stride, ids, ok, BLOCK_K, BLOCK_K)
    if NUM_K > 2:
        q2 = _qt_tile(q_ptr, q_stride, rows, row_ok, d, 2 * BLOCK_K, BLOCK_K, dt, INTERPRET)
        x_t += _target_part(q2, w_ptr, w_stride, ids, ok, 2 * BLOCK_K, BLOCK_K)
    if NUM_K > 3:
        q3 = _qt_tile(q_ptr, q_stride, rows, row_ok, d, 3 * BLOCK_K, BLOCK_K, dt, INTERPRET)
        x_t += _target_part(q3, w_ptr, w_stride, ids, ok, 3 * BLOCK_K, BLOCK_K)
    acc0 = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)  # sum_v p[v, r] W[v, k]: the gradient^T, chunk by chunk
    acc1 = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
    acc3 = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_o = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        # the W tile is loaded once and serves both products (as W for the logits, W^T for the gradient)
        w0 = _w_tile(w_desc, v0, 0)
        x = _dot(w0, q0, tl.zeros((BLOCK_V, BLOCK_M), tl.float32), INTERPRET)  # logits^T [BLOCK_V, BLOCK_M]
        if NUM_K > 1:
            w1 = _w_tile(w_desc, v0, BLOCK_K)
            x = _dot(w1, q1, x, INTERPRET)
        if NUM_K > 2:
            w2 = _w_tile(w_desc, v0, 2 * BLOCK_K)
            x = _dot(w2, q2, x, INTERPRET)
        if NUM_K > 3:
            w3 = _w_tile(w_desc, v0, 3 * BLOCK_K)
            x = _dot(w3, q3, x, INTERPRET)
        x += tl.load(bias_ptr + cols)[:, None]  # -inf past V: those words drop out of max and sums
        m_new = tl.maximum(m, tl.max(x, 0))
        if tl.max(m_new - m, 0) > RESCALE_AT:  # first tile (m = -inf) included
            alpha = tl.exp(m - m_new)
            s_o *= alpha
            if NEED_GRAD:
                acc0 *= alpha[None, :]
                if NUM_K > 1:
                    acc1 *= alpha[None, :]
                if NUM_K > 2:
                    acc2 *= alpha[None, :]
                if NUM_K > 3:
                    acc3 *= alpha[None, :]
            m = m_new
        # the target's share is left out here and added back exactly at the end
        p = tl.where(cols[:, None] == ids[None, :], 0.0, tl.exp(x - m[None, :]))
        s_o += tl.sum(p, 0)
        if NEED_GRAD:
            p = _half(p, dt, INTERPRET)
            acc0 = _dot(tl.trans(w0), p, acc0, INTERPRET)
            if NUM_K > 1:
                acc1 = _dot(tl.trans(w1), p, acc1, INTERPRET)
            if NUM_K > 2:
                acc2 = _dot(tl.trans(w2), p, acc2, INTERPRET)
            if NUM_K > 3:
                acc3 = _dot(tl.trans(w3), p, acc3, INTERPRET)
    e_t = tl.exp(x_t - m)
    s = s_o + e_t
    u = s_o / e_t  # the non-target mass relative to the target's: loss = log1p(u)
    series = u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * 0.25)))  # log1p(u) to < u^5 / 5 for u < 1e-2
    loss = tl.where(u < 1e-2, series, (m - x_t) + tl.log(s))
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    if NEED_GRAD:
        inv_s = 1.0 / s
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        _store_grad(grad_ptr, grad_stride, rows, row_ok, d, acc0, s_o, inv_s, scale, w_ptr, w_stride, ids, in_vocab, 0, BLOCK_K)
        if NUM_K > 1:
            _store_grad(grad_ptr, grad_stride, rows, row_ok, d, acc1, s_o, inv_s, scale, w_ptr, w_stride, ids, in_vocab,
                        BLOCK_K, BLOCK_K)
        if NUM_K > 2:
            _store_grad(grad_ptr, grad_stride, rows, row_ok, d, acc2, s_o, inv_s, scale, w_ptr, w_stride, ids, in_vocab,
                        2 * BLOCK_K, BLOCK_K)
        if NUM_K > 3:
            _store_grad(grad_ptr, grad_stride, rows, row_ok, d, acc3, s_o, inv_s, scale, w_ptr, w_stride, ids, in_vocab,
                        3 * BLOCK_K, BLOCK_K)


def pad_weight(weight: Tensor, bias: Tensor | None, cfg: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(W [V_pad, NUM_K BLOCK_K] in ``dtype``, zero-padded; bias [V_pad] float32, -inf past V): the
    kernel's operands, padded so that its loop loads whole tiles without masks. One copy per call
    (23 MB at V = 30522, d = 384), where the chunked path casts W anyway."""
    V, d = weight.shape
    v_pad = -(-V // cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    w = weight.new_zeros(v_pad, cfg["NUM_K"] * cfg["BLOCK_K"], dtype=dtype)
    w[:V, :d] = weight
    b = torch.full((v_pad,), float("-inf"), device=weight.device, dtype=torch.float32)
    b[:V] = 0.0 if bias is None else bias
    return w, b


def fused_linear_ce(
    q: Tensor, w: Tensor, bias: Tensor, V: int, ids: Tensor, rows: Tensor, n_rows: Tensor, scale: Tensor,
    need_grad: bool, cfg: dict,
) -> tuple[Tensor, Tensor | None]:
    """(loss [R] float32, grad [R, d] float32 or None) of the rows listed in ``rows[:n_rows]``; 0 elsewhere.

    q: [R, d] (any float dtype; cast to ``w``'s dtype on chip). w, bias: :func:`pad_weight`'s, for
    the same ``cfg`` (launch_config(d, V)). V: the vocabulary size before padding. ids: [R] int64
    targets. rows: [R] int32 row indices, the ones to score first. n_rows: [1] int32 on the
    device, how many of ``rows`` to score. scale: [R] float32 factor of each row's gradient (its
    weight in the per-prompt mean). A configuration that needs more shared memory than the device
    has (Triton's OutOfResources) is retried with one pipeline stage less.
    """
    R, d = q.shape
    if w.dtype not in (torch.bfloat16, torch.float16) or tuple(w.shape) != (bias.shape[0], cfg["NUM_K"] * cfg["BLOCK_K"]):
        raise ValueError(f"w {w.dtype} {tuple(w.shape)} is not pad_weight's for this config and d={d}")
    if w.numel() >= 2**31:
        raise ValueError(f"W [{w.shape[0]}, {w.shape[1]}] is too large for the kernel's int32 offsets")
    if q.stride(1) != 1:
        q = q.contiguous()
    loss = torch.zeros(R, device=q.device, dtype=torch.float32)
    grad = torch.zeros(R, d, device=q.device, dtype=torch.float32) if need_grad else None
    g = grad if grad is not None else loss  # an unused pointer without NEED_GRAD
    desc = TensorDescriptor.from_tensor(w, [cfg["BLOCK_V"], cfg["BLOCK_K"]])
    args = (q, q.stride(0), desc, w, w.stride(0), bias, ids.contiguous(), rows.contiguous(), n_rows,
            scale.contiguous(), loss, g, g.stride(0) if need_grad else 0, V, d)
    key = (q.device, need_grad, *sorted(cfg.items()))
    stages = _STAGES.get(key, cfg["num_stages"])
    while True:
        try:
            linear_ce_kernel[(triton.cdiv(R, cfg["BLOCK_M"]),)](
                *args, NEED_GRAD=need_grad, RESCALE_AT=RESCALE, INTERPRET=interpreting(),
                BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], NUM_K=cfg["NUM_K"],
                num_warps=cfg["num_warps"], num_stages=stages,
            )
            _STAGES[key] = stages
            return loss, grad
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            warnings.warn(f"linear CE kernel {cfg}: out of GPU resources, retrying with num_stages={stages}", stacklevel=2)
