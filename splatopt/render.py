"""Rendering: one functional entry point, plain PyTorch (the reference every faster path is tested against).

    F(t) = sum_i  m_i * w_i * g((t - mu_i) / sigma_i) * v_i                    mode="additive"
    F(t) = sum_i  a_i(t) v_i / (sum_i a_i(t) + eps),  a_i(t) = m_i w_i g(...)   mode="normalized"

Kernels ``g``: ``"gaussian"`` samples exp(-x^2/2) at the token centre; ``"erf"`` averages the same
Gaussian over the token's unit box [t - 1/2, t + 1/2] (closed form with erf), so a narrow splat
still deposits its mass on the token it sits in. As sigma grows the two agree.

This dense path builds the coefficients A [B, L, N]; for long texts ``render_local``
(:mod:`splatopt.render_local`) renders the truncated field without them, in O(L·k·d).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .splats import SIGMA_MAX, SIGMA_MIN, SplatSet

KERNELS = ("gaussian", "erf")
MODES = ("additive", "normalized")
NORMALIZED_EPS = 1e-6


def _positions(length_or_positions, B: int, like: Tensor) -> Tensor:
    """[B, L] float positions from an int L, a [L] tensor or a [B, L] tensor."""
    if isinstance(length_or_positions, bool):  # True rendered one position, silently
        raise TypeError(f"render length must be an int L >= 1, not {length_or_positions!r}")
    scalar_tensor = isinstance(length_or_positions, Tensor) and length_or_positions.ndim == 0
    if isinstance(length_or_positions, numbers.Integral) or (scalar_tensor and not length_or_positions.is_floating_point()):
        length_or_positions = int(length_or_positions)  # numpy and torch integers are lengths too
    if isinstance(length_or_positions, int):
        if length_or_positions < 1:
            raise ValueError(f"render length must be >= 1, got {length_or_positions}")
        pos = torch.arange(length_or_positions, device=like.device, dtype=like.dtype)
        return pos.expand(B, -1)
    pos = torch.as_tensor(length_or_positions, device=like.device, dtype=like.dtype)
    if pos.dim() == 0:  # a float length: "got shape ()" named neither the input nor the fix
        raise ValueError(f"render length must be an int L >= 1, not {length_or_positions!r}; give float positions "
                         "as an [L] or [B, L] tensor")
    if pos.dim() == 1:
        return pos.expand(B, -1)
    if pos.dim() == 2 and pos.shape[0] == B:
        return pos
    raise ValueError(f"positions must be an int, [L] or [B={B}, L]; got shape {tuple(pos.shape)}")


def kernel_values(pos: Tensor, mu: Tensor, sigma: Tensor, kernel: str) -> Tensor:
    """g [B, L, N] of each splat at each position, in the inputs' dtype. pos [B, L]; mu, sigma [B, N]
    (tokens). kernel: "gaussian", exp(-(t - mu)^2 / (2 sigma^2)), peak 1; "erf", that Gaussian's mean
    over the token's unit box [t - 1/2, t + 1/2] (peak below 1). ValueError for another kernel."""
    x = pos[:, :, None] - mu[:, None, :]
    s = sigma[:, None, :]
    if kernel == "gaussian":
        return torch.exp(-0.5 * (x / s) ** 2)
    if kernel == "erf":
        return _box_averaged_gaussian(x, s)
    raise ValueError(f"kernel={kernel!r}: choose one of {KERNELS}")


# From this width on (float64, other dtypes), the box average is summed as a series: the two erf
# values nearly cancel there (relative error ~ eps * sigma: 1e-2 at sigma = 4096 in float32), while
# the series' first dropped term, ~ He_8(x / sigma) / (9.3e7 sigma^8), is below each dtype's rounding.
ERF_SERIES_SIGMA = {torch.float64: 32.0}
ERF_SERIES_SIGMA_DEFAULT = 4.0


