"""Density control: strategies that clone, split, prune and relocate splats during a fit.

gsplat's shape: a strategy is an object with explicit state and two hooks around the optimizer
step, ``observe`` (after the gradient, before Adam: accumulate statistics) and ``refine`` (after
Adam: change the set). Everything is batched: every prompt has a fixed capacity of slots and an
active mask; growth activates free slots, pruning deactivates them, and nothing is re-allocated.
A prompt's active count never exceeds its cap (its ``n_splats``), so budgets stay comparable.

    NoDensify        the splats the initializer gave, all the way.
    AdaptiveDensity  3D Gaussian Splatting's control: start with a fraction of the cap; every
                     ``interval`` steps, splats whose mean positional-gradient norm is high are
                     split (wide ones: two narrower children) or cloned (narrow ones: two copies
                     side by side), both preserving the rendered field to first order; splats of
                     tiny weight or absurd width are pruned; optional periodic weight reset.
    BudgetDensity    a fixed budget (3DGS-MCMC): dead splats (tiny weight) are relocated to the
                     positions where the token error is largest, with the residual there as embedding.

New or changed slots get fresh Adam moments (zeros), as gsplat does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from .render import kernel_values

@dataclass
class DensityContext:
    """What a strategy sees of the fit (``refine``'s ``ctx``): per-prompt caps [B] long (``n_splats``: a
    prompt's active count must never exceed it) and lengths [B] long (tokens), the render's ``kernel``
    and ``mode``, and two lazy functions of (params, slot_mask [B, N] bool), computed only when a
    strategy calls them: ``position_error`` [B, L] float (per-token cross-entropy of the decoded field,
    or its squared error without a decoder; -inf at padding) and ``residual`` [B, L, d] (target minus
    the field of the given active splats)."""

    caps: Tensor
    lengths: Tensor
    kernel: str
    mode: str
    position_error: Callable[[dict[str, Tensor], Tensor], Tensor]
    residual: Callable[[dict[str, Tensor], Tensor], Tensor]


@runtime_checkable
class DensityStrategy(Protocol):
    """What ``fit(density=...)`` calls; any object with these four methods is a strategy (write one as a
    frozen dataclass of settings, like the shipped ones; the fit records its fields in ``config``).
    State lives in the dict the hooks pass along, never on the object. Every tensor is batched over
    the B prompts of a chunk, with N slots each; return new tensors rather than updating in place.

    ``initial_counts(caps [B] long) -> [B] long``: the splats each prompt starts with (at most its
    cap); the initializer is asked for these. ``init_state(params, slot_mask) -> state``: the
    strategy's state; its long [B] entries named in ``EVENTS`` ("cloned", "split", "pruned",
    "relocated") become the result's ``density`` counts. ``observe(step, grads, slot_mask, state) ->
    state``: after the gradient, before Adam (grads: name -> [B, N(, d)], as params).
    ``refine(step, steps, params, adam, slot_mask, state, ctx) -> (params, adam, slot_mask, state)``:
    after Adam; may change the parameters (name -> [B, N(, d)]: "mu", "log_sigma", "weight_logit" and
    "v", which is absent with solved embeddings), the functional Adam state ``adam`` (the layout of
    :func:`splatopt.adam_init`; give changed slots zero moments with :func:`fresh_moments`) and the
    active slots ``slot_mask`` [B, N] bool, within each prompt's cap ``ctx.caps`` (fit refuses a
    strategy that leaves a prompt with more) and keeping at least one active splat per prompt.
    :func:`split_pairs` splits or clones splats into free slots.
    """

    def initial_counts(self, caps: Tensor) -> Tensor: ...

    def init_state(self, params: dict[str, Tensor], slot_mask: Tensor) -> dict[str, Tensor]: ...

    def observe(self, step: int, grads: dict[str, Tensor], slot_mask: Tensor, state: dict) -> dict: ...

    def refine(self, step: int, steps: int, params: dict[str, Tensor], adam: dict, slot_mask: Tensor, state: dict,
               ctx: DensityContext) -> tuple[dict[str, Tensor], dict, Tensor, dict]: ...


EVENTS = ("cloned", "split", "pruned", "relocated")


def _event_state(slot_mask: Tensor) -> dict[str, Tensor]:
    return {k: torch.zeros(slot_mask.shape[0], dtype=torch.long, device=slot_mask.device) for k in EVENTS}


class _FullCap:
    """The hooks of a strategy that starts every prompt at its cap and reads no gradient."""

    def initial_counts(self, caps: Tensor) -> Tensor:
        return caps

    def init_state(self, params, slot_mask):
        return _event_state(slot_mask)

    def observe(self, step, grads, slot_mask, state):
        return state


@dataclass(frozen=True)
class NoDensify(_FullCap):
    """Keep the initializer's splats: no growth, no pruning."""

    def refine(self, step, steps, params, adam, slot_mask, state, ctx):
        return params, adam, slot_mask, state


