"""Local rendering for long texts: truncated splats, tiled positions, O(L·k·d) time and memory.

    field = render_local(splats, L, kernel="gaussian", mode="additive", truncate=4.0)   # [B, L, d]

It computes the field of ``render(splats, L, kernel, mode, truncate)`` (a splat contributes nothing
beyond ``truncate * sigma`` tokens of its centre) without the dense coefficients A [B, L, N]: a
10,000-token document with 2,500 splats costs what its neighbourhoods cost, not L·N.

How (tile-based, like gsplat's screen tiles). The splats of each prompt are sorted by centre and the
positions 0..L-1 cut into tiles of T tokens. A splat can reach tile [t0, t0 + T - 1] only if its
centre lies in [t0 - R, t0 + T - 1 + R], R = truncate x (the prompt's widest sigma) + 1 token; in
sorted order these candidates form one contiguous run, found with ``searchsorted``. The extra token
of R is slack: a splat dropped by the search is then farther than truncate x sigma by a margin that
rounding cannot erase, and candidates are truncated with the dense reference's own test, so both
paths zero exactly the same (position, splat) pairs. Each tile evaluates its S candidates (S = the
longest run in the batch) as a small dense block a [T, S] and renders a @ v[candidates]; the
normalized mode's denominator is the block's row sum, since every splat with mass at a position is
a candidate of its tile. Coefficients: L·S numbers; multiply-adds: L·S·d; S ≈ (T + 2R)·N/L for
evenly spread splats (about 24 for L/4 splats of width 2.4 at truncate 4, T = 64).

Why tiles rather than a window of 2kσ + 1 positions per splat scattered with ``index_add``: the
window form's products v_i g_i(t) are [N, W, d] (kept for backward, or recomputed and scattered),
while a tile block is a matrix product whose output is the field itself.

Backward. Two ``autograd.Function`` s keep memory at the coefficients: the block product saves the
blocks a [B, nT, T, S] and the caller's v [B, N, d] and gathers the candidates' embeddings again in
backward, so no [nT, S, d] copy of v outlives the forward; the splats' gradients are gathered from
the tiles each splat was a candidate of (a contiguous range of at most M tiles), never
scatter-added, so they are deterministic on CUDA, where atomic adds land in any order. Their
backward passes are made of differentiable operations: second derivatives work.

Cost limits. One host sync per call (a single ``.tolist()`` of S and M, which size the blocks).
S is the most crowded tile's candidate count: splats piling up in one tile, or one very wide splat
(R follows the widest sigma of the prompt), raise S for every tile of the batch, up to N at worst
(then the blocks cost L·N, as dense). Positions are the token centres 0..L-1 only (an int L); use
``render`` for arbitrary positions.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .render import KERNELS, MODES, NORMALIZED_EPS, active_geometry, kernel_values
from .splats import SplatSet

DEFAULT_TRUNCATE = 4.0  # sigmas: exp(-4^2/2) = 3e-4 of a splat's peak is dropped at its cut
DEFAULT_TILE = 64  # tokens per tile: small enough that S stays near the local splat count, large enough for matmuls
_S_ALIGN = 8  # S is rounded up to a multiple of this, so that nearby geometries share block shapes (allocator reuse)


@dataclass(frozen=True)
class TilePlan:
    """Which splats each tile reads, and where each splat's gradient is read back from.

    rows: [B·nT·S] long, the row of the flattened [B·N, ...] splat tensors read by each tile slot.
    valid: [B, nT, S] bool, the slot holds a candidate (False: padding up to S, weight 0).
    back: [B·N·M] long, the row of the flattened [B·nT·S, ...] tile tensors holding each splat's
    m-th appearance; back_ok: [B, N, M] bool, that appearance exists.
    """

    rows: Tensor
    valid: Tensor
    back: Tensor
    back_ok: Tensor
    batch: int
    splats: int
    tiles: int
    tile: int
    width: int  # S: candidates per tile
    reads: int  # M: the most tiles any splat is a candidate of


def plan_tiles(mu: Tensor, sigma: Tensor, mask: Tensor, length: int, tile: int, truncate: float) -> TilePlan:
    """The tile plan for centres mu, widths sigma [B, N] (tokens; no gradient needed), slots mask [B, N]."""
    B, N = mu.shape
    nT = math.ceil(length / tile)
    dev = mu.device
    key = torch.where(mask, mu, math.inf)  # inactive slots sort last and are nobody's candidate
    key, order = key.sort(dim=-1, stable=True)
    reach = truncate * torch.where(mask, sigma, 0.0).amax(-1, keepdim=True) + 1.0  # [B, 1]
    start = torch.arange(nT, device=dev, dtype=mu.dtype)[None, :] * tile  # [1, nT]
    lo = torch.searchsorted(key, (start - reach).contiguous())  # [B, nT] first candidate (sorted rank)
    hi = torch.searchsorted(key, (start + (tile - 1) + reach).contiguous(), right=True)  # one past the last
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=dev).expand(B, N))
    # lo and hi never decrease along the tiles, so a splat is a candidate of the contiguous tiles
    # first..last: those with lo <= rank < hi
    first = torch.searchsorted(hi, rank, right=True)  # [B, N]
    last = torch.searchsorted(lo, rank, right=True) - 1
    S, M = torch.stack([(hi - lo).amax(), (last - first + 1).amax()]).tolist()  # the one host sync
    S = max(_S_ALIGN, -(-S // _S_ALIGN) * _S_ALIGN)
    M = max(1, M)

    cand = lo[..., None] + torch.arange(S, device=dev)  # [B, nT, S] sorted ranks
    valid = cand < hi[..., None]
    slot = order.gather(1, cand.clamp(max=N - 1).view(B, -1))  # [B, nT·S] original slot indices
    rows = (slot + torch.arange(B, device=dev)[:, None] * N).flatten()

    c = first[..., None] + torch.arange(M, device=dev)  # [B, N, M] tiles reading each splat
    back_ok = c <= last[..., None]
    c = c.clamp(max=nT - 1)
    s = rank[..., None] - lo.gather(1, c.view(B, -1)).view(B, N, M)  # position within the tile's run
    s = torch.where(back_ok, s, 0)
    back = ((torch.arange(B, device=dev)[:, None, None] * nT + c) * S + s).flatten()
    return TilePlan(rows, valid, back, back_ok, B, N, nT, tile, S, M)


def _tile(x: Tensor, plan: TilePlan) -> Tensor:
    """[B, N, k] -> [B, nT, S, k]: each tile's candidates (padding slots repeat a real splat)."""
    k = x.shape[-1]
    return x.reshape(-1, k).index_select(0, plan.rows).view(plan.batch, plan.tiles, plan.width, k)