def _box_averaged_gaussian(x: Tensor, s: Tensor) -> Tensor:
    """Mean of exp(-u^2 / (2 s^2)) over u in [x - 1/2, x + 1/2], at every width to the dtype's
    precision where the value exceeds 1e-4 (2e-6 float32, 2e-14 float64; 1e-5 relative in the far
    tails, below 1e-20). x, s: broadcastable, in tokens (s > 0). Half precision is computed in float32."""
    if s.dtype in (torch.float16, torch.bfloat16):  # the series' polynomial overflows float16 (0 * inf = NaN)
        return _box_averaged_gaussian(x.float(), s.float()).to(s.dtype)
    # narrow: erf(hi) - erf(lo), or erfc(lo) - erfc(hi) in the tail where both erf values near 1
    # (the kernel is even, so only |x| is needed; erf = erfc = 1/2 at 0.4769)
    ax = x.abs()
    r = 1.0 / (s * math.sqrt(2.0))
    lo, hi = (ax - 0.5) * r, (ax + 0.5) * r
    difference = torch.where(lo > 0.4769, torch.erfc(lo) - torch.erfc(hi), torch.erf(hi) - torch.erf(lo))
    narrow = (s * math.sqrt(math.pi / 2.0)) * difference
    # wide: the box average of f is sum_k f^(2k)(x) / (4^k (2k+1)!), and the Gaussian's derivatives
    # are He_n(z) f / s^n (probabilists' Hermite polynomials, z = x / s). Both branches are evaluated,
    # so the wide one's inputs are clamped where it is not used (and where exp underflows anyway)
    # to keep its gradient finite: a masked branch's inf would still make a NaN (0 * inf).
    threshold = ERF_SERIES_SIGMA.get(s.dtype, ERF_SERIES_SIGMA_DEFAULT)
    wide_s = s.clamp_min(threshold)
    z2 = ((x / wide_s) ** 2).clamp_max(1600.0)
    q = 0.25 / wide_s**2
    he2, he4, he6 = z2 - 1.0, (z2 - 6.0) * z2 + 3.0, ((z2 - 15.0) * z2 + 45.0) * z2 - 15.0
    wide = torch.exp(-0.5 * z2) * (1.0 + q * (he2 / 6.0 + q * (he4 / 120.0 + q * he6 / 5040.0)))
    return torch.where(s >= threshold, wide, narrow)


def active_geometry(splats: SplatSet) -> tuple[Tensor, Tensor, Tensor]:
    """(mu, sigma, weight), each [B, N], with inactive slots read as (0, 1, 0) (tokens, tokens, 1).

    Inactive slots may hold anything (NaN, inf): reading them as these constants makes them
    contribute exactly nothing, with gradients exactly zero, whatever they hold.
    """
    on = splats.mask
    mu = torch.where(on, splats.mu, 0.0)
    # clamp in log space: clamping after exp() gives NaN gradients (0 * inf) once exp overflows
    log_sigma = torch.where(on, splats.log_sigma, 0.0).clamp(math.log(SIGMA_MIN), math.log(SIGMA_MAX))
    weight = torch.sigmoid(torch.where(on, splats.weight_logit, 0.0)) * on
    return mu, log_sigma.exp(), weight


def splat_weights(
    splats: SplatSet,
    length_or_positions: int | Tensor,
    kernel: str = "gaussian",
    mode: str = "additive",
    truncate: float | None = None,
) -> Tensor:
    """A [B, L, N]: the coefficient of splat i's embedding at position t, so that field = A @ v
    (zero columns for inactive slots). Arguments and errors as :func:`render`."""
    if not isinstance(splats, SplatSet):
        hint = ": pass result.splats" if hasattr(splats, "splats") else ""
        raise TypeError(f"render takes a SplatSet, not {type(splats).__name__}{hint}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    pos = _positions(length_or_positions, splats.batch_size, splats.mu)
    mu, sigma, weight = active_geometry(splats)
    g = kernel_values(pos, mu, sigma, kernel)
    if truncate is not None:
        if not (isinstance(truncate, numbers.Real) and truncate > 0):  # nan and negatives would cut off everything or nothing
            raise ValueError(f"truncate={truncate!r}: give a cut-off in widths > 0 (e.g. 4), or None for none")
        far = (pos[:, :, None] - mu[:, None, :]).abs() > truncate * sigma[:, None, :]
        g = g.masked_fill(far, 0.0)
    a = g * weight[:, None, :]
    if mode == "normalized":
        a = a / (a.sum(-1, keepdim=True) + NORMALIZED_EPS)
    return a


def render(
    splats: SplatSet,
    length_or_positions: int | Tensor,
    kernel: str = "gaussian",
    mode: str = "additive",
    truncate: float | None = None,
) -> Tensor:
    """Field [B, L, d] rendered from ``splats`` at token positions, in the splats' dtype and device.

    length_or_positions: an int L >= 1 (positions 0..L-1), or float positions [L] or [B, L] in
    tokens (continuous: any real position can be rendered). kernel: "gaussian" (point-sampled) or
    "erf" (box-integrated over the token). mode: "additive" or "normalized" (partition of unity).
    truncate: if given (a number > 0, in sigmas), a splat contributes nothing beyond
    ``truncate * sigma`` tokens of its centre. Inactive slots (mask False) contribute nothing.
    Differentiable in every splat parameter. ValueError for an unknown kernel or mode, bad
    positions or a bad truncate; TypeError for splats that are not a SplatSet.
    """
    a = splat_weights(splats, length_or_positions, kernel, mode, truncate)
    return a @ torch.where(splats.mask[..., None], splats.v, 0.0).to(a.dtype)
