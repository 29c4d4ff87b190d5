"""Initializers: propose the first splats for a batch of target fields.

An initializer is any callable ``init(target, mask, n_splats, generator) -> SplatSet`` with
target [B, L, d], mask [B, L] bool, n_splats [B] long (1 <= n_b <= L_b); the returned set has
capacity max(n_splats) and ``mask[b, :n_b]`` active. ``generator`` is None, one torch.Generator for
the batch, or a list of B generators, one per prompt: :func:`splatopt.fit` passes the list, so that a
random start depends on the prompt's seed alone, not on the prompts it is chunked with. The learned
(meta-trained) initializer implements the same protocol.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .optim import closed_form_v
from .render import KERNELS, MODES, splat_weights
from .splats import SplatSet

if TYPE_CHECKING:  # fixedpos.model imports transformers; a hint needs none of it
    from fixedpos import FieldModel


Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per prompt


def uniform_noise(n_splats: Tensor, generator: Generators) -> Tensor:
    """[B, max(n_splats)] float32 on the CPU, uniform on [0, 1) (with a list of generators, 0.5 in inactive slots).

    One generator draws the whole batch (on its device); a list draws prompt b's n_b numbers from
    its b-th generator, so a prompt's noise does not depend on the other rows; None: the global state.
    """
    B, N = n_splats.shape[0], int(n_splats.max())
    if generator is None or isinstance(generator, torch.Generator):
        device = "cpu" if generator is None else generator.device
        return torch.rand(B, N, generator=generator, device=device).cpu()
    if len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} prompts: give one per prompt, one for the batch, or None")
    noise = torch.full((B, N), 0.5)
    for b, (n, g) in enumerate(zip(n_splats.tolist(), generator)):
        noise[b, :n] = torch.rand(n, generator=g, device=g.device).cpu()
    return noise


@runtime_checkable
class Initializer(Protocol):
    """Proposes the first splats: ``init(target [B, L, d], mask [B, L] bool (right-padded), n_splats [B]
    long (1 <= n_b <= L_b), generator) -> SplatSet`` of capacity max(n_splats), ``mask[b, :n_b]``
    active; centres and widths in tokens. ``generator``: None, one for the batch, or B, one per prompt.
    GridInit, TokenInit, WarmStart and the learned initializer are ones."""

    def __call__(self, target: Tensor, mask: Tensor, n_splats: Tensor, generator: Generators = None) -> SplatSet: ...


def check_layout(mask: Tensor, n_splats: Tensor, target: Tensor | None = None) -> None:
    """What every initializer assumes, checked once per call (fit() ensures it; hand-built inputs may not):
    mask [B, L] bool and right-padded (a prompt's tokens first), ``target`` [B, L, d], and ``n_splats``
    [B] counts with 1 <= n_b <= L_b. Raises an error naming the input."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] == 0:
        raise TypeError(f"mask must be a bool tensor [B >= 1, L], not {getattr(mask, 'dtype', type(mask).__name__)} "
                        f"{tuple(getattr(mask, 'shape', ()))}")
    if target is not None and tuple(target.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"target {tuple(target.shape)} and mask {tuple(mask.shape)} disagree on [B, L]")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):  # the geometry is laid out on positions 0..L_b - 1
        raise ValueError("mask must be right-padded: each row True for its tokens, then False (no holes, no left padding)")
    if not isinstance(n_splats, Tensor) or tuple(n_splats.shape) != (mask.shape[0],) or n_splats.is_floating_point():
        raise TypeError(f"n_splats must be an integer tensor [B={mask.shape[0]}] of counts, not "
                        f"{tuple(getattr(n_splats, 'shape', ())) or type(n_splats).__name__} (fit() also takes fractions and ints)")
    lengths = mask.sum(-1).to(n_splats.device)
    if bool(((n_splats < 1) | (n_splats > lengths)).any()):
        raise ValueError(f"n_splats {n_splats.tolist()} must lie in 1..L for each prompt (L = {lengths.tolist()})")


def grid_geometry(mask: Tensor, n_splats: Tensor, sigma_scale: float, jitter: float, generator: Generators) -> tuple[Tensor, Tensor, Tensor]:
    """Evenly spaced centres mu [B, N], log widths [B, N] and slot mask [B, N] for each prompt's length."""
    check_layout(mask, n_splats)
    lengths = mask.sum(-1).to(torch.float32)  # [B]
    n = n_splats.to(lengths.device)
    N = int(n.max())
    i = torch.arange(N, device=mask.device, dtype=torch.float32)[None, :]
    spacing = lengths[:, None] / n[:, None].to(torch.float32)  # tokens per splat
    mu = (i + 0.5) * spacing - 0.5
    if jitter:
        mu = mu + (uniform_noise(n, generator).to(mu.device) - 0.5) * jitter * spacing
    log_sigma = torch.log(sigma_scale * spacing).expand(-1, N).clone()
    slot_mask = i < n[:, None]
    # jitter may push the end splats off the prompt: keep every centre on [0, L_b - 1]
    mu = torch.minimum(mu.clamp(min=0), (lengths[:, None] - 1).clamp(min=0))
    mu = torch.where(slot_mask, mu, torch.zeros_like(mu))
    return mu, log_sigma, slot_mask


