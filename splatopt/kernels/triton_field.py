"""Triton kernels of the fused field loss: render, loss and gradients in one pass, no field in memory.

One program per prompt ``b`` (and, for the MSE alone, per slice ``s`` of the embedding width:
grid ``(B, S)``). The program keeps its prompt's splat geometry in registers and walks the field
in tiles ``[BLOCK_L tokens, BLOCK_D dims]``:

    a[t, i] = on_i * sigmoid(wl_i) * exp(-0.5 (t - mu_i)^2 / sigma_i^2)      [BLOCK_L, BLOCK_N]
    F = a @ V                                                                 [BLOCK_L, BLOCK_D]
    dL/dV += a^T @ dL/dF ,   dL/da = dL/dF @ V^T                              [BLOCK_N, BLOCK_D], [BLOCK_L, BLOCK_N]

and reduces dL/da into the geometry gradients at once (they are linear in dL/da), so neither
``F`` nor ``a`` nor ``dL/da`` ever reaches global memory. ``a`` is recomputed per tile (a few
exps per token and splat) rather than stored: recomputing is cheaper than moving it.

MSE alone (``HAS_COS = False``): a single sweep, d-tiles outer, token tiles inner, reads the
target once. dL/dF = 2 (F - T) / ref needs ref = sum |T|^2, known only at the end, so the kernel
writes gradients *without* the per-prompt factor 2 w_mse / ref and the caller applies it together
with the incoming gradient (one multiply it needs anyway).

With a cosine term (``HAS_COS = True``, S = 1): the cosine's gradient at token t needs |F_t|,
|T_t| and F_t . T_t over the whole width first. Sweep 1 (token tiles outer) reduces them and
keeps two scalars per token in a small scratch buffer [B, L, 2]; sweep 2 (d-tiles outer) forms
dL/dF and the gradients, final up to the incoming gradient. Sweep 2 reads the prompt's target
again, right after sweep 1 read it (L2-resident in practice: 96 KB per prompt at L=64, d=384).

Units: positions and mu in tokens, sigma in tokens, everything accumulated in float32 whatever
the target's dtype (fp32, bf16, fp16).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _splat_tile(l0, mu, inv_s2, w, BLOCK_L: tl.constexpr):
    """Coefficients a [BLOCK_L, BLOCK_N] and offsets x = t - mu [BLOCK_L, BLOCK_N] of tokens l0.. .

    mu, inv_s2 (1 / sigma^2), w (sigmoid weight times the slot mask): [BLOCK_N] float32.
    Rows at or beyond the prompt's length are meaningless; callers drop them through the token mask.
    """
    pos = (l0 + tl.arange(0, BLOCK_L)).to(tl.float32)
    x = pos[:, None] - mu[None, :]
    a = w[None, :] * tl.exp(-0.5 * x * x * inv_s2[None, :])
    return a, x


@triton.jit
def _v_tile(v_base, stride_vn, offs_n, n_ok, on, offs_d, d_ok):
    """Embeddings V [BLOCK_N, BLOCK_D] float32; inactive slots read as 0 (selected: they may hold NaN)."""
    V = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    return tl.where(on[:, None], V.to(tl.float32), 0.0)


@triton.jit
def _tokens(m_ptr, l0, L, BLOCK_L: tl.constexpr):
    """Offsets [BLOCK_L] of tokens l0.. and their mask (False beyond L and at padding)."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    return offs_l, tl.load(m_ptr + offs_l, mask=offs_l < L, other=0) != 0


@triton.jit
def _t_tile(t_base, stride_tl, offs_l, m, offs_d, d_ok):
    """Target T [BLOCK_L, BLOCK_D] as float32; padding is never read (bandwidth, and it may hold NaN)."""
    T = tl.load(t_base + offs_l[:, None] * stride_tl + offs_d[None, :], mask=m[:, None] & d_ok[None, :], other=0.0)
    return T.to(tl.float32)


@triton.jit
def _backprop_tile(G, a, x, V, gv, acc_mu, acc_ls, acc_w, PRECISION: tl.constexpr):
    """Add a tile's dL/dF = G [BLOCK_L, BLOCK_D] into dL/dv [BLOCK_N, BLOCK_D] (a^T G) and the geometry
    sums [BLOCK_N] of P = dL/da * a, dL/da = G V^T: sum_t P x, sum_t P x^2, sum_t P."""
    gv += tl.dot(tl.trans(a), G, input_precision=PRECISION)
    P = tl.dot(G, tl.trans(V), input_precision=PRECISION) * a
    return gv, acc_mu + tl.sum(P * x, axis=0), acc_ls + tl.sum(P * x * x, axis=0), acc_w + tl.sum(P, axis=0)


