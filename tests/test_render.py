"""Rendering: symmetries, linearity, masks, gradients, kernels, normalization, truncation, positions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from splatopt import KERNELS, MODES, GridInit, SplatSet, kernel_values, render, splat_weights
from splatopt.render import NORMALIZED_EPS
from splatopt.splats import SIGMA_MAX, SIGMA_MIN

FAST = settings(max_examples=25, deadline=None)
KERNEL_MODES = [(k, m) for k in KERNELS for m in MODES]


def random_splats(B=2, N=4, d=3, L=10, seed=0, dtype=torch.float64, p_active=0.75) -> SplatSet:
    """Random splats with centres in [0, L-1], widths in about [0.7, 3.3] tokens, slot 0 always active."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(B, N, generator=g, dtype=dtype) * (L - 1)
    log_sigma = torch.rand(B, N, generator=g, dtype=dtype) * 1.5 - 0.3
    weight_logit = torch.randn(B, N, generator=g, dtype=dtype)
    v = torch.randn(B, N, d, generator=g, dtype=dtype)
    mask = torch.rand(B, N, generator=g) < p_active
    mask[:, 0] = True
    return SplatSet(mu, log_sigma, weight_logit, v, mask)


def close(a, b, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ------------------------------------------------------------------ the documented formula


def formula_field(s: SplatSet, pos: torch.Tensor, kernel: str, mode: str) -> torch.Tensor:
    """The module docstring's F(t), one prompt, position and splat at a time in Python floats (math, not torch):
    weight = sigmoid(logit), sigma = exp(log_sigma) clamped to [SIGMA_MIN, SIGMA_MAX], inactive slots skipped."""
    B, L = pos.shape
    out = torch.zeros(B, L, s.dim, dtype=torch.float64)
    for b in range(B):
        for j in range(L):
            t = float(pos[b, j])
            coeffs = []
            for i in range(s.capacity):
                if not s.mask[b, i]:
                    continue
                mu = float(s.mu[b, i])
                sigma = min(max(math.exp(float(s.log_sigma[b, i])), SIGMA_MIN), SIGMA_MAX)
                w = 1.0 / (1.0 + math.exp(-float(s.weight_logit[b, i])))
                if kernel == "gaussian":
                    g = math.exp(-0.5 * ((t - mu) / sigma) ** 2)
                else:  # the Gaussian's mean over [t - 1/2, t + 1/2]
                    c = sigma * math.sqrt(2.0)
                    g = sigma * math.sqrt(math.pi / 2.0) * (math.erf((t + 0.5 - mu) / c) - math.erf((t - 0.5 - mu) / c))
                coeffs.append((w * g, s.v[b, i]))
            total = sum(a for a, _ in coeffs) + NORMALIZED_EPS if mode == "normalized" else 1.0
            for a, v in coeffs:
                out[b, j] += (a / total) * v.double()
    return out


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_render_is_the_documented_formula(kernel, mode):
    """Against F(t) = sum_i w_i g((t - mu_i) / sigma_i) v_i written out by hand: the symmetry tests
    below hold for any weight or width map (sigmoid(-logit), 2 sigma, w^2 all pass them)."""
    s = random_splats(B=2, N=5, d=3, seed=14, p_active=0.7)
    ls = s.log_sigma.clone()
    ls[0, 0], ls[1, 0] = -9.0, math.log(0.2)  # one below SIGMA_MIN (read clamped), one narrow
    s = s.with_params({"log_sigma": ls, "weight_logit": s.weight_logit * 2})
    pos = torch.tensor([[-1.5, 0.0, 0.4, 2.0, 5.5, 9.0], [0.0, 1.0, 3.25, 4.0, 7.7, 12.0]], dtype=torch.float64)
    close(render(s, pos, kernel, mode), formula_field(s, pos, kernel, mode), atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------ symmetries


@FAST
@given(
    seed=st.integers(0, 10_000),
    shift=st.floats(-40.0, 40.0, allow_nan=False),
    kernel=st.sampled_from(KERNELS),
    mode=st.sampled_from(MODES),
)
def test_render_is_translation_equivariant(seed, shift, kernel, mode):
    s = random_splats(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.rand(s.batch_size, 7, generator=g, dtype=torch.float64) * 12 - 1  # continuous, off the grid too
    moved = s.with_params({"mu": s.mu + shift})
    close(render(moved, pos + shift, kernel=kernel, mode=mode), render(s, pos, kernel=kernel, mode=mode), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_render_is_invariant_to_permuting_splat_slots(kernel, mode):
    s = random_splats(B=3, N=6, seed=3)
    perm = torch.randperm(s.capacity, generator=torch.Generator().manual_seed(0))
    permuted = SplatSet(s.mu[:, perm], s.log_sigma[:, perm], s.weight_logit[:, perm], s.v[:, perm], s.mask[:, perm])
    close(render(permuted, 10, kernel, mode), render(s, 10, kernel, mode))


# ------------------------------------------------------------------ linearity


@FAST
@given(seed=st.integers(0, 10_000), a=st.floats(-3, 3), b=st.floats(-3, 3), kernel=st.sampled_from(KERNELS), mode=st.sampled_from(MODES))
def test_render_is_linear_in_v(seed, a, b, kernel, mode):
    """Both modes: the coefficients do not depend on v, so the field is linear in v."""
    s = random_splats(seed=seed)
    v2 = torch.randn(s.v.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=s.v.dtype)
    mixed = render(s.with_params({"v": a * s.v + b * v2}), 10, kernel, mode)
    expected = a * render(s, 10, kernel, mode) + b * render(s.with_params({"v": v2}), 10, kernel, mode)
    close(mixed, expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kernel", KERNELS)
def test_additive_render_of_two_sets_concatenated_along_splats_is_the_sum(kernel):
    s1, s2 = random_splats(N=3, seed=1), random_splats(N=5, seed=2)
    both = SplatSet(*(torch.cat([t1, t2], 1) for t1, t2 in zip((s1.mu, s1.log_sigma, s1.weight_logit, s1.v, s1.mask),
                                                                 (s2.mu, s2.log_sigma, s2.weight_logit, s2.v, s2.mask))))
    pos = torch.linspace(-2, 12, 29, dtype=torch.float64)
    close(render(both, pos, kernel), render(s1, pos, kernel) + render(s2, pos, kernel))


# ------------------------------------------------------------------ inactive slots

garbage = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))


@FAST
@given(seed=st.integers(0, 10_000), mu=garbage, log_sigma=garbage, logit=garbage, v=garbage, kernel=st.sampled_from(KERNELS), mode=st.sampled_from(MODES))
def test_inactive_slots_contribute_nothing_whatever_they_hold(seed, mu, log_sigma, logit, v, kernel, mode):
    s = random_splats(B=2, N=5, seed=seed, p_active=0.5)
    s.mask[:, -1] = False  # at least one inactive slot per prompt
    off = ~s.mask
    params = {
        "mu": s.mu.masked_fill(off, mu),
        "log_sigma": s.log_sigma.masked_fill(off, log_sigma),
        "weight_logit": s.weight_logit.masked_fill(off, logit),
        "v": s.v.masked_fill(off[..., None], v),
    }
    changed = s.with_params(params)
    reference = render(s, 10, kernel, mode)
    field = render(changed, 10, kernel, mode)
    assert torch.isfinite(field).all()
    close(field, reference, atol=1e-12, rtol=1e-12)

    live = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    probe = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seed), dtype=reference.dtype)
    out = (render(changed.with_params(live), 10, kernel, mode) * probe).sum()
    grads = torch.autograd.grad(out, list(live.values()))
    for name, grad in zip(live, grads):
        sel = off if grad.dim() == 2 else off[..., None].expand_as(grad)
        assert torch.equal(grad[sel], torch.zeros_like(grad[sel])), name
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("mode", MODES)
def test_prompt_without_active_splats_renders_zero(mode):
    s = random_splats(B=2, seed=4)
    s.mask[1] = False
    field = render(s, 10, mode=mode)
    assert torch.equal(field[1], torch.zeros_like(field[1]))
    assert field[0].abs().sum() > 0


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
@pytest.mark.parametrize("positions", ["int", "float"])
def test_render_gradients_match_finite_differences(kernel, mode, positions):
    s = random_splats(B=2, N=3, d=2, L=5, seed=11, p_active=1.0)
    s.mask[1, 2] = False
    pos = 5 if positions == "int" else torch.tensor([[-0.7, 0.3, 1.9, 4.2], [0.1, 2.5, 2.6, 5.5]], dtype=torch.float64)

    def f(mu, log_sigma, weight_logit, v):
        return render(SplatSet(mu, log_sigma, weight_logit, v, s.mask), pos, kernel=kernel, mode=mode)

    inputs = tuple(t.clone().requires_grad_(True) for t in (s.mu, s.log_sigma, s.weight_logit, s.v))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_render_keeps_the_splats_dtype():
    s = random_splats(dtype=torch.float32)
    assert render(s, 6).dtype == torch.float32
    assert render(s, torch.arange(6, dtype=torch.float64)).dtype == torch.float32
    assert render(s.to(dtype=torch.float64), 6).dtype == torch.float64


# ------------------------------------------------------------------ kernels


def test_erf_kernel_converges_to_the_point_gaussian_as_sigma_grows():
    errors = []
    for sigma in (0.5, 1.0, 2.0, 5.0, 10.0, 20.0):
        mu = torch.tensor([[0.3]], dtype=torch.float64)
        pos = torch.linspace(-4 * sigma, 4 * sigma, 201, dtype=torch.float64)[None]
        s = torch.tensor([[sigma]], dtype=torch.float64)
        gauss = kernel_values(pos, mu, s, "gaussian")
        box = kernel_values(pos, mu, s, "erf")
        errors.append(float((box - gauss).abs().max() / gauss.abs().max()))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3
    assert errors[0] > 1e-2  # at sigma = 1/2 the box average is visibly different


@pytest.mark.parametrize("sigma", [SIGMA_MIN, 0.3, 1.0, 7.0])
@pytest.mark.parametrize("x", [0.0, 0.4, -1.3, 3.0, 12.0])
def test_erf_kernel_is_the_gaussian_averaged_over_the_unit_token_box(sigma, x):
    mu = 2.0
    t = mu + x
    value = kernel_values(torch.tensor([[t]], dtype=torch.float64), torch.tensor([[mu]], dtype=torch.float64),
                          torch.tensor([[sigma]], dtype=torch.float64), "erf")
    expected, _ = integrate.quad(lambda u: math.exp(-0.5 * ((u - mu) / sigma) ** 2), t - 0.5, t + 0.5,
                                 points=[mu] if abs(x) <= 0.5 else None, epsabs=1e-14, epsrel=1e-12, limit=200)
    assert float(value) == pytest.approx(expected, rel=1e-8, abs=1e-14)


WIDTHS_ACROSS_THE_SERIES_SWITCH = [0.3, 2.0, 3.99, 4.0, 31.9, 32.0, 100.0, 1000.0, SIGMA_MAX]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", WIDTHS_ACROSS_THE_SERIES_SWITCH)
def test_erf_kernel_keeps_its_dtypes_precision_at_every_width(sigma, dtype):
    """erf(x + 1/2) - erf(x - 1/2) cancels for wide splats: the plain difference was off by 1e-4 of
    the value at sigma = 100 and 1e-2 at 4096 in float32 (and beyond 3 widths, by 100 %)."""
    xs = [k * sigma / 4 for k in range(17)] + [0.2, 0.5, 0.9, 1.7]  # out to 4 widths, and inside the token
    expected = torch.tensor([integrate.quad(lambda u: math.exp(-0.5 * (u / sigma) ** 2), x - 0.5, x + 0.5,
                                            epsabs=0.0, epsrel=1e-13, limit=200)[0] for x in xs], dtype=torch.float64)
    value = kernel_values(torch.tensor([xs], dtype=dtype), torch.zeros(1, 1, dtype=dtype),
                          torch.tensor([[sigma]], dtype=dtype), "erf")[0, :, 0].double()
    rel = ((value - expected).abs() / expected).max()
    assert rel < (2e-6 if dtype == torch.float32 else 1e-12), float(rel)


@pytest.mark.parametrize("sigma", WIDTHS_ACROSS_THE_SERIES_SWITCH)
def test_erf_kernel_gradients_are_the_gaussian_difference_across_the_token_at_every_width(sigma):
    """d g / d mu = f(x - 1/2) - f(x + 1/2) for the box mean g of the Gaussian f, and d g / d sigma
    as a float64 finite difference; the float32 autograd gradients of both branches must match them."""
    xs = torch.tensor([0.0, 0.3, 0.5 * sigma, sigma, 2.5 * sigma], dtype=torch.float64)
    x = xs[None]
    f_minus = torch.exp(-0.5 * ((xs - 0.5) / sigma) ** 2)
    d_mu = -(f_minus * torch.expm1(-xs / sigma**2))  # f(x-1/2) - f(x+1/2) without cancelling
    h = 1e-6 * sigma
    g64 = lambda s: kernel_values(x, torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), s, dtype=torch.float64), "erf")
    d_sigma = ((g64(sigma + h) - g64(sigma - h)) / (2 * h))[0, :, 0]
    mu = torch.zeros(1, 1, requires_grad=True)
    s = torch.full((1, 1), float(sigma), requires_grad=True)
    for k in range(xs.numel()):
        g = kernel_values(x.float()[:, k : k + 1], mu, s, "erf").sum()
        got_mu, got_sigma = torch.autograd.grad(g, (mu, s))
        scale_mu = max(abs(float(d_mu[k])), 1e-3 / sigma)  # the mu-gradient vanishes at the centre
        assert abs(float(got_mu) - float(d_mu[k])) < 1e-4 * scale_mu, (k, float(got_mu), float(d_mu[k]))
        scale_sigma = max(abs(float(d_sigma[k])), 1e-3 / sigma)
        assert abs(float(got_sigma) - float(d_sigma[k])) < 1e-4 * scale_sigma, (k, float(got_sigma), float(d_sigma[k]))