def _check_grid_fields(init) -> None:
    """sigma_scale > 0, jitter in [0, 1] (of a spacing), weight in (0, 1) (a logit is taken)."""
    if not (isinstance(init.sigma_scale, (int, float)) and math.isfinite(init.sigma_scale) and init.sigma_scale > 0):
        raise ValueError(f"{type(init).__name__}(sigma_scale={init.sigma_scale!r}): widths in spacings must be > 0")
    if not (isinstance(init.jitter, (int, float)) and 0 <= init.jitter <= 1):
        raise ValueError(f"{type(init).__name__}(jitter={init.jitter!r}): give a fraction of the spacing in [0, 1]")
    if not (isinstance(init.weight, (int, float)) and 0 < init.weight < 1):
        raise ValueError(f"{type(init).__name__}(weight={init.weight!r}): a splat weight lies strictly between 0 and 1")


@dataclass(frozen=True)
class GridInit:
    """Evenly spaced splats, width ``sigma_scale`` x spacing, weight ``weight``, embeddings by least squares.

    Prompt b's N_b centres sit at (i + 1/2) s - 1/2 tokens, spacing s = L_b / N_b, each moved by up
    to ``jitter`` / 2 spacings at random (the generator's; 0 = none). The embeddings solve the
    field MSE exactly for the initial geometry (one variable-projection solve) under the render
    ``kernel`` and ``mode`` (None: the fit's, which :func:`splatopt.fit` fills in through
    :meth:`for_render`; "gaussian" and "additive" when called on its own), so every fit starts from
    the best field the grid can render (``truncate``: the fit's cut-off in widths, set by
    :meth:`for_render`; None = none). ValueError for sigma_scale <= 0, jitter outside [0, 1],
    weight outside (0, 1), or an unknown kernel or mode.
    """

    sigma_scale: float = 0.6
    jitter: float = 0.0
    weight: float = 0.5
    kernel: str | None = None
    mode: str | None = None
    truncate: float | None = None

    def __post_init__(self) -> None:
        _check_grid_fields(self)
        if self.kernel not in (None, *KERNELS) or self.mode not in (None, *MODES):
            raise ValueError(f"GridInit(kernel={self.kernel!r}, mode={self.mode!r}): choose kernel from {KERNELS} and "
                             f"mode from {MODES}, or None for the fit's")

    def for_render(self, kernel: str, mode: str, truncate: float | None = None) -> "GridInit":
        """This grid with its unset (None) kernel, mode and truncation taken from a fit's render."""
        return replace(self, kernel=self.kernel or kernel, mode=self.mode or mode,
                       truncate=self.truncate if self.truncate is not None else truncate)

    def __call__(self, target: Tensor, mask: Tensor, n_splats: Tensor, generator: Generators = None) -> SplatSet:
        """The grid's splats for ``target`` [B, L, d], as :class:`Initializer`, in the target's dtype;
        TypeError / ValueError naming a malformed mask or n_splats (:func:`check_layout`)."""
        check_layout(mask, n_splats, target)
        mu, log_sigma, slot_mask = grid_geometry(mask, n_splats, self.sigma_scale, self.jitter, generator)
        logit = torch.full_like(mu, math.log(self.weight / (1 - self.weight)))
        v0 = torch.zeros(*mu.shape, target.shape[-1], device=target.device, dtype=target.dtype)
        splats = SplatSet(mu.to(target.dtype), log_sigma.to(target.dtype), logit.to(target.dtype), v0, slot_mask)
        a = splat_weights(splats, target.shape[1], self.kernel or "gaussian", self.mode or "additive", self.truncate)
        v = closed_form_v(a, target, mask, slot_mask)
        return splats.with_params({"v": v})


@dataclass(frozen=True)
class TokenInit:
    """Token-anchored splats: centres on evenly chosen token centres, embeddings copied from the target there.

    v = target[round(mu)] / weight for additive rendering, v = target[round(mu)] for normalized
    (where a token's field is a weighted mean of the splats' embeddings), so each splat starts as
    the token under it; the optimizer then learns to cover the neighbours. ``mode``: None = the
    fit's (:meth:`for_render`; "additive" when called on its own). Other fields and their checks as
    :class:`GridInit`.
    """

    sigma_scale: float = 0.6
    jitter: float = 0.0
    weight: float = 0.5
    mode: str | None = None

    def __post_init__(self) -> None:
        _check_grid_fields(self)
        if self.mode not in (None, *MODES):
            raise ValueError(f"TokenInit(mode={self.mode!r}): choose one of {MODES}, or None for the fit's")

    def for_render(self, kernel: str, mode: str, truncate: float | None = None) -> "TokenInit":
        """This start with its unset (None) mode taken from a fit's render (kernel and truncation do
        not change a token's own embedding)."""
        return replace(self, mode=self.mode or mode)

    def __call__(self, target: Tensor, mask: Tensor, n_splats: Tensor, generator: Generators = None) -> SplatSet:
        """Splats on token centres for ``target`` [B, L, d], as :class:`Initializer`, in the target's
        dtype; TypeError / ValueError naming a malformed mask or n_splats (:func:`check_layout`)."""
        check_layout(mask, n_splats, target)
        mu, log_sigma, slot_mask = grid_geometry(mask, n_splats, self.sigma_scale, self.jitter, generator)
        lengths = mask.sum(-1, keepdim=True)
        idx = mu.round().long().clamp(min=0).minimum(lengths - 1).clamp(min=0)
        mu = torch.where(slot_mask, idx.to(mu.dtype), mu)
        scale = self.weight if (self.mode or "additive") == "additive" else 1.0
        v = torch.gather(target, 1, idx[..., None].expand(-1, -1, target.shape[-1])) / scale
        v = v * slot_mask[..., None]
        logit = torch.full_like(mu, math.log(self.weight / (1 - self.weight)))
        return SplatSet(mu.to(target.dtype), log_sigma.to(target.dtype), logit.to(target.dtype), v, slot_mask)


