"""Fixed bases: the baselines that mobile splats must beat at an equal float budget.

Each is linear in its coefficients, ``field = A @ c`` with a fixed design matrix A [B, L, K] and
coefficients c [B, K, d]; only c is optimized (same objective, optimizer and steps as splats), and
it starts at the least-squares optimum of the field MSE, as ``GridInit`` does for splat embeddings.

    "fixed-grid"  Gaussians on the grid ``GridInit`` uses, that never move or resize.
    "dct"         cosines along positions, cos(pi (t + 1/2) k / L_b), k = 0..K-1 (DCT-II, the
                  "Fourier transform into latent space" idea); unnormalised so c is in field units.
    "segments"    piecewise-constant: K equal segments of the prompt, c = segment means at the start
                  (mean-pooling, a strong cheap baseline in the token-compression literature).

Budget: a splat costs d + 3 floats (centre, width, weight, embedding); a fixed-basis term costs d
(its geometry follows from L and K). At N splats a fixed basis gets K = round(N (d + 3) / d) terms,
at most L_b: the whole number of terms closest to the splats' floats (within half a term).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .init import grid_geometry
from .render import kernel_values

BASES = ("splats", "fixed-grid", "dct", "segments")
LINEAR_BASES = BASES[1:]


def floats_per_term(basis: str, d: int) -> int:
    """Floats one term of ``basis`` stores: d + 3 for a splat, d for a fixed-basis coefficient."""
    if basis not in BASES:
        raise ValueError(f"basis={basis!r}: choose one of {BASES}")
    return d + 3 if basis == "splats" else d


def terms_for_budget(basis: str, n_splats: Tensor, lengths: Tensor, d: int) -> Tensor:
    """[B] terms of ``basis`` whose floats are closest to those of ``n_splats`` splats (at most L_b)."""
    if basis == "splats":
        return n_splats
    k = torch.round(n_splats * (d + 3) / floats_per_term(basis, d)).long()
    return torch.minimum(k, lengths.to(k.device)).clamp(min=1)


def design_matrix(basis: str, mask: Tensor, n_terms: Tensor, kernel: str = "gaussian", mode: str = "additive",
                  sigma_scale: float = 0.6) -> tuple[Tensor, Tensor]:
    """(A [B, L, K], term mask [B, K] bool) of a fixed basis for prompts of mask [B, L] and n_terms [B].

    Rows at padded positions and columns of unused terms are zero. ``kernel``/``mode`` and
    ``sigma_scale`` (width in grid spacings) only concern "fixed-grid".
    """
    if basis not in LINEAR_BASES:
        raise ValueError(f"basis={basis!r} has no fixed design matrix: choose one of {LINEAR_BASES}")
    B, L = mask.shape
    n = n_terms.to(mask.device)
    K = int(n.max())
    lengths = mask.sum(-1).float()  # [B]
    term_mask = torch.arange(K, device=mask.device)[None, :] < n[:, None]
    pos = torch.arange(L, device=mask.device, dtype=torch.float32)[None, :].expand(B, -1)
    if basis == "fixed-grid":
        mu, log_sigma, _ = grid_geometry(mask, n, sigma_scale, 0.0, None)
        a = kernel_values(pos, mu, log_sigma.exp(), kernel)
        if mode == "normalized":
            a = a * term_mask[:, None, :]
            a = a / (a.sum(-1, keepdim=True) + 1e-6)
    elif basis == "dct":
        k = torch.arange(K, device=mask.device, dtype=torch.float32)
        a = torch.cos(math.pi * (pos[:, :, None] + 0.5) * k[None, None, :] / lengths[:, None, None])
    else:  # segments: position t of prompt b lies in segment floor(t K_b / L_b)
        seg = torch.floor(pos * n[:, None].float() / lengths[:, None]).long()
        a = (seg[:, :, None] == torch.arange(K, device=mask.device)[None, None, :]).float()
    return a * (mask[:, :, None] & term_mask[:, None, :]), term_mask