def test_erf_kernel_gradient_stays_finite_far_out_of_narrow_splats():
    """Both branches are evaluated; the series' polynomial at x / sigma = 1e6 must not overflow into
    a NaN gradient through the branch that is not used."""
    mu = torch.zeros(1, 2, requires_grad=True)
    log_sigma = torch.tensor([[math.log(SIGMA_MIN), math.log(SIGMA_MAX)]], requires_grad=True)
    pos = torch.tensor([[0.0, 3.0, 5e4, 3e7]])
    g = kernel_values(pos, mu, log_sigma.exp(), "erf")
    assert torch.isfinite(g).all()
    grads = torch.autograd.grad(g.sum(), (mu, log_sigma))
    assert all(torch.isfinite(t).all() for t in grads)


def test_gaussian_kernel_samples_at_the_token_centre():
    pos = torch.tensor([[0.0, 1.0, 2.5]], dtype=torch.float64)
    g = kernel_values(pos, torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64), "gaussian")
    close(g[0, :, 0], torch.exp(-0.5 * ((pos[0] - 1.0) / 2.0) ** 2))


def test_render_clamps_sigma_like_splatset_sigma():
    s = random_splats(B=1, N=2, seed=5, p_active=1.0)
    tiny = s.with_params({"log_sigma": torch.full_like(s.log_sigma, -50.0)})
    at_min = s.with_params({"log_sigma": torch.full_like(s.log_sigma, math.log(SIGMA_MIN))})
    close(render(tiny, 10, "erf"), render(at_min, 10, "erf"))
    huge = s.with_params({"log_sigma": torch.full_like(s.log_sigma, 50.0)})
    at_max = s.with_params({"log_sigma": torch.full_like(s.log_sigma, math.log(SIGMA_MAX))})
    close(render(huge, 10), render(at_max, 10))