@dataclass(frozen=True)
class WarmStart:
    """Start from given splats [B, N] (e.g. transported through an edit), one row per prompt in the
    prompts' order; the fit's ``n_splats`` defaults to their active counts (and otherwise only caps
    density control). They are moved to the target's device and dtype.
    TypeError for anything but a SplatSet; when called, ValueError for another B or d than the
    target's, or NaN / inf in an active splat."""

    splats: SplatSet

    def __post_init__(self) -> None:
        if not isinstance(self.splats, SplatSet):
            hint = ": pass result.splats" if hasattr(self.splats, "splats") else ""
            raise TypeError(f"WarmStart takes a SplatSet, not {type(self.splats).__name__}{hint}")

    def __call__(self, target: Tensor, mask: Tensor, n_splats: Tensor, generator: Generators = None) -> SplatSet:
        """The given splats on ``target``'s [B, L, d] device and dtype (mask, n_splats and generator are not read)."""
        if self.splats.batch_size != target.shape[0]:
            raise ValueError(f"WarmStart holds {self.splats.batch_size} prompts, the target has {target.shape[0]}")
        if self.splats.dim != target.shape[-1]:
            raise ValueError(f"WarmStart splats have d={self.splats.dim}, the target has d={target.shape[-1]}")
        s = self.splats
        for name in ("mu", "log_sigma", "weight_logit", "v"):
            if not torch.isfinite(getattr(s, name)[s.mask]).all():  # every step would be skipped, every metric NaN
                raise ValueError(f"WarmStart splats hold NaN or inf in {name} of an active splat: start from finite splats")
        return self.splats.to(target.device, target.dtype)


INITIALIZERS: dict[str, Callable[..., Initializer]] = {"grid": GridInit, "tokens": TokenInit}  # name -> class


def resolve_initializer(init: str | dict | Initializer, model: FieldModel | None = None) -> Initializer:
    """An initializer from a name ("grid", "tokens", "learned"), a dict such as ``{"name": "grid",
    "sigma_scale": 1.0}`` or ``{"name": "learned", "path": "init.safetensors"}`` (a study file's
    spelling), or an object implementing the protocol. "learned" is the meta-trained initializer
    shipped for ``model`` (:func:`splatopt.learned.load_learned`). ValueError for an unknown name or
    field, or "learned" without a model; TypeError for a class instead of an object, or a non-callable."""
    if isinstance(init, dict):
        options = dict(init)
        name = options.pop("name", None)
        if name == "learned":
            from .learned import LearnedInitializer

            if set(options) != {"path"}:
                raise ValueError(f"init={init!r}: a learned initializer takes only path = a file written by splatopt meta-train")
            return LearnedInitializer.load(options["path"]).eval().requires_grad_(False)
        if name not in INITIALIZERS:
            raise ValueError(f"init={init!r}: a dict needs name = one of {sorted(INITIALIZERS) + ['learned']}, plus its fields")
        try:
            return INITIALIZERS[name](**options)
        except TypeError as err:  # "__init__() got an unexpected keyword argument" said not which are valid
            cls: Any = INITIALIZERS[name]  # a dataclass of settings, typed as the callable it is
            fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
            raise ValueError(f"init={init!r}: {err}" + (f"; {name}'s fields are {fields}" if fields else "")) from err
    if isinstance(init, str):
        if init == "learned":
            from .learned import load_learned

            if model is None:
                raise ValueError("init='learned' needs the model (the shipped initializer is chosen by model and layer)")
            return load_learned(model)
        if init not in INITIALIZERS:
            raise ValueError(f"init={init!r}: choose one of {sorted(INITIALIZERS) + ['learned']}, a learned initializer file (CLI) or an initializer object")
        return INITIALIZERS[init]()
    if isinstance(init, type):
        raise TypeError(f"init={init.__name__}: pass an initializer object, e.g. {init.__name__}(), not the class")
    if callable(init):
        return init
    raise TypeError(f"init must be a name or a callable initializer, not {type(init).__name__}")