@triton.jit
def _geometry(mu_ptr, ls_ptr, wl_ptr, on_ptr, b, N, offs_n, n_ok, log_sigma_min, log_sigma_max):
    """Prompt b's splats [BLOCK_N]: (active, mu, 1/sigma^2, d clamp / d log_sigma, sigmoid(weight_logit), weight)."""
    on = tl.load(on_ptr + b * N + offs_n, mask=n_ok, other=0) != 0
    # inactive slots may hold NaN or inf: select, never multiply, so they give exactly 0 (render.py)
    mu = tl.where(on, tl.load(mu_ptr + b * N + offs_n, mask=n_ok, other=0.0).to(tl.float32), 0.0)
    ls = tl.where(on, tl.load(ls_ptr + b * N + offs_n, mask=n_ok, other=0.0).to(tl.float32), 0.0)
    wl = tl.where(on, tl.load(wl_ptr + b * N + offs_n, mask=n_ok, other=0.0).to(tl.float32), 0.0)
    ls_c = tl.minimum(tl.maximum(ls, log_sigma_min), log_sigma_max)
    # torch.clamp passes the gradient where min <= x <= max (inclusive)
    ls_free = ((ls >= log_sigma_min) & (ls <= log_sigma_max)).to(tl.float32)
    sig = tl.sigmoid(wl)
    return on, mu, tl.exp(-2.0 * ls_c), ls_free, sig, tl.where(on, sig, 0.0)


