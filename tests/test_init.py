"""Initializers: slot layout, centres, token-anchored embeddings, least-squares grid embeddings, resolution."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg

from splatopt import GridInit, Initializer, SplatSet, TokenInit, relative_mse, render, resolve_initializer, splat_weights

FAST = settings(max_examples=25, deadline=None)
F64 = torch.float64


@st.composite
def prompts(draw, max_len=12):
    """(target [B, L, d] float64, prefix mask [B, L], n_splats [B] with 1 <= n_b <= L_b, seed)."""
    B = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, max_len)) for _ in range(B)]
    counts = [draw(st.integers(1, n)) for n in lengths]
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    L = max(lengths)
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return target * mask[..., None], mask, torch.tensor(counts), seed


def check_layout(splats: SplatSet, target, mask, counts, strict=True):
    B = target.shape[0]
    assert splats.batch_size == B and splats.capacity == int(counts.max()) and splats.dim == target.shape[-1]
    assert splats.mu.dtype == target.dtype and splats.v.dtype == target.dtype
    lengths = mask.sum(-1)
    for b in range(B):
        n = int(counts[b])
        assert splats.mask[b, :n].all() and not splats.mask[b, n:].any()
        mu = splats.mu[b, :n]
        assert (mu >= 0).all() and (mu <= lengths[b] - 1).all(), (mu, int(lengths[b]))
        steps = mu[1:] - mu[:-1]
        assert (steps > 0).all() if strict else (steps >= 0).all(), mu
    assert torch.isfinite(splats.log_sigma).all() and torch.isfinite(splats.v).all()
    assert torch.equal(splats.v[~splats.mask], torch.zeros_like(splats.v[~splats.mask]))


@FAST
@given(p=prompts(), jitter=st.sampled_from([0.0, 0.3, 0.99]))
def test_grid_init_lays_out_n_increasing_centres_inside_each_prompt(p, jitter):
    target, mask, counts, seed = p
    splats = GridInit(jitter=jitter)(target, mask, counts, torch.Generator().manual_seed(seed))
    check_layout(splats, target, mask, counts)


@FAST
@given(p=prompts(), jitter=st.sampled_from([0.0, 0.5, 0.99]))
def test_token_init_centres_are_tokens_and_embeddings_are_the_target_there(p, jitter):
    target, mask, counts, seed = p
    init = TokenInit(jitter=jitter, weight=0.4)
    splats = init(target, mask, counts, torch.Generator().manual_seed(seed))
    check_layout(splats, target, mask, counts, strict=jitter == 0.0)
    on = splats.mask
    assert torch.equal(splats.mu[on], splats.mu[on].round())
    torch.testing.assert_close(splats.weight[on], torch.full_like(splats.weight[on], 0.4))
    for b in range(target.shape[0]):
        for i in range(int(counts[b])):
            t = int(splats.mu[b, i])
            torch.testing.assert_close(splats.v[b, i], target[b, t] / 0.4)


def test_token_init_with_one_splat_per_token_copies_the_field():
    """One splat per token: splat t sits on token t and its weighted embedding is the target there."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 6, 3, generator=g, dtype=F64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    splats = TokenInit()(target, mask, torch.tensor([6, 4]))
    assert splats.mu[0].tolist() == list(range(6)) and splats.mu[1, :4].tolist() == list(range(4))
    torch.testing.assert_close(splats.weight[0, :, None] * splats.v[0], target[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(splats.weight[1, :4, None] * splats.v[1, :4], target[1, :4], rtol=1e-12, atol=1e-12)


def test_grid_centres_are_evenly_spaced_and_widths_scale_with_spacing():
    target = torch.zeros(2, 12, 2, dtype=F64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    splats = GridInit(sigma_scale=0.5)(target, mask, torch.tensor([4, 2]))
    torch.testing.assert_close(splats.mu[0], torch.tensor([1.0, 4.0, 7.0, 10.0], dtype=F64))
    torch.testing.assert_close(splats.mu[1, :2], torch.tensor([1.5, 5.5], dtype=F64))
    torch.testing.assert_close(splats.sigma[0], torch.full((4,), 1.5, dtype=F64))
    torch.testing.assert_close(splats.sigma[1, :2], torch.full((2,), 2.0, dtype=F64))


@FAST
@given(p=prompts(max_len=14))
def test_grid_init_embeddings_are_the_least_squares_optimum_for_its_geometry(p):
    target, mask, counts, seed = p
    splats = GridInit()(target, mask, counts)
    L = target.shape[1]
    a = splat_weights(splats, L)
    best = relative_mse(render(splats, L), target, mask)
    g = torch.Generator().manual_seed(seed)
    for b in range(target.shape[0]):
        n, l = int(counts[b]), int(mask[b].sum())
        A = a[b, :l, :n].numpy()
        x, *_ = linalg.lstsq(A, target[b, :l].numpy())
        scale = float(np.abs(x).max()) + 1.0
        np.testing.assert_allclose(splats.v[b, :n].numpy(), x, atol=2e-3 * scale, rtol=2e-3)
    for _ in range(3):
        delta = 0.05 * torch.randn(splats.v.shape, generator=g, dtype=F64) * splats.mask[..., None]
        worse = relative_mse(render(splats.with_params({"v": splats.v + delta}), L), target, mask)
        # the solve's ridge (1e-4 of the Gram diagonal) biases v by O(ridge): where the grid fits the
        # target almost exactly (best ~ 1e-10) a perturbation may land a hair closer
        assert (worse >= best - 1e-6).all()
        assert (worse > best)[mask.sum(-1) > 0].any()


def test_jitter_follows_the_generator():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, 3, generator=g, dtype=F64)
    mask = torch.ones(2, 16, dtype=torch.bool)
    n = torch.tensor([5, 8])
    init = GridInit(jitter=0.8)
    a = init(target, mask, n, torch.Generator().manual_seed(1))
    b = init(target, mask, n, torch.Generator().manual_seed(1))
    c = init(target, mask, n, torch.Generator().manual_seed(2))
    assert torch.equal(a.mu, b.mu) and torch.equal(a.v, b.v)
    assert not torch.equal(a.mu, c.mu)
    plain = GridInit()(target, mask, n)
    assert torch.equal(GridInit()(target, mask, n, torch.Generator().manual_seed(5)).mu, plain.mu)


def test_a_generator_per_prompt_makes_each_prompts_jitter_its_own():
    """With one generator per prompt, a prompt's jittered centres do not depend on the rows beside it."""
    target = torch.randn(3, 16, 3, dtype=F64)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[2, 9:] = False
    n = torch.tensor([5, 8, 3])
    init = GridInit(jitter=0.8)
    together = init(target, mask, n, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = init(target[1:2], mask[1:2], n[1:2], [torch.Generator().manual_seed(11)])
    torch.testing.assert_close(together.mu[1], alone.mu[0], rtol=0, atol=0)
    assert not torch.equal(together.mu[0, :3], together.mu[2, :3])  # distinct seeds, distinct draws
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        init(target, mask, n, [torch.Generator(), torch.Generator()])


def test_resolve_initializer_by_name_or_object():
    assert isinstance(resolve_initializer("grid"), GridInit)
    assert isinstance(resolve_initializer("tokens"), TokenInit)
    custom = GridInit(sigma_scale=1.0)
    assert resolve_initializer(custom) is custom

    def mine(target, mask, n_splats, generator=None):
        return GridInit()(target, mask, n_splats, generator)

    assert resolve_initializer(mine) is mine
    assert isinstance(GridInit(), Initializer) and isinstance(TokenInit(), Initializer)


@pytest.mark.parametrize("name", ["learned", "gird", "", "GRID"])
def test_resolve_initializer_refuses_unknown_names(name):
    with pytest.raises(ValueError, match="init"):
        resolve_initializer(name)


def test_resolve_initializer_refuses_non_callables():
    with pytest.raises(TypeError, match="init must be a name or a callable initializer, not int"):
        resolve_initializer(3)


def test_initializers_keep_float32_targets_float32():
    target = torch.randn(1, 5, 2)
    mask = torch.ones(1, 5, dtype=torch.bool)
    for init in (GridInit(), TokenInit()):
        s = init(target, mask, torch.tensor([2]))
        assert all(t.dtype == torch.float32 for t in s.params().values())


@pytest.mark.parametrize("name", ["mu", "log_sigma", "weight_logit", "v"])
def test_a_warm_start_with_a_nan_in_an_active_splat_is_refused_before_the_fit(name):
    from splatopt import Targets, fit
    from splatopt.init import WarmStart

    field, mask = torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool)
    splats = GridInit()(field, mask, torch.tensor([2]))
    getattr(splats, name)[0, 1] = float("nan")
    with pytest.raises(ValueError, match=f"NaN or inf in {name}"):
        fit(Targets(field, mask), init=WarmStart(splats), objective="mse", steps=2, device="cpu", progress=False)



@pytest.mark.parametrize("init", [GridInit(), TokenInit()])
@pytest.mark.parametrize("case, error, message", [
    ("left padded", ValueError, "right-padded"), ("too many splats", ValueError, r"must lie in 1..L"),
    ("no splats", ValueError, r"must lie in 1..L"), ("int counts", TypeError, "integer tensor"),
    ("short mask", ValueError, "disagree on"), ("float mask", TypeError, "bool tensor"),
])
def test_initializers_refuse_layouts_they_would_misplace_splats_on(init, case, error, message):
    target, mask, n = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.tensor([2, 2])
    mask[1, 3:] = False
    bad = {"left padded": (target, mask.flip(1), n), "too many splats": (target, mask, torch.tensor([2, 4])),
           "no splats": (target, mask, torch.tensor([0, 2])), "int counts": (target, mask, 2),
           "short mask": (target, mask[:, :4], n), "float mask": (target, mask.float(), n)}[case]
    with pytest.raises(error, match=message):
        init(*bad)


@pytest.mark.parametrize("fields, message", [(dict(weight=1.0), "weight=1.0"), (dict(weight=0), "weight=0"),
                                             (dict(sigma_scale=-1), "sigma_scale=-1"), (dict(jitter=2), "jitter=2")])
def test_grid_fields_that_give_nan_or_inf_splats_are_refused(fields, message):
    for kind in (GridInit, TokenInit):
        with pytest.raises(ValueError, match=message):
            kind(**fields)


def test_the_initializer_class_instead_of_an_object_is_named():
    with pytest.raises(TypeError, match=r"pass an initializer object, e.g. GridInit\(\)"):
        resolve_initializer(GridInit)


@pytest.mark.parametrize("kernel, mode", [("gaussian", "normalized"), ("erf", "additive"), ("erf", "normalized")])
def test_a_fit_starts_from_the_grids_least_squares_optimum_of_its_own_render(kernel, mode):
    """GridInit solved its embeddings for the Gaussian additive render whatever the fit rendered with: a
    normalized fit of a random field started at relative MSE 0.517 where its render's optimum was 0.397."""
    import splatopt

    torch.manual_seed(0)
    target = torch.randn(2, 12, 5, dtype=F64)
    start = splatopt.fit(splatopt.Targets(target), n_splats=4, steps=0, objective="mse", kernel=kernel, mode=mode,
                         dtype=torch.float64, device="cpu", progress=False)
    splats = start.splats
    a = splat_weights(splats, 12, kernel, mode)
    best = torch.stack([torch.as_tensor(linalg.lstsq(a[b].numpy(), target[b].numpy())[0]) for b in range(2)])  # [2, 4, 5]
    np.testing.assert_allclose(splats.v.numpy(), best.numpy(), atol=1e-3 * (float(best.abs().max()) + 1.0))
    optimum = relative_mse(a @ best, target, torch.ones(2, 12, dtype=torch.bool))
    torch.testing.assert_close(start.field_error.double(), optimum, rtol=1e-3, atol=1e-6)


def test_a_grid_given_its_own_kernel_and_mode_keeps_them_and_bad_ones_are_named():
    assert GridInit(kernel="erf").for_render("gaussian", "normalized") == GridInit(kernel="erf", mode="normalized")
    assert GridInit().for_render("erf", "additive") == GridInit(kernel="erf", mode="additive")
    with pytest.raises(ValueError, match="GridInit.kernel='box'.*choose kernel from"):
        GridInit(kernel="box")


def test_token_init_in_normalized_mode_starts_each_splat_as_its_token():
    """Normalized rendering averages the splats' embeddings, so the token's own embedding (not it
    divided by the weight, the additive start) renders it."""
    target = torch.randn(1, 8, 3, dtype=F64)
    mask, n = torch.ones(1, 8, dtype=torch.bool), torch.tensor([8])
    additive, normalized = TokenInit(weight=0.4)(target, mask, n), TokenInit(weight=0.4).for_render("gaussian", "normalized")(target, mask, n)
    torch.testing.assert_close(additive.v, target / 0.4)
    torch.testing.assert_close(normalized.v, target)
    with pytest.raises(ValueError, match="TokenInit.mode='bogus'"):
        TokenInit(mode="bogus")
