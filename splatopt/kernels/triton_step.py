"""Triton kernels of the fused inner step: render + relative MSE + backward + Adam, two launches.

Kernel 1, ``step_v_kernel``, grid ``(B, S)``: program ``(b, s)`` walks its prompt's d-tiles
``s, s + S, ...`` as the fused loss does (``triton_field``): for each tile it renders
``F = a @ V``, forms ``R = F - T`` on valid tokens, and accumulates ``dL/dV = c_b a^T R`` and the
geometry sums. When the prompt fits one token tile (``ONE_TILE``: L <= BLOCK_L, every prompt of
up to 64 tokens) the coefficients ``a`` are computed once and the d-tiles are the only loop. As soon as a d-tile's ``dL/dV`` is complete it takes Adam's step on that tile —
reading the old ``v``, first and second moments and writing the new ones — so neither the field
nor the gradient of ``v`` ever reaches memory. That is why the per-prompt scale
``c_b = 2 w_mse / sum|T_b|^2`` comes in precomputed (the target is fixed during a fit): the
single-sweep loss kernel only learns it at the end. Its bytes are the roofline's own: the target
once, and ``v`` with its two moments read and written once.

Kernel 2, ``step_geometry_kernel``, grid ``(B,)``: sums the S partial geometry gradients,
applies Adam to mu, log_sigma and weight_logit ([B, N]: a few KB), and enforces the per-prompt
NaN guard of ``optim.adam_step``: a prompt with any non-finite gradient keeps its parameters and
moments. Kernel 1 has by then already written that prompt's new ``v`` tiles (it cannot know the
geometry gradients in advance), so kernel 2 copies the prompt's old ``v`` and moments back over
them — a rare path whose cost only flagged prompts pay.

Learning rates and Adam's bias corrections come from a schedule row in device memory, chosen by
a step counter in device memory: a step then reads nothing from the host, and a CUDA graph
captured once replays every step of a fit (``step.FusedAdamLoop``).

Units as in ``triton_field``: tokens for mu and sigma; all arithmetic in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_field import _backprop_tile, _geometry, _splat_tile, _t_tile, _tokens


@triton.jit
def _adam(p, m, s, g, lr, b1, b2, eps, eps_root, bc1, bc2):
    """Adam on one tile, as ``optim.adam_step``: (new p, new first moment, new second moment)."""
    m_new = b1 * m + (1.0 - b1) * g
    s_new = b2 * s + (1.0 - b2) * g * g
    update = lr * (m_new / bc1) / (tl.sqrt(s_new / bc2 + eps_root) + eps)
    return p - update, m_new, s_new


@triton.jit
def step_v_kernel(
    mu_ptr, ls_ptr, wl_ptr, on_ptr,  # [B, N] contiguous, on: uint8 slot mask
    v_ptr, mv_ptr, sv_ptr,  # [B, N, D] contiguous: v and its Adam moments before the step
    v_out, mv_out, sv_out,  # [B, N, D] contiguous: after the step
    t_ptr, stride_tb, stride_tl,  # target [B, L, D], unit stride along D
    m_ptr, stride_mb,  # token mask [B, L] uint8, unit stride along L
    coef_ptr,  # [B] float32: 2 w_mse / sum|T|^2, dL_b/dF = coef_b (F - T)
    vscale_ptr,  # [B] float32: each prompt's factor on the embedding learning rate (the target's RMS)
    sched_ptr, step_ptr,  # [steps, 6] float32 schedule rows (SCHEDULE_COLUMNS), int32 [1]: the row of this step
    free_ptr,  # [B, N] float32: 1 for slots that may change, 0 for frozen ones (read only if HAS_FREE)
    geom_ptr,  # out [B, S, 3, BLOCK_N] float32: partial dL/dmu, dL/dlog_sigma, dL/dweight_logit
    bad_ptr,  # out [B, S] float32: count of non-finite v-gradients
    N, L, D, S,
    log_sigma_min, log_sigma_max, b1, b2, eps, eps_root,
    HAS_FREE: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)

    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    on, mu, inv_s2, ls_free, sig, w = _geometry(mu_ptr, ls_ptr, wl_ptr, on_ptr, b, N, offs_n, n_ok,
                                                log_sigma_min, log_sigma_max)
    coef = tl.load(coef_ptr + b)
    row = sched_ptr + tl.load(step_ptr) * 6
    bc1 = tl.load(row + 4)
    bc2 = tl.load(row + 5)
    lr = tl.load(row + 3) * tl.load(vscale_ptr + b) + tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_FREE:
        lr = lr * tl.load(free_ptr + b * N + offs_n, mask=n_ok, other=0.0)

    acc_mu = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_ls = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_base = t_ptr + b * stride_tb
    m_base = m_ptr + b * stride_mb
    pb = b * N * D
    if ONE_TILE:
        # all tokens in one tile: the coefficients are loop invariants and the d-tiles the only
        # loop, which the compiler can pipeline (the next tile's loads in flight during this one's
        # products); G V^T accumulates across tiles and meets ``a`` once, after the sweep
        offs_l, m = _tokens(m_base, 0, L, BLOCK_L)
        a, _ = _splat_tile(0, mu, inv_s2, w, BLOCK_L)
        gvt = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    for d0 in range(s * BLOCK_D, D, S * BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        offs = pb + offs_n[:, None] * D + offs_d[None, :]
        ok = n_ok[:, None] & d_ok[None, :]
        # every load of the tile issued together: one memory latency per tile, not two
        p_old = tl.load(v_ptr + offs, mask=ok, other=0.0)
        m_old = tl.load(mv_ptr + offs, mask=ok, other=0.0)
        s_old = tl.load(sv_ptr + offs, mask=ok, other=0.0)
        V = tl.where(on[:, None], p_old, 0.0)  # inactive slots may hold NaN (_v_tile)
        if ONE_TILE:
            T = _t_tile(t_base, stride_tl, offs_l, m, offs_d, d_ok)
            R = tl.where(m[:, None], tl.dot(a, V, input_precision=PRECISION) - T, 0.0)
            gv = tl.dot(tl.trans(a), R, input_precision=PRECISION)
            gvt = tl.dot(R, tl.trans(V), gvt, input_precision=PRECISION)
        else:
            gv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                offs_l, m = _tokens(m_base, l0, L, BLOCK_L)
                T = _t_tile(t_base, stride_tl, offs_l, m, offs_d, d_ok)
                a, x = _splat_tile(l0, mu, inv_s2, w, BLOCK_L)
                R = tl.where(m[:, None], tl.dot(a, V, input_precision=PRECISION) - T, 0.0)
                gv, acc_mu, acc_ls, acc_w = _backprop_tile(R, a, x, V, gv, acc_mu, acc_ls, acc_w, PRECISION)
        g = gv * coef
        bad += tl.sum(tl.where(tl.abs(g) < float("inf"), 0.0, 1.0), axis=1)  # NaN fails the comparison too
        p_new, m_new, s_new = _adam(p_old, m_old, s_old, g, lr[:, None], b1, b2, eps, eps_root, bc1, bc2)
        tl.store(v_out + offs, p_new, mask=ok)
        tl.store(mv_out + offs, m_new, mask=ok)
        tl.store(sv_out + offs, s_new, mask=ok)

    if ONE_TILE:
        a, x = _splat_tile(0, mu, inv_s2, w, BLOCK_L)  # recomputed: cheaper than registers held through the sweep
        P = gvt * a  # dL/da * a, up to coef
        acc_mu = tl.sum(P * x, axis=0)
        acc_ls = tl.sum(P * x * x, axis=0)
        acc_w = tl.sum(P, axis=0)
    gb = geom_ptr + (b * S + s) * 3 * BLOCK_N + offs_n
    tl.store(gb, acc_mu * inv_s2 * coef)
    tl.store(gb + BLOCK_N, acc_ls * inv_s2 * ls_free * coef)
    tl.store(gb + 2 * BLOCK_N, acc_w * (1.0 - sig) * coef)
    tl.store(bad_ptr + b * S + s, tl.sum(bad, axis=0))


@triton.jit
def _geometry_group(p_ptr, m_ptr, s_ptr, p_out, m_out, s_out, idx, ok, g, lr, skip, b1, b2, eps, eps_root, bc1, bc2):
    p = tl.load(p_ptr + idx, mask=ok, other=0.0)
    m = tl.load(m_ptr + idx, mask=ok, other=0.0)
    s = tl.load(s_ptr + idx, mask=ok, other=0.0)
    p_new, m_new, s_new = _adam(p, m, s, g, lr, b1, b2, eps, eps_root, bc1, bc2)
    tl.store(p_out + idx, tl.where(skip, p, p_new), mask=ok)
    tl.store(m_out + idx, tl.where(skip, m, m_new), mask=ok)
    tl.store(s_out + idx, tl.where(skip, s, s_new), mask=ok)


@triton.jit
def step_geometry_kernel(
    mu_ptr, ls_ptr, wl_ptr,  # [B, N] parameters before the step
    mmu_ptr, smu_ptr, mls_ptr, sls_ptr, mwl_ptr, swl_ptr,  # [B, N] their moments
    mu_out, ls_out, wl_out, mmu_out, smu_out, mls_out, sls_out, mwl_out, swl_out,  # [B, N] after the step
    v_ptr, mv_ptr, sv_ptr, v_out, mv_out, sv_out,  # [B, N, D]: restored for skipped prompts
    geom_ptr, bad_ptr,  # kernel 1's partials [B, S, 3, BLOCK_N], [B, S]
    free_ptr,  # [B, N] float32 (read only if HAS_FREE)
    skip_ptr,  # out [B] uint8: prompt skipped (a non-finite gradient)
    sched_ptr, step_ptr,  # as kernel 1's
    N, D, S, b1, b2, eps, eps_root,
    HAS_FREE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_COPY: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = sched_ptr + tl.load(step_ptr) * 6
    lr_mu = tl.load(row)
    lr_ls = tl.load(row + 1)
    lr_wl = tl.load(row + 2)
    bc1 = tl.load(row + 4)
    bc2 = tl.load(row + 5)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    part = geom_ptr + (b * S + offs_s[:, None]) * 3 * BLOCK_N + offs_n[None, :]
    both = s_ok[:, None] & n_ok[None, :]
    g_mu = tl.sum(tl.load(part, mask=both, other=0.0), axis=0)
    g_ls = tl.sum(tl.load(part + BLOCK_N, mask=both, other=0.0), axis=0)
    g_wl = tl.sum(tl.load(part + 2 * BLOCK_N, mask=both, other=0.0), axis=0)
    bad = tl.sum(tl.load(bad_ptr + b * S + offs_s, mask=s_ok, other=0.0), axis=0)
    finite = (tl.abs(g_mu) < float("inf")) & (tl.abs(g_ls) < float("inf")) & (tl.abs(g_wl) < float("inf"))
    bad += tl.sum(tl.where(finite | ~n_ok, 0.0, 1.0), axis=0)
    skip = bad > 0
    tl.store(skip_ptr + b, skip.to(tl.uint8))
    # as adam_step: a skipped prompt's gradients count as zero, and nothing of it changes
    g_mu = tl.where(skip, 0.0, g_mu)
    g_ls = tl.where(skip, 0.0, g_ls)
    g_wl = tl.where(skip, 0.0, g_wl)
    free = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_FREE:
        free = tl.load(free_ptr + b * N + offs_n, mask=n_ok, other=0.0)
    idx = b * N + offs_n
    _geometry_group(mu_ptr, mmu_ptr, smu_ptr, mu_out, mmu_out, smu_out, idx, n_ok, g_mu, lr_mu * free, skip,
                    b1, b2, eps, eps_root, bc1, bc2)
    _geometry_group(ls_ptr, mls_ptr, sls_ptr, ls_out, mls_out, sls_out, idx, n_ok, g_ls, lr_ls * free, skip,
                    b1, b2, eps, eps_root, bc1, bc2)
    _geometry_group(wl_ptr, mwl_ptr, swl_ptr, wl_out, mwl_out, swl_out, idx, n_ok, g_wl, lr_wl * free, skip,
                    b1, b2, eps, eps_root, bc1, bc2)
    if skip:
        for i0 in range(0, N * D, BLOCK_COPY):
            offs = i0 + tl.arange(0, BLOCK_COPY)
            ok = offs < N * D
            tl.store(v_out + b * N * D + offs, tl.load(v_ptr + b * N * D + offs, mask=ok), mask=ok)
            tl.store(mv_out + b * N * D + offs, tl.load(mv_ptr + b * N * D + offs, mask=ok), mask=ok)
            tl.store(sv_out + b * N * D + offs, tl.load(sv_ptr + b * N * D + offs, mask=ok), mask=ok)