def _untile(g: Tensor, plan: TilePlan) -> Tensor:
    """[B, nT, S, k] -> [B, N, k]: the sum over each splat's appearances (padding slots are never read)."""
    k = g.shape[-1]
    parts = g.reshape(-1, k).index_select(0, plan.back).view(plan.batch, plan.splats, plan.reads, k)
    return torch.where(plan.back_ok[..., None], parts, 0.0).sum(2)


class _Tiles(torch.autograd.Function):
    """x [B, N, k] -> [B, nT, S, k], with a gathered (deterministic) backward."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: TilePlan) -> Tensor:
        ctx.plan = plan
        return _tile(x, plan)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _untile(grad, ctx.plan), None


class _BlockProduct(torch.autograd.Function):
    """a [B, nT, T, S], v [B, N, d] -> a @ v[candidates] [B, nT, T, d]; saves a and v, not v's tiles."""

    @staticmethod
    def forward(ctx, a: Tensor, v: Tensor, plan: TilePlan) -> Tensor:
        ctx.save_for_backward(a, v)
        ctx.plan = plan
        return a @ _tile(v, plan)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, v = ctx.saved_tensors
        grad_a = grad @ _tile(v, ctx.plan).transpose(-1, -2) if ctx.needs_input_grad[0] else None
        grad_v = _untile(a.transpose(-1, -2) @ grad, ctx.plan) if ctx.needs_input_grad[1] else None
        return grad_a, grad_v, None