# ------------------------------------------------------------------ batched slot surgery
def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """t [B, C, ...] at slots idx [B, K] -> [B, K, ...]."""
    return torch.gather(t, 1, idx.view(idx.shape + (1,) * (t.dim() - 2)).expand(idx.shape + t.shape[2:]))


def _write(t: Tensor, idx: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """t with values [B, K, ...] written at slots idx [B, K] where valid [B, K]; idx rows are permutations."""
    keep = _gather(t, idx)
    v = torch.where(valid.view(valid.shape + (1,) * (t.dim() - 2)), values.to(t.dtype), keep)
    return t.scatter(1, idx.view(idx.shape + (1,) * (t.dim() - 2)).expand(idx.shape + t.shape[2:]), v)


def _pair(sources: Tensor, score: Tensor, slot_mask: Tensor, room: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Match source slots (best score first) with free slots, at most ``room`` [B] pairs per prompt.

    sources, slot_mask: [B, C] bool; score [B, C]. Returns src [B, C], dst [B, C] (each row a
    permutation of 0..C-1) and valid [B, C]: pair k of prompt b is (src[b, k], dst[b, k]) if valid.
    """
    C = slot_mask.shape[1]
    src = torch.argsort(torch.where(sources, score, -math.inf), dim=1, descending=True, stable=True)
    dst = torch.argsort((slot_mask).to(torch.int8), dim=1, stable=True)  # free slots first
    n = torch.minimum(sources.sum(1), (~slot_mask).sum(1))
    n = torch.minimum(n, room.clamp(min=0))
    valid = torch.arange(C, device=slot_mask.device)[None, :] < n[:, None]
    return src, dst, valid


def fresh_moments(adam: dict, slots: Tensor) -> dict:
    """Adam state (:func:`splatopt.adam_init`'s layout) with zero moments at ``slots`` [B, N] bool: what
    a new or changed splat starts from (as gsplat does)."""
    out = {"t": adam["t"], "m": {}, "v": {}}
    for which in ("m", "v"):
        for k, t in adam[which].items():
            z = slots.view(slots.shape + (1,) * (t.dim() - 2))
            out[which][k] = torch.where(z, torch.zeros_like(t), t)
    return out


def split_pairs(params: dict[str, Tensor], src: Tensor, dst: Tensor, valid: Tensor, offset: Tensor, shrink: Tensor,
                additive: bool) -> dict[str, Tensor]:
    """Replace splat src by two children at mu -/+ offset * sigma, widths sigma * shrink (both [B, C]).

    The parent's slot holds the left child, dst the right one. In additive mode each child carries
    v / (2 shrink), so the pair keeps the parent's mass; with shrink = sqrt(1 - offset^2) it also
    keeps its second moment, and the rendered field is unchanged to first order in the offset.
    """
    mu, log_sigma = _gather(params["mu"], src), _gather(params["log_sigma"], src)
    delta = offset * log_sigma.exp()
    out = dict(params)
    out["mu"] = _write(_write(params["mu"], src, mu - delta, valid), dst, mu + delta, valid)
    child_log_sigma = log_sigma + shrink.log()
    out["log_sigma"] = _write(_write(params["log_sigma"], src, child_log_sigma, valid), dst, child_log_sigma, valid)
    out["weight_logit"] = _write(params["weight_logit"], dst, _gather(params["weight_logit"], src), valid)
    if "v" in params:
        v = _gather(params["v"], src)
        if additive:
            v = v / (2 * shrink[..., None])
        out["v"] = _write(_write(params["v"], src, v, valid), dst, v, valid)
    return out


def _scattered(valid: Tensor, idx: Tensor) -> Tensor:
    """[B, C] bool: slots idx[b, k] with valid[b, k]."""
    return torch.zeros_like(valid).scatter(1, idx, valid)


def _check_schedule(strategy) -> None:
    """``start`` >= 0 and ``interval`` >= 1 steps (ints), ``stop_fraction`` of the fit in [0, 1]."""
    for name, least in (("start", 0), ("interval", 1)):
        value = getattr(strategy, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{type(strategy).__name__}: {name}={value!r} must be an int >= {least} (steps)")
    if not 0 <= strategy.stop_fraction <= 1:
        raise ValueError(f"{type(strategy).__name__}: stop_fraction={strategy.stop_fraction} must lie in [0, 1] (of the fit)")


def _refines_at(strategy, step: int, steps: int) -> bool:
    """Whether a ``steps``-step fit refines after step ``step`` (from 0): every ``interval`` steps from
    ``start`` (counted from 1), until ``stop_fraction`` of the fit."""
    n = step + 1
    return n >= strategy.start and (n - strategy.start) % strategy.interval == 0 and n <= strategy.stop_fraction * steps


@dataclass(frozen=True)
class AdaptiveDensity:
    """3DGS adaptive density control, batched (see module docstring).

    initial_fraction: share of the cap active at the start. start, interval: first refinement
    step and period; stop_fraction: no refinement after this share of the steps (the fit settles).
    grad_ratio: densify splats whose mean |d loss / d mu| exceeds this multiple of the prompt's
    mean over active splats. split_sigma: splats wider than this (tokens) split, narrower ones are
    cloned. split_offset: children at mu -/+ split_offset * sigma. clone_offset: likewise for
    clones (same width). prune_weight: prune below this weight; prune_width: prune splats wider
    than this multiple of the prompt length. weight_reset_every: every so many steps set weights
    above ``reset_weight`` down to it (3DGS opacity reset; 0 = off).
    """

    initial_fraction: float = 0.5
    start: int = 10
    interval: int = 10
    stop_fraction: float = 0.5
    grad_ratio: float = 1.0
    split_sigma: float = 1.5
    split_offset: float = 0.6
    clone_offset: float = 0.5
    prune_weight: float = 0.01
    prune_width: float = 1.0
    weight_reset_every: int = 0
    reset_weight: float = 0.1

    def __post_init__(self) -> None:
        _check_schedule(self)
        if not 0 < self.initial_fraction <= 1:
            raise ValueError(f"initial_fraction={self.initial_fraction} must lie in (0, 1]")
        if not 0 < self.split_offset < 1:
            raise ValueError(f"split_offset={self.split_offset} must lie in (0, 1) (children inside the parent's width)")
        if not (isinstance(self.weight_reset_every, int) and self.weight_reset_every >= 0):
            raise ValueError(f"weight_reset_every={self.weight_reset_every!r} must be an int >= 0 (0: never)")
        if not 0 < self.reset_weight < 1:  # a logit is taken
            raise ValueError(f"reset_weight={self.reset_weight} must lie strictly between 0 and 1")
        for name in ("grad_ratio", "split_sigma", "clone_offset", "prune_weight", "prune_width"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def initial_counts(self, caps: Tensor) -> Tensor:
        return (caps.float() * self.initial_fraction).ceil().long().clamp(min=1)

    def init_state(self, params, slot_mask):
        z = torch.zeros(slot_mask.shape, dtype=params["mu"].dtype, device=slot_mask.device)
        return {**_event_state(slot_mask), "grad_sum": z, "grad_count": z.clone()}

    def observe(self, step, grads, slot_mask, state):
        g = grads["mu"].abs() * slot_mask
        return {**state, "grad_sum": state["grad_sum"] + g, "grad_count": state["grad_count"] + slot_mask}

    def refine(self, step, steps, params, adam, slot_mask, state, ctx):
        if not _refines_at(self, step, steps):
            return self._maybe_reset(step, params, adam, slot_mask, state)
        mean_grad = state["grad_sum"] / state["grad_count"].clamp(min=1)
        prompt_mean = (mean_grad * slot_mask).sum(1, keepdim=True) / slot_mask.sum(1, keepdim=True).clamp(min=1)
        hot = slot_mask & (mean_grad > self.grad_ratio * prompt_mean)
        room = ctx.caps - slot_mask.sum(1)
        src, dst, valid = _pair(hot, mean_grad, slot_mask, room)
        wide = _gather(params["log_sigma"], src).exp() > self.split_sigma
        offset = torch.where(wide, self.split_offset, self.clone_offset)
        shrink = torch.where(wide, torch.sqrt(1 - offset**2), torch.ones_like(offset))
        params = split_pairs(params, src, dst, valid, offset, shrink, ctx.mode == "additive")
        born = _scattered(valid, src) | _scattered(valid, dst)
        slot_mask = slot_mask | _scattered(valid, dst)
        # prune last, and never a prompt's last splat
        sigma = params["log_sigma"].exp()
        weak = slot_mask & ((torch.sigmoid(params["weight_logit"]) < self.prune_weight)
                            | (sigma > self.prune_width * ctx.lengths[:, None].to(sigma.dtype)))
        weak = weak & ~(weak.sum(1, keepdim=True) >= slot_mask.sum(1, keepdim=True))
        slot_mask = slot_mask & ~weak
        state = {**state, "grad_sum": torch.zeros_like(state["grad_sum"]), "grad_count": torch.zeros_like(state["grad_count"]),
                 "split": state["split"] + (valid & wide).sum(1), "cloned": state["cloned"] + (valid & ~wide).sum(1),
                 "pruned": state["pruned"] + weak.sum(1)}
        return self._maybe_reset(step, params, fresh_moments(adam, born | weak), slot_mask, state)

    def _maybe_reset(self, step, params, adam, slot_mask, state):
        if not self.weight_reset_every or (step + 1) % self.weight_reset_every:
            return params, adam, slot_mask, state
        cap = math.log(self.reset_weight / (1 - self.reset_weight))
        params = {**params, "weight_logit": params["weight_logit"].clamp(max=cap)}
        return params, adam, slot_mask, state


@dataclass(frozen=True)
class BudgetDensity(_FullCap):
    """A fixed budget: dead splats move to where the token error is largest (3DGS-MCMC relocation).

    Every ``interval`` steps from ``start`` until ``stop_fraction`` of the fit, active splats of
    weight below ``dead_weight``, or whose removal would change the field least (the
    ``relocate_fraction`` share with the smallest mass w * sigma * |v|, at least one per prompt when
    the fraction is positive), are moved to the positions of largest error (one per position), with
    width ``new_sigma`` tokens, weight 1/2 and an embedding that renders the field residual there
    (residual / (weight x peak kernel value); normalized mode: the target there).
    """

    start: int = 20
    interval: int = 20
    stop_fraction: float = 0.6
    dead_weight: float = 0.02
    relocate_fraction: float = 0.0
    new_sigma: float = 0.7

    def __post_init__(self) -> None:
        _check_schedule(self)
        if not 0 <= self.relocate_fraction <= 1:
            raise ValueError(f"relocate_fraction={self.relocate_fraction} must lie in [0, 1]")
        if not self.new_sigma > 0:  # its log is taken
            raise ValueError(f"new_sigma={self.new_sigma} must be > 0 (tokens)")
        if not self.dead_weight >= 0:
            raise ValueError(f"dead_weight={self.dead_weight} must be >= 0")

    def refine(self, step, steps, params, adam, slot_mask, state, ctx):
        if not _refines_at(self, step, steps):
            return params, adam, slot_mask, state
        weight = torch.sigmoid(params["weight_logit"])
        dead = slot_mask & (weight < self.dead_weight)
        if self.relocate_fraction > 0 and "v" in params:
            mass = weight * params["log_sigma"].exp() * params["v"].norm(dim=-1)
            k = (slot_mask.sum(1).float() * self.relocate_fraction).ceil().long()
            rank = torch.argsort(torch.argsort(torch.where(slot_mask, mass, math.inf), dim=1), dim=1)
            dead = dead | (slot_mask & (rank < k[:, None]))
        # keep at least one live splat per prompt
        dead = dead & ~(dead.sum(1, keepdim=True) >= slot_mask.sum(1, keepdim=True))
        if not bool(dead.any()):
            return params, adam, slot_mask, state
        error = ctx.position_error(params, slot_mask)  # [B, L], -inf at padding
        n_pos = min(slot_mask.shape[1], error.shape[1])
        worst = error.topk(n_pos, dim=1).indices  # [B, n_pos]
        # the k-th dead splat of a prompt goes to its k-th worst position
        dead_rank = torch.cumsum(dead.long(), 1) - 1
        target_pos = torch.gather(worst, 1, dead_rank.clamp(min=0, max=n_pos - 1))
        moved = dead & (dead_rank < n_pos)
        pos = target_pos.to(params["mu"].dtype)
        out = dict(params)
        out["mu"] = torch.where(moved, pos, params["mu"])
        out["log_sigma"] = torch.where(moved, math.log(self.new_sigma), params["log_sigma"])
        out["weight_logit"] = torch.where(moved, 0.0, params["weight_logit"])
        if "v" in params:
            # additive: the new splat carries the residual the other splats leave at its position;
            # normalized: the target there (a partition of unity interpolates, it does not add up)
            additive = ctx.mode == "additive"
            residual = ctx.residual(params, slot_mask & ~moved if additive else torch.zeros_like(slot_mask))
            r = torch.gather(residual, 1, target_pos[..., None].expand(-1, -1, residual.shape[-1]))
            if additive:
                zero = torch.zeros(1, 1, device=pos.device, dtype=pos.dtype)
                g0 = kernel_values(zero, zero, torch.full((1, 1), self.new_sigma, device=pos.device, dtype=pos.dtype), ctx.kernel)
                r = r / (0.5 * g0.reshape(()))
            out["v"] = torch.where(moved[..., None], r, params["v"])
        state = {**state, "relocated": state["relocated"] + moved.sum(1)}
        return out, fresh_moments(adam, moved), slot_mask, state


DENSITIES = {"none": NoDensify, "adaptive": AdaptiveDensity, "budget": BudgetDensity}


def resolve_density(density) -> DensityStrategy:
    """A strategy from a name ("none", "adaptive", "budget"), a dict such as ``{"name": "budget",
    "relocate_fraction": 0.1}`` (a study file's spelling), or an object with the strategy hooks."""
    if isinstance(density, dict):
        options = dict(density)
        # a config recorded before fits wrote the name: {"strategy": "BudgetDensity", fields}
        legacy = {cls.__name__: n for n, cls in DENSITIES.items()}
        name = options.pop("name", None) if "name" in options or options.get("strategy") not in legacy else legacy[options.pop("strategy")]
        if name not in DENSITIES:
            raise ValueError(f"density={density!r}: a dict needs name = one of {sorted(DENSITIES)}, plus that strategy's fields")
        try:
            return DENSITIES[name](**options)
        except TypeError as err:  # "__init__() got an unexpected keyword argument" said not which are valid
            raise ValueError(f"density={density!r}: {err}; {name}'s fields are "
                             f"{[f.name for f in dataclasses.fields(DENSITIES[name])]}") from err
    if isinstance(density, str):
        if density not in DENSITIES:
            raise ValueError(f"density={density!r}: choose one of {sorted(DENSITIES)} or pass a strategy object")
        return DENSITIES[density]()
    if isinstance(density, DensityStrategy):
        return density
    raise TypeError(f"density must be a name or a strategy object (initial_counts, init_state, observe, refine), "
                    f"not {type(density).__name__}")