# ------------------------------------------------------------------ normalized mode


@FAST
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(KERNELS), c=st.floats(-5, 5))
def test_normalized_mode_is_a_partition_of_unity_where_splats_have_mass(seed, kernel, c):
    s = random_splats(B=3, N=5, seed=seed)
    pos = torch.linspace(-3, 12, 31, dtype=torch.float64)
    mass = splat_weights(s, pos, kernel, "additive").sum(-1)  # [B, L] total unnormalized coefficient
    coeff = splat_weights(s, pos, kernel, "normalized")
    where = mass > 1e-2
    assert where.any()
    close(coeff.sum(-1)[where], torch.ones_like(mass[where]), atol=1e-3, rtol=0)
    # exactly the documented regularized normalization everywhere
    close(coeff.sum(-1), mass / (mass + NORMALIZED_EPS))
    assert (coeff >= 0).all()
    constant = s.with_params({"v": torch.full_like(s.v, c)})
    field = render(constant, pos, kernel, "normalized")
    close(field[where], torch.full_like(field[where], c), atol=1e-3 * max(1.0, abs(c)), rtol=0)


# ------------------------------------------------------------------ truncation


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [0.5, 1.0, 2.5])
def test_truncation_zeroes_coefficients_beyond_k_sigma_and_keeps_the_rest(kernel, k):
    s = random_splats(B=2, N=5, seed=8)
    pos = torch.linspace(-3, 12, 61, dtype=torch.float64)
    full = splat_weights(s, pos, kernel, "additive")
    cut = splat_weights(s, pos, kernel, "additive", truncate=k)
    dist = (pos[None, :, None] - s.mu[:, None, :]).abs()
    far = dist > k * s.sigma[:, None, :]
    assert far.any() and (~far).any()
    assert torch.equal(cut[far], torch.zeros_like(cut[far]))
    assert torch.equal(cut[~far], full[~far])
    # normalized: truncated splats still contribute exactly nothing beyond k sigma
    cut_norm = splat_weights(s, pos, kernel, "normalized", truncate=k)
    assert torch.equal(cut_norm[far], torch.zeros_like(cut_norm[far]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_truncation_keeps_a_splat_at_exactly_k_sigma_and_render_local_agrees(kernel):
    """"Beyond truncate * sigma" is strict: at exactly that distance the splat still contributes, in the
    dense and the local path alike (sigma = exp(0) = 1, so the distances are exact)."""
    from splatopt import render_local

    s = SplatSet(torch.tensor([[2.0, 9.0]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                 torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, 1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool))
    a = splat_weights(s, 14, kernel, truncate=3.0)  # reaches [-1, 5] and [6, 12]
    assert a[0, 5, 0] > 0 and a[0, 6, 1] > 0 and a[0, 12, 1] > 0  # exactly 3 sigma away: kept
    assert a[0, 6, 0] == 0 and a[0, 5, 1] == 0 and a[0, 13, 1] == 0  # beyond: cut
    close(render_local(s, 14, kernel, truncate=3.0, tile=4), render(s, 14, kernel, truncate=3.0), atol=0, rtol=0)


# ------------------------------------------------------------------ positions and arguments


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_int_length_1d_and_2d_positions_agree(kernel, mode):
    s = random_splats(B=3, seed=9)
    L = 8
    as_int = render(s, L, kernel, mode)
    as_1d = render(s, torch.arange(L), kernel, mode)
    as_2d = render(s, torch.arange(L, dtype=torch.float64).expand(3, L).clone(), kernel, mode)
    as_list = render(s, list(range(L)), kernel, mode)
    assert as_int.shape == (3, L, s.dim)
    for other in (as_1d, as_2d, as_list):
        close(other, as_int, atol=0, rtol=0)


def test_per_prompt_positions_render_each_prompt_at_its_own_positions():
    s = random_splats(B=2, seed=10)
    pos = torch.tensor([[0.0, 1.5, 3.0], [2.0, 2.25, 9.0]], dtype=torch.float64)
    field = render(s, pos)
    for b in range(2):
        close(field[b], render(s.select(b), pos[b])[0])


@pytest.mark.parametrize(
    "bad, message",
    [(0, "render length must be >= 1, got 0"), (-3, "render length must be >= 1, got -3"),
     (torch.zeros(3, 5), r"\[B=2, L\]; got shape \(3, 5\)"), (torch.zeros(2, 3, 4), r"\[B=2, L\]; got shape \(2, 3, 4\)"),
     (torch.tensor(4.0), "render length must be an int L >= 1")],
    ids=["zero-length", "negative-length", "wrong-batch", "3d", "0d"],
)
def test_bad_positions_raise_value_error(bad, message):
    s = random_splats(B=2)
    with pytest.raises(ValueError, match=message):
        render(s, bad)


def test_unknown_kernel_or_mode_raise_value_error():
    s = random_splats()
    with pytest.raises(ValueError, match="kernel"):
        render(s, 5, kernel="box")
    with pytest.raises(ValueError, match="mode"):
        render(s, 5, mode="softmax")
    with pytest.raises(ValueError, match="kernel"):
        kernel_values(torch.zeros(1, 2), torch.zeros(1, 1), torch.ones(1, 1), "cauchy")


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_coefficients_are_the_formulas_and_the_field_is_them_times_embeddings(kernel, mode):
    """splat_weights' column i is the formula's field of unit embeddings e_i (render calls splat_weights,
    so comparing the two alone would check nothing); inactive columns are zero."""
    s = random_splats(seed=12)
    assert (~s.mask).any()
    unit = s.with_params({"v": torch.eye(s.capacity, dtype=s.v.dtype).expand(s.batch_size, -1, -1)})
    pos = torch.arange(10, dtype=torch.float64).expand(s.batch_size, -1)
    a = splat_weights(s, 10, kernel, mode)
    close(a, formula_field(unit, pos, kernel, mode), atol=1e-12, rtol=1e-10)
    assert torch.equal(a.transpose(1, 2)[~s.mask], torch.zeros_like(a.transpose(1, 2)[~s.mask]))
    close(render(s, 10, kernel, mode), a @ s.v)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("log_sigma", [-800.0, 800.0])
def test_active_splat_with_extreme_width_has_finite_gradients(kernel, log_sigma):
    """exp() of a huge log width overflows; the clamp must not turn that into a NaN gradient."""
    s = random_splats(B=1, N=2, seed=13, p_active=1.0)
    ls = s.log_sigma.clone()
    ls[0, 1] = log_sigma
    live = ls.requires_grad_(True)
    field = render(s.with_params({"log_sigma": live}), 10, kernel)
    assert torch.isfinite(field).all()
    (grad,) = torch.autograd.grad(field.sum(), live)
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 0  # clamped: no gradient through the bound


def test_render_takes_numpy_and_torch_integer_lengths_and_refuses_a_bad_cutoff():
    import numpy as np

    field, mask = torch.randn(2, 8, 4), torch.ones(2, 8, dtype=torch.bool)
    splats = GridInit()(field, mask, torch.tensor([2, 3]))
    for length in (np.int64(8), torch.tensor(8)):
        assert torch.equal(render(splats, length), render(splats, 8))
    for cutoff in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="truncate="):
            render(splats, 8, truncate=cutoff)


@pytest.mark.parametrize("length", [4.0, torch.tensor(4.0)], ids=["float", "0d-float-tensor"])
def test_a_float_length_is_refused_naming_the_fix(length):
    """The message said "got shape ()", naming neither the length nor the fix."""
    with pytest.raises(ValueError, match=r"render length must be an int L >= 1, not .*4\..*\[L\] or \[B, L\] tensor"):
        render(random_splats(B=2), length)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_erf_kernel_in_half_precision_is_finite_and_the_float32_value_rounded(dtype):
    """Both branches are evaluated: in float16 the series' polynomial overflowed where exp had already
    underflowed, and 0 * inf made 135 of 200 positions NaN, and NaN gradients for narrow splats too."""
    sigma = torch.tensor([[8.0, 8.0, 2.0, 0.3]])
    mu = torch.tensor([[10.0, 150.0, 60.0, 99.0]])
    pos = torch.arange(200.0)[None]
    half_mu, half_sigma = mu.to(dtype).requires_grad_(), sigma.to(dtype).requires_grad_()
    g = kernel_values(pos.to(dtype), half_mu, half_sigma, "erf")
    assert g.dtype == dtype and torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), kernel_values(pos, half_mu.detach().float(), half_sigma.detach().float(), "erf"),
                               rtol=1e-2, atol=1e-3)
    assert all(torch.isfinite(t).all() for t in torch.autograd.grad(g.float().sum(), (half_mu, half_sigma)))


def test_a_bool_render_length_is_a_type_error():
    """render(splats, True) rendered one position: a bool is an int to Python, not a length."""
    with pytest.raises(TypeError, match="render length must be an int L >= 1, not True"):
        render(random_splats(), True)