@triton.jit
def field_loss_kernel(
    mu_ptr, ls_ptr, wl_ptr, on_ptr,  # [B, N] contiguous; on: uint8 slot mask
    v_ptr, stride_vb, stride_vn,  # [B, N, D], unit stride along D
    t_ptr, stride_tb, stride_tl,  # target [B, L, D], unit stride along D
    m_ptr, stride_mb,  # token mask [B, L] uint8, unit stride along L
    gv_ptr,  # out [B, N, D] contiguous: dL/dv (times 1 / post-scale, see module docstring)
    geom_ptr,  # out [B, S, 3, BLOCK_N] float32: partial dL/dmu, dL/dlog_sigma, dL/dweight_logit
    stats_ptr,  # out [B, S, 4] float32: partial sum |F-T|^2, sum |T|^2, sum_t cos_t, tokens
    scratch_ptr,  # [B, L_pad, 2] float32, cosine sweep 1 -> sweep 2 (unused without HAS_COS)
    N, L, D, S, L_pad,
    log_sigma_min, log_sigma_max, w_mse, w_cos, cos_eps,
    HAS_COS: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride overflows int32 at B=8192, L=512, d=512
    s = tl.program_id(1)

    # ---- the prompt's splat geometry, [BLOCK_N] in registers for the whole program
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    on, mu, inv_s2, ls_free, sig, w = _geometry(mu_ptr, ls_ptr, wl_ptr, on_ptr, b, N, offs_n, n_ok,
                                                log_sigma_min, log_sigma_max)

    acc_mu = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_t dL/da * a * x
    acc_ls = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_t dL/da * a * x^2
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_t dL/da * a
    err_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    ref_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    cos_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    cnt_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    v_base = v_ptr + b * stride_vb
    t_base = t_ptr + b * stride_tb
    m_base = m_ptr + b * stride_mb
    gv_base = gv_ptr + b * N * D

    if not HAS_COS:
        # ---- MSE: one sweep, this program's d-tiles outer, token tiles inner; target read once
        for d0 in range(s * BLOCK_D, D, S * BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            V = _v_tile(v_base, stride_vn, offs_n, n_ok, on, offs_d, d_ok)
            gv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                offs_l, m = _tokens(m_base, l0, L, BLOCK_L)
                T = _t_tile(t_base, stride_tl, offs_l, m, offs_d, d_ok)
                a, x = _splat_tile(l0, mu, inv_s2, w, BLOCK_L)
                R = tl.where(m[:, None], tl.dot(a, V, input_precision=PRECISION) - T, 0.0)
                err_acc += tl.sum(R * R, axis=1)
                ref_acc += tl.sum(T * T, axis=1)
                if NEED_GRAD:
                    # unscaled: dL/dF = (2 w_mse / ref) R, the factor is applied by the caller
                    gv, acc_mu, acc_ls, acc_w = _backprop_tile(R, a, x, V, gv, acc_mu, acc_ls, acc_w, PRECISION)
            if NEED_GRAD:
                tl.store(gv_base + offs_n[:, None] * D + offs_d[None, :], gv.to(gv_ptr.dtype.element_ty),
                         mask=n_ok[:, None] & d_ok[None, :])
    else:
        # ---- sweep 1: per-token reductions over the whole width (token tiles outer)
        for l0 in range(0, L, BLOCK_L):
            offs_l, m = _tokens(m_base, l0, L, BLOCK_L)
            a, x = _splat_tile(l0, mu, inv_s2, w, BLOCK_L)
            ff = tl.zeros([BLOCK_L], dtype=tl.float32)
            tt = tl.zeros([BLOCK_L], dtype=tl.float32)
            ft = tl.zeros([BLOCK_L], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                V = _v_tile(v_base, stride_vn, offs_n, n_ok, on, offs_d, d_ok)
                T = _t_tile(t_base, stride_tl, offs_l, m, offs_d, d_ok)
                F = tl.where(m[:, None], tl.dot(a, V, input_precision=PRECISION), 0.0)
                R = F - T
                err_acc += tl.sum(R * R, axis=1)
                ff += tl.sum(F * F, axis=1)
                tt += tl.sum(T * T, axis=1)
                ft += tl.sum(F * T, axis=1)
            ref_acc += tt
            # torch.cosine_similarity: each norm clamped to >= eps (mean_cosine in objectives.py)
            nf_raw = tl.sqrt(ff)
            nf = tl.maximum(nf_raw, cos_eps)
            nt = tl.maximum(tl.sqrt(tt), cos_eps)
            cos_acc += tl.where(m, ft / (nf * nt), 0.0)
            cnt_acc += m.to(tl.float32)
            if NEED_GRAD:
                # d cos_t / dF_t = r1 T_t - r2 F_t (the clamp is outside autograd in torch, and
                # d|F|/dF = F/|F| is taken as 0 at F = 0, as torch's norm backward does)
                r1 = 1.0 / (nf * nt)
                r2 = tl.where(nf_raw > 0, ft / (nf * nf * nt * tl.where(nf_raw > 0, nf_raw, 1.0)), 0.0)
                sc = scratch_ptr + (b * L_pad + offs_l) * 2
                tl.store(sc, r1)
                tl.store(sc + 1, r2)
        if NEED_GRAD:
            tl.debug_barrier()  # sweep 1's scratch stores, by other threads, visible to sweep 2
            c1 = 2.0 * w_mse / tl.maximum(tl.sum(ref_acc, axis=0), 1.1754943508222875e-38)  # fused.REF_MIN
            k = w_cos / tl.maximum(tl.sum(cnt_acc, axis=0), 1.0)
            # ---- sweep 2: dL/dF = (c1 + k r2) F + (-k r1 - c1) T on valid tokens; d-tiles outer
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                V = _v_tile(v_base, stride_vn, offs_n, n_ok, on, offs_d, d_ok)
                gv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                for l0 in range(0, L, BLOCK_L):
                    offs_l, m = _tokens(m_base, l0, L, BLOCK_L)
                    T = _t_tile(t_base, stride_tl, offs_l, m, offs_d, d_ok)
                    sc = scratch_ptr + (b * L_pad + offs_l) * 2
                    r1 = tl.load(sc)
                    r2 = tl.load(sc + 1)
                    a, x = _splat_tile(l0, mu, inv_s2, w, BLOCK_L)
                    F = tl.dot(a, V, input_precision=PRECISION)
                    G = tl.where(m[:, None], (c1 + k * r2)[:, None] * F - (k * r1 + c1)[:, None] * T, 0.0)
                    gv, acc_mu, acc_ls, acc_w = _backprop_tile(G, a, x, V, gv, acc_mu, acc_ls, acc_w, PRECISION)
                tl.store(gv_base + offs_n[:, None] * D + offs_d[None, :], gv.to(gv_ptr.dtype.element_ty),
                         mask=n_ok[:, None] & d_ok[None, :])

    # ---- per-program results: loss statistics and the geometry gradients (chain rule applied)
    st = stats_ptr + (b * S + s) * 4
    tl.store(st, tl.sum(err_acc, axis=0))
    tl.store(st + 1, tl.sum(ref_acc, axis=0))
    tl.store(st + 2, tl.sum(cos_acc, axis=0))
    tl.store(st + 3, tl.sum(cnt_acc, axis=0))
    if NEED_GRAD:
        # da/dmu = a x / sigma^2, da/dlog_sigma = a x^2 / sigma^2, da/dlogit = a (1 - sigmoid)
        gb = geom_ptr + (b * S + s) * 3 * BLOCK_N + offs_n
        tl.store(gb, acc_mu * inv_s2)
        tl.store(gb + BLOCK_N, acc_ls * inv_s2 * ls_free)
        tl.store(gb + 2 * BLOCK_N, acc_w * (1.0 - sig))
