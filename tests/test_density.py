"""Density strategies: batched clone / split / prune / relocate keep the fit's state consistent."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import splatopt
from splatopt.density import AdaptiveDensity, BudgetDensity, DensityContext, NoDensify, resolve_density, split_pairs
from splatopt.optim import adam_init
from splatopt.render import render
from splatopt.splats import SplatSet


def random_state(B, C, d, L, active, seed):
    g = torch.Generator().manual_seed(seed)
    params = {
        "mu": torch.rand(B, C, generator=g) * (L - 1),
        "log_sigma": torch.log(0.3 + 3 * torch.rand(B, C, generator=g)),
        "weight_logit": torch.randn(B, C, generator=g) * 3,
        "v": torch.randn(B, C, d, generator=g),
    }
    slot_mask = torch.arange(C)[None, :] < active[:, None]
    adam = adam_init(params)
    adam = {"t": 7, "m": {k: torch.randn_like(t) for k, t in params.items()}, "v": {k: torch.rand_like(t) for k, t in params.items()}}
    return params, slot_mask, adam


def context(B, L, d, caps, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(B, L, d, generator=g)
    lengths = torch.full((B,), L)

    def residual(p, active):
        return target - render(SplatSet(**p, mask=active), L)

    def position_error(p, active):
        return (residual(p, active) ** 2).sum(-1)

    return DensityContext(caps, lengths, "gaussian", "additive", position_error, residual)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(2, 9), seed=st.integers(0, 10_000), data=st.data())
def test_random_refinement_schedules_keep_masks_state_and_shapes_consistent(B, C, seed, data):
    d, L = 4, 12
    caps = torch.tensor(data.draw(st.lists(st.integers(1, C), min_size=B, max_size=B)))
    active = torch.minimum(caps, torch.tensor(data.draw(st.lists(st.integers(1, C), min_size=B, max_size=B))))
    params, slot_mask, adam = random_state(B, C, d, L, active, seed)
    strategy = data.draw(st.sampled_from([
        AdaptiveDensity(start=1, interval=1, stop_fraction=1.0, grad_ratio=data.draw(st.floats(0.0, 2.0)),
                        prune_weight=data.draw(st.floats(0.0, 0.5)), split_sigma=data.draw(st.floats(0.2, 3.0))),
        BudgetDensity(start=1, interval=1, stop_fraction=1.0, dead_weight=data.draw(st.floats(0.0, 0.5)),
                      relocate_fraction=data.draw(st.floats(0.0, 0.6))),
        NoDensify(),
    ]))
    ctx = context(B, L, d, caps, seed)
    state = strategy.init_state(params, slot_mask)
    for step in range(data.draw(st.integers(1, 4))):
        grads = {k: torch.randn_like(t) for k, t in params.items()}
        state = strategy.observe(step, grads, slot_mask, state)
        before = {k: t.clone() for k, t in params.items()}
        new, adam2, new_mask, state = strategy.refine(step, 10, params, adam, slot_mask, state, ctx)
        for k in params:
            assert new[k].shape == params[k].shape and adam2["m"][k].shape == params[k].shape
            assert torch.isfinite(new[k]).all()
        assert new_mask.shape == slot_mask.shape and new_mask.dtype == torch.bool
        assert (new_mask.sum(1) >= 1).all(), "a prompt lost its last splat"
        assert (new_mask.sum(1) <= torch.maximum(caps, slot_mask.sum(1))).all(), "a prompt grew beyond its cap"
        # a slot whose parameters changed got fresh Adam moments (or was switched off)
        changed = torch.zeros_like(new_mask)
        for k in params:
            diff = new[k] != before[k]
            changed |= diff if diff.dim() == 2 else diff.any(-1)
        for k in params:
            m = adam2["m"][k]
            zero = (m == 0) if m.dim() == 2 else (m == 0).all(-1)
            assert zero[changed].all(), "a moved or re-born splat kept stale Adam moments"
        if isinstance(strategy, BudgetDensity):  # relocated splats sit on a token of the text
            assert ((new["mu"] >= 0) & (new["mu"] <= L - 1) | ~changed | ~new_mask).all()
        else:  # split / cloned children stay within their parent's width: |mu' - mu| < sigma
            moved = (new["mu"] - before["mu"]).abs()
            assert (moved <= before["log_sigma"].exp() + 1e-5)[changed & slot_mask].all()
        params, adam, slot_mask = new, adam2, new_mask
    for k in ("cloned", "split", "pruned", "relocated"):
        assert state[k].shape == (B,) and (state[k] >= 0).all()


@pytest.mark.parametrize("kernel", ["gaussian", "erf"])
def test_split_preserves_the_rendered_field_to_first_order(kernel):
    L, d = 64, 3
    params = {"mu": torch.tensor([[30.3, 0.0]], dtype=torch.float64), "log_sigma": torch.tensor([[math.log(6.0), 0.0]], dtype=torch.float64),
              "weight_logit": torch.tensor([[0.4, 0.0]], dtype=torch.float64), "v": torch.randn(1, 2, d, dtype=torch.float64)}
    mask = torch.tensor([[True, False]])
    field = render(SplatSet(**params, mask=mask), L, kernel)
    src, dst, valid = torch.tensor([[0, 1]]), torch.tensor([[1, 0]]), torch.tensor([[True, False]])

    def error(eps):
        offset = torch.full((1, 2), eps, dtype=torch.float64)
        split = split_pairs(params, src, dst, valid, offset, torch.sqrt(1 - offset**2), additive=True)
        after = render(SplatSet(**split, mask=torch.tensor([[True, True]])), L, kernel)
        return float((after - field).norm() / field.norm())

    e1, e2 = error(0.2), error(0.1)
    assert e1 < 0.02 and e2 < e1 / 3.5, f"error must shrink like offset^2: {e1:.2e} -> {e2:.2e}"


@settings(max_examples=25, deadline=None)
@given(offset=st.floats(0.05, 0.9), log_sigma=st.floats(-1.0, 2.0), logit=st.floats(-3.0, 3.0), seed=st.integers(0, 1000))
def test_split_keeps_the_continuous_splats_mass_mean_and_variance_exactly(offset, log_sigma, logit, seed):
    """split_pairs' documented children: centres mu -/+ offset sigma, widths sigma sqrt(1 - offset^2), the
    parent's weight, v / (2 shrink). Over the real line that pair has exactly the parent's mass, mean
    and variance; the first-order field test alone cannot tell a wrong width (its error is O(offset^2) too)."""
    g = torch.Generator().manual_seed(seed)
    params = {"mu": torch.tensor([[3.0, 0.0, 7.5]], dtype=torch.float64) + torch.rand(1, 3, generator=g, dtype=torch.float64),
              "log_sigma": torch.tensor([[0.0, log_sigma, 0.3]], dtype=torch.float64),
              "weight_logit": torch.tensor([[0.5, logit, -1.0]], dtype=torch.float64),
              "v": torch.randn(1, 3, 4, generator=g, dtype=torch.float64)}
    off = torch.full((1, 1), offset, dtype=torch.float64)
    out = split_pairs(params, torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[True]]), off, torch.sqrt(1 - off**2),
                      additive=True)

    def moments(p, slots):
        """(mass [d], mean, variance) of the splats in ``slots`` as continuous Gaussians on the real line."""
        mu, sigma = p["mu"][0, slots], p["log_sigma"][0, slots].exp()
        mass = torch.sigmoid(p["weight_logit"][0, slots])[:, None] * p["v"][0, slots] * (sigma * math.sqrt(2 * math.pi))[:, None]
        total = mass.sum(0)
        mean = (mass * mu[:, None]).sum(0) / total
        return total, mean, (mass * (sigma**2 + mu**2)[:, None]).sum(0) / total - mean**2

    for got, expected in zip(moments(out, [1, 0]), moments(params, [1])):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert float(out["mu"][0, 1]) < float(params["mu"][0, 1]) < float(out["mu"][0, 0])  # one child each side
    assert torch.equal(out["mu"][0, 2], params["mu"][0, 2]) and torch.equal(out["v"][0, 2], params["v"][0, 2])  # others untouched


def test_pruned_splats_contribute_nothing():
    B, C, d, L = 2, 6, 5, 16
    params, slot_mask, adam = random_state(B, C, d, L, torch.tensor([6, 4]), 3)
    params["weight_logit"][0, 2] = -20.0  # weight ~ 0: pruned
    strategy = AdaptiveDensity(start=1, interval=1, stop_fraction=1.0, grad_ratio=1e9, prune_weight=0.01)
    state = strategy.init_state(params, slot_mask)
    new, _, new_mask, state = strategy.refine(0, 10, params, adam, slot_mask, state, context(B, L, d, torch.tensor([6, 6])))
    assert not new_mask[0, 2] and int(state["pruned"][0]) >= 1
    poisoned = {k: torch.where((~new_mask).view(new_mask.shape + (1,) * (t.dim() - 2)), torch.full_like(t, float("nan")), t)
                for k, t in new.items()}
    torch.testing.assert_close(render(SplatSet(**poisoned, mask=new_mask), L), render(SplatSet(**new, mask=new_mask), L))


def test_adaptive_density_grows_to_the_cap_in_a_fit_and_reports_its_events():
    torch.manual_seed(0)
    field = torch.randn(3, 20, 8).cumsum(1) / 4
    strategy = AdaptiveDensity(start=2, interval=2, stop_fraction=0.8, grad_ratio=0.0)
    result = splatopt.fit(splatopt.Targets(field), n_splats=[8, 6, 4], steps=20, objective="mse", density=strategy,
                          device="cpu", progress=False, record_every=2)
    assert result.history["n_terms"][0].tolist() == [4, 3, 2]  # half the cap at the start
    assert (result.n_terms <= torch.tensor([8, 6, 4])).all() and (result.n_terms > torch.tensor([4, 3, 2])).any()
    grown = result.density["split"] + result.density["cloned"]
    assert (grown >= result.n_terms - torch.tensor([4, 3, 2])).all()
    assert torch.equal(result.splats.counts.cpu(), result.n_terms)
    assert torch.isfinite(result.field_error).all() and (result.field_error < 1).all()


def test_budget_density_relocates_dead_splats_onto_the_worst_positions():
    field = torch.zeros(1, 24, 4)
    field[0, 18] = 5.0  # all the error sits at position 18
    params = {"mu": torch.tensor([[2.0, 6.0, 10.0]]), "log_sigma": torch.zeros(1, 3), "weight_logit": torch.tensor([[0.0, -9.0, 0.0]]),
              "v": torch.zeros(1, 3, 4)}
    mask = torch.ones(1, 3, dtype=torch.bool)

    def residual(p, active):
        return field - render(SplatSet(**p, mask=active), 24)

    ctx = DensityContext(torch.tensor([3]), torch.tensor([24]), "gaussian", "additive",
                         lambda p, a: (residual(p, a) ** 2).sum(-1), residual)
    strategy = BudgetDensity(start=1, interval=1, dead_weight=0.01)
    new, _, new_mask, state = strategy.refine(0, 10, params, adam_init(params), mask, strategy.init_state(params, mask), ctx)
    assert new["mu"][0, 1] == 18 and int(state["relocated"][0]) == 1 and new_mask.all()
    # the new splat carries the residual: the field at 18 is now matched
    assert torch.allclose(render(SplatSet(**new, mask=new_mask), 24)[0, 18], field[0, 18], atol=1e-5)


def test_an_unknown_field_of_a_density_or_init_dict_lists_the_valid_fields():
    """{"name": "adaptive", "refine_every": 10} (gsplat's spelling) said only "__init__() got an unexpected keyword
    argument 'refine_every'", not which fields the strategy or initializer has."""
    from splatopt.init import resolve_initializer

    with pytest.raises(ValueError, match=r"'refine_every'; adaptive's fields are \['initial_fraction', 'start', 'interval'"):
        resolve_density({"name": "adaptive", "refine_every": 10})
    with pytest.raises(ValueError, match=r"'spacing'; grid's fields are \['sigma_scale', 'jitter', 'weight'"):
        resolve_initializer({"name": "grid", "spacing": 2})


def test_density_names_dicts_and_errors():
    assert isinstance(resolve_density("none"), NoDensify)
    assert resolve_density({"name": "budget", "relocate_fraction": 0.1}).relocate_fraction == 0.1
    with pytest.raises(ValueError, match="choose one of"):
        resolve_density("mcmc")
    with pytest.raises(ValueError, match="unexpected keyword"):
        resolve_density({"name": "adaptive", "nonsense": 1})
    with pytest.raises(TypeError, match="strategy object"):
        resolve_density(3)
    with pytest.raises(ValueError, match="needs basis='splats'"):
        splatopt.fit(splatopt.Targets(torch.randn(1, 8, 4)), n_splats=2, steps=1, objective="mse", basis="dct",
                     density="adaptive", device="cpu", progress=False)


@pytest.mark.parametrize("spec, message", [
    ({"name": "budget", "interval": 0}, "interval=0 must be an int >= 1"),
    ({"name": "budget", "interval": 1.5}, "interval=1.5 must be an int"),
    ({"name": "budget", "new_sigma": 0}, "new_sigma=0 must be > 0"),
    ({"name": "budget", "relocate_fraction": 2}, "relocate_fraction=2 must lie in"),
    ({"name": "budget", "stop_fraction": -1}, "stop_fraction=-1 must lie in"),
    ({"name": "adaptive", "reset_weight": 1.0}, "reset_weight=1.0 must lie strictly between"),
    ({"name": "adaptive", "weight_reset_every": -1}, "weight_reset_every=-1"),
])
def test_strategy_fields_that_would_divide_by_zero_or_do_nothing_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_density(spec)


def test_a_custom_strategy_written_to_the_documented_protocol_fits_and_may_not_pass_the_cap():
    """The protocol had no documentation and the moment reset a growing strategy needs was private
    (_fresh_moments); a strategy that activated slots past a prompt's cap was fitted silently with more
    splats than n_splats."""
    from dataclasses import dataclass

    from splatopt.density import DensityStrategy, fresh_moments

    assert DensityStrategy.__doc__ and "ctx.caps" in DensityStrategy.__doc__ and DensityContext.__doc__

    @dataclass(frozen=True)
    class GrowAll:  # activates every free slot at step `at`, within the caps or not
        at: int = 1
        respect_caps: bool = True

        def initial_counts(self, caps):
            return torch.ones_like(caps)

        def init_state(self, params, slot_mask):
            return {"cloned": torch.zeros(slot_mask.shape[0], dtype=torch.long)}

        def observe(self, step, grads, slot_mask, state):
            return state

        def refine(self, step, steps, params, adam, slot_mask, state, ctx):
            if step != self.at:
                return params, adam, slot_mask, state
            rank = torch.arange(slot_mask.shape[1])[None, :]
            grow = ~slot_mask & ((rank < ctx.caps[:, None]) if self.respect_caps else torch.ones_like(slot_mask))
            new = {**params, "mu": torch.where(grow, rank.to(params["mu"].dtype), params["mu"])}
            return new, fresh_moments(adam, grow), slot_mask | grow, {"cloned": state["cloned"] + grow.sum(1)}

    g = torch.Generator().manual_seed(0)
    targets = splatopt.Targets(torch.randn(2, 6, 4, generator=g))
    opts = dict(n_splats=[2, 4], steps=3, objective="mse", device="cpu", progress=False)
    result = splatopt.fit(targets, density=GrowAll(), **opts)
    assert result.splats.counts.tolist() == [2, 4] and result.density["cloned"].tolist() == [1, 3]
    assert result.config["density"] == {"strategy": "GrowAll", "at": 1, "respect_caps": True}
    with pytest.raises(ValueError, match="the density strategy GrowAll left 4 active splats where the cap"):
        splatopt.fit(targets, density=GrowAll(respect_caps=False), **opts)


def test_a_density_recorded_by_an_older_fit_is_read_back():
    """Fits recorded a shipped strategy as {"strategy": "BudgetDensity", fields}, which resolve_density
    refused ("a dict needs name"): an ablation row's config could not be fed back to fit."""
    recorded = {"strategy": "BudgetDensity", **{k: v for k, v in BudgetDensity(relocate_fraction=0.2).__dict__.items()}}
    assert resolve_density(recorded) == BudgetDensity(relocate_fraction=0.2)