def render_local(
    splats: SplatSet,
    length: int,
    kernel: str = "gaussian",
    mode: str = "additive",
    truncate: float = DEFAULT_TRUNCATE,
    tile: int = DEFAULT_TILE,
) -> Tensor:
    """Field [B, L, d] at token centres 0..L-1, each splat cut off beyond ``truncate * sigma`` tokens.

    Equals ``render(splats, length, kernel, mode, truncate)`` up to the order of floating-point
    sums. splats: B prompts, N slots (inactive slots contribute nothing and get zero gradients,
    whatever they hold; a NaN in an active slot makes its prompt's field NaN, as in ``render``). length: L >= 1 (an int; positions past a prompt's end are rendered too,
    as ``render`` does). kernel: "gaussian" or "erf"; mode: "additive" or "normalized".
    truncate: k > 0, in sigmas. tile: T tokens per tile (memory and work grow with T + 2·k·sigma).
    Differentiable in mu, log_sigma, weight_logit and v, twice. ValueError for a length that is
    not an int >= 1, an unknown kernel or mode, a truncate that is not finite and > 0, a bad tile, or
    splats on the meta device.
    """
    if isinstance(length, numbers.Integral) and not isinstance(length, bool):
        length = int(length)  # a NumPy integer, as render takes it
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"render_local renders token centres 0..L-1 and needs an int L >= 1, got {length!r}; "
                         "use render for arbitrary positions")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose one of {KERNELS}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if truncate is None or not math.isfinite(truncate) or truncate <= 0:
        raise ValueError(f"truncate={truncate!r} must be a finite number of sigmas > 0: untruncated splats reach every "
                         "position, which is render's dense path")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile={tile!r} must be an int >= 1 (tokens per tile)")
    if splats.mu.device.type == "meta":  # the tiling reads the centres' values, which a meta tensor lacks
        raise ValueError("render_local: the splats lie on the meta device, which holds shapes but no values, and the "
                         "tiling must read the centres; use render for shape-only (meta) tracing, or move the splats "
                         "to cpu or cuda")
    mu, sigma, weight = active_geometry(splats)
    if splats.capacity == 0 or splats.batch_size == 0:  # nothing to sort or tile: the empty sum (or no prompt)
        return mu.new_zeros(splats.batch_size, length, splats.dim)
    T = min(tile, length)
    plan = plan_tiles(mu.detach(), sigma.detach(), splats.mask, length, T, truncate)
    B, nT, S = plan.batch, plan.tiles, plan.width
    mu_t, sigma_t, w_t = _Tiles.apply(torch.stack([mu, sigma, weight], -1), plan).unbind(-1)  # [B, nT, S] each
    mu_t, sigma_t = mu_t.reshape(B * nT, S), sigma_t.reshape(B * nT, S)
    pos = torch.arange(nT * T, device=mu.device, dtype=mu.dtype).view(1, nT, T).expand(B, -1, -1).reshape(B * nT, T)
    # the dense reference's own expressions, so each (position, splat) coefficient is the same number
    g = kernel_values(pos, mu_t, sigma_t, kernel)  # [B·nT, T, S]
    far = (pos[:, :, None] - mu_t[:, None, :]).abs() > truncate * sigma_t[:, None, :]
    a = g.masked_fill(far, 0.0) * torch.where(plan.valid, w_t, 0.0).view(B * nT, 1, S)
    if mode == "normalized":
        a = a / (a.sum(-1, keepdim=True) + NORMALIZED_EPS)
    v = torch.where(splats.mask[..., None], splats.v, 0.0).to(a.dtype)
    field = _BlockProduct.apply(a.view(B, nT, T, S), v, plan)  # [B, nT, T, d]
    # a NaN centre or width in an active slot cannot be sorted or searched, and the plan drops it; a
    # NaN weight would reach only the splat's own tiles. The dense reference renders NaN over the
    # whole prompt (0 * NaN coefficients everywhere), and so do we: the fit's NaN guard must see it
    broken = (mu.isnan() | sigma.isnan() | weight.isnan()).any(-1)[:, None, None]
    return torch.where(broken, math.nan, field.reshape(B, nT * T, -1)[:, :length])
