"""Functional Adam (against torch.optim.Adam), NaN guard, unrolled differentiability, clipping,
learning-rate schedules and the closed-form (variable projection) embeddings."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg

from splatopt import InnerOptimizer, SplatSet, adam_init, adam_step, closed_form_v, relative_mse, render, splat_weights
from splatopt.optim import GROUPS

FAST = settings(max_examples=25, deadline=None)
F64 = torch.float64


def random_params(B=3, N=4, d=3, seed=0, dtype=F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "mu": torch.rand(B, N, generator=g, dtype=dtype) * 7,
        "log_sigma": torch.rand(B, N, generator=g, dtype=dtype) * 0.8,
        "weight_logit": torch.randn(B, N, generator=g, dtype=dtype),
        "v": torch.randn(B, N, d, generator=g, dtype=dtype),
    }


def random_grads(params, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}


LRS = {"mu": 0.1, "log_sigma": 0.03, "weight_logit": 0.05, "v": 0.02}


# ------------------------------------------------------------------ Adam


def test_adam_step_matches_torch_adam_on_a_random_quadratic():
    params = random_params(B=2, N=3, d=2, seed=3)
    sizes = [p.numel() for p in params.values()]
    n = sum(sizes)
    g = torch.Generator().manual_seed(4)
    root = torch.randn(n, n, generator=g, dtype=F64)
    Q = root @ root.T / n + torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)

    def loss_of(tensors):
        x = torch.cat([t.flatten() for t in tensors])
        return 0.5 * x @ Q @ x + b @ x

    cfg = InnerOptimizer(beta1=0.9, beta2=0.99, eps=1e-8, eps_root=0.0)
    ours = {k: p.clone() for k, p in params.items()}
    state = adam_init(ours)
    theirs = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    reference = torch.optim.Adam(
        [{"params": [theirs[k]], "lr": LRS[k]} for k in GROUPS], betas=(0.9, 0.99), eps=1e-8
    )
    for _ in range(20):
        live = {k: p.clone().requires_grad_(True) for k, p in ours.items()}
        grads = dict(zip(live, torch.autograd.grad(loss_of(live.values()), list(live.values()))))
        ours, state, skipped = adam_step(ours, grads, state, LRS, cfg)
        assert not skipped.any()
        reference.zero_grad()
        loss_of([theirs[k] for k in GROUPS]).backward()
        reference.step()
    assert state["t"] == 20
    for k in GROUPS:
        torch.testing.assert_close(ours[k], theirs[k].detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[k], theirs[k].detach(), atol=1e-12, rtol=1e-10)  # in fact identical


def test_adam_step_takes_per_prompt_learning_rate_tensors():
    params = random_params(B=3)
    grads = random_grads(params)
    cfg = InnerOptimizer(eps_root=0.0)
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=F64)[:, None, None]
    base, _, _ = adam_step(params, grads, adam_init(params), {**LRS, "v": LRS["v"]}, cfg)
    scaled, _, _ = adam_step(params, grads, adam_init(params), {**LRS, "v": LRS["v"] * scale}, cfg)
    torch.testing.assert_close(scaled["v"] - params["v"], (base["v"] - params["v"]) * scale)


def test_adam_step_does_not_modify_its_inputs():
    params = random_params()
    grads = random_grads(params)
    state = adam_init(params)
    snapshot = {k: p.clone() for k, p in params.items()}, {k: g.clone() for k, g in grads.items()}
    new_p, new_state, _ = adam_step(params, grads, state, LRS, InnerOptimizer())
    for k in GROUPS:
        assert torch.equal(params[k], snapshot[0][k]) and torch.equal(grads[k], snapshot[1][k])
        assert torch.equal(state["m"][k], torch.zeros_like(params[k])) and state["t"] == 0
        assert new_p[k] is not params[k]


# ------------------------------------------------------------------ NaN guard


@FAST
@given(bad_prompt=st.integers(0, 2), group=st.sampled_from(GROUPS), value=st.sampled_from([float("nan"), float("inf"), -float("inf")]), warm=st.booleans())
def test_prompt_with_nonfinite_gradient_is_skipped_and_others_are_unaffected(bad_prompt, group, value, warm):
    params = random_params(B=3)
    cfg = InnerOptimizer()
    state = adam_init(params)
    if warm:  # non-zero moments, so "unchanged" means something
        params, state, _ = adam_step(params, random_grads(params, seed=5), state, LRS, cfg)
    grads = random_grads(params, seed=6)
    grads[group] = grads[group].clone()
    grads[group][bad_prompt].view(-1)[0] = value
    new_p, new_state, skipped = adam_step(params, grads, state, LRS, cfg)
    assert skipped.tolist() == [b == bad_prompt for b in range(3)]
    for k in GROUPS:
        assert torch.equal(new_p[k][bad_prompt], params[k][bad_prompt])
        assert torch.equal(new_state["m"][k][bad_prompt], state["m"][k][bad_prompt])
        assert torch.equal(new_state["v"][k][bad_prompt], state["v"][k][bad_prompt])
        assert torch.isfinite(new_p[k]).all() and torch.isfinite(new_state["m"][k]).all() and torch.isfinite(new_state["v"][k]).all()
    # the other prompts: exactly as if the bad one were not in the batch
    keep = [b for b in range(3) if b != bad_prompt]
    sub = lambda d: {k: t[keep] for k, t in d.items()}  # noqa: E731
    sub_state = {"m": sub(state["m"]), "v": sub(state["v"]), "t": state["t"]}
    alone_p, alone_state, alone_skipped = adam_step(sub(params), sub(grads), sub_state, LRS, cfg)
    assert not alone_skipped.any()
    for k in GROUPS:
        assert torch.equal(new_p[k][keep], alone_p[k])
        assert torch.equal(new_state["m"][k][keep], alone_state["m"][k])
        assert torch.equal(new_state["v"][k][keep], alone_state["v"][k])


# ------------------------------------------------------------------ differentiable unrolling


def test_two_unrolled_adam_steps_are_differentiable_in_the_initial_splats():
    """Meta-training backpropagates through the inner loop: no in-place update may break the graph."""
    B, N, d, L = 2, 2, 2, 5
    g = torch.Generator().manual_seed(21)
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    tok = torch.ones(B, L, dtype=torch.bool)
    tok[1, 4] = False
    mask = torch.ones(B, N, dtype=torch.bool)
    cfg = InnerOptimizer(eps_root=1e-12)
    lrs = {"mu": 0.3, "log_sigma": 0.1, "weight_logit": 0.2, "v": 0.1}

    def loss_after_two_steps(mu, log_sigma, weight_logit, v):
        params = {"mu": mu, "log_sigma": log_sigma, "weight_logit": weight_logit, "v": v}
        state = adam_init(params)

        def loss(p):
            return relative_mse(render(SplatSet(**p, mask=mask), L), target, tok).sum()

        for _ in range(2):
            grads = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
            params, state, _ = adam_step(params, dict(zip(params, grads)), state, lrs, cfg)
        return loss(params)

    init = (
        torch.tensor([[0.5, 3.2], [1.0, 2.9]], dtype=F64),
        torch.tensor([[0.3, 0.1], [0.0, 0.4]], dtype=F64),
        torch.tensor([[0.2, -0.4], [0.5, 0.1]], dtype=F64),
        torch.randn(B, N, d, generator=g, dtype=F64),
    )
    inputs = tuple(t.clone().requires_grad_(True) for t in init)
    out = loss_after_two_steps(*inputs)
    grads = torch.autograd.grad(out, inputs)
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
    assert torch.autograd.gradcheck(loss_after_two_steps, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_unrolled_step_with_zero_gradient_has_finite_meta_gradient():
    """eps_root inside the square root: d sqrt(v + eps_root) / dv is finite at v = 0."""
    p = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    params = {"mu": p}
    g = 2 * (p - torch.tensor([[0.0, 1.0, -1.0]], dtype=F64))  # zero gradient in the first slot
    new, _, _ = adam_step(params, {"mu": g}, adam_init(params), {"mu": 0.1}, InnerOptimizer())
    (meta,) = torch.autograd.grad(new["mu"].sum(), p)
    assert torch.isfinite(meta).all()


# ------------------------------------------------------------------ clipping


@FAST
@given(scales=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3), clip=st.floats(0.05, 5.0), seed=st.integers(0, 1000))
def test_per_prompt_clip_bounds_each_prompts_gradient_independently(scales, clip, seed):
    params = random_params(B=3, seed=seed)
    raw = random_grads(params, seed=seed + 1)
    grads = {k: g * torch.tensor(scales, dtype=F64).view((-1,) + (1,) * (g.dim() - 1)) for k, g in raw.items()}
    cfg = InnerOptimizer(clip=clip)
    _, state, _ = adam_step(params, grads, adam_init(params), LRS, cfg)
    for k in GROUPS:
        used = state["m"][k] / (1 - cfg.beta1)  # the gradient the first step used
        for b in range(3):
            norm = float(grads[k][b].norm())
            assert float(used[b].norm()) <= clip * (1 + 1e-9)
            expected = grads[k][b] * min(1.0, clip / norm)
            torch.testing.assert_close(used[b], expected, atol=1e-12, rtol=1e-9)
    # prompt 0 does not care what the others' gradients are
    wild = {k: torch.cat([g[:1], g[1:] * 1e6]) for k, g in grads.items()}
    new_a, _, _ = adam_step(params, grads, adam_init(params), LRS, cfg)
    new_b, _, _ = adam_step(params, wild, adam_init(params), LRS, cfg)
    for k in GROUPS:
        assert torch.equal(new_a[k][0], new_b[k][0])


# ------------------------------------------------------------------ learning rates


def test_position_learning_rate_decays_log_linearly_to_lr_mu_times_mu_decay():
    cfg = InnerOptimizer(lr_mu=0.2, mu_decay=0.01)
    scale = torch.ones(1, 1, 1)
    rates = [cfg.learning_rates(s, 100, scale)["mu"] for s in range(0, 101, 10)]
    assert rates[0] == pytest.approx(0.2)
    assert rates[-1] == pytest.approx(0.2 * 0.01)
    logs = np.log(rates)
    np.testing.assert_allclose(np.diff(logs), np.full(10, math.log(0.01) / 10), rtol=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_group_schedules_start_at_the_learning_rate_and_end_at_final_factor(schedule):
    cfg = InnerOptimizer(lr_log_sigma=0.04, lr_weight=0.06, lr_v=0.1, schedule=schedule, final_lr_factor=0.1)
    scale = torch.tensor([1.0, 3.0])[:, None, None]
    start, end = cfg.learning_rates(0, 50, scale), cfg.learning_rates(50, 50, scale)
    final = 1.0 if schedule == "constant" else 0.1
    assert start["log_sigma"] == pytest.approx(0.04) and end["log_sigma"] == pytest.approx(0.04 * final)
    assert start["weight_logit"] == pytest.approx(0.06) and end["weight_logit"] == pytest.approx(0.06 * final)
    torch.testing.assert_close(start["v"], 0.1 * scale)
    torch.testing.assert_close(end["v"], 0.1 * final * scale)
    series = [cfg.learning_rates(s, 50, scale)["log_sigma"] for s in range(51)]
    assert all(b <= a + 1e-15 for a, b in zip(series, series[1:]))  # never increases
    if schedule == "cosine":
        assert series[25] == pytest.approx(0.04 * (0.1 + 0.9 * 0.5))
    if schedule == "wsd":  # constant for the first 80 % of the steps, then linear to the final factor at step 50
        assert series[40] == pytest.approx(0.04) and series[45] == pytest.approx(0.04 * (1 - 0.9 * 0.5))
        assert series[49] == pytest.approx(0.04 * (1 - 0.9 * 0.9))  # the last step taken: one step short, as every schedule


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schedule": "exponential"},
        {"lr_mu": -0.1},
        {"lr_v": float("nan")},
        {"lr_weight": float("inf")},
        {"lr_log_sigma": -1e-9},
        {"mu_decay": 0.0},
        {"mu_decay": -0.5},
        {"final_lr_factor": -0.1},
        {"decay_fraction": 0.0},
        {"decay_fraction": 1.5},
        {"decay_fraction": True},
        {"decay_fraction": "0.5"},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"eps": -1e-8},
        {"clip": 0.0},
        {"lr_mu": "0.1"},
        {"lr_v": None},
        {"warmup": True},
    ],
    ids=lambda kw: next(iter(kw)) + "=" + str(next(iter(kw.values()))),
)
def test_bad_optimizer_settings_raise_value_error(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=f"^{name}={value!r}".replace("(", r"\(").replace(".", r"\.")):  # names the field it refuses
        InnerOptimizer(**kwargs)


def test_optimizer_settings_round_trip_through_a_dict():
    cfg = InnerOptimizer(lr_mu=0.3, schedule="linear", clip=2.0)
    assert InnerOptimizer(**cfg.to_dict()) == cfg


def test_target_rms_is_the_per_prompt_rms_per_dimension_over_the_prompts_tokens():
    """The unit of lr_v: sqrt(mean of T^2 over the prompt's tokens and the d dimensions); padding, NaN
    included, is not read. So a target c times larger moves the embeddings c times further per step."""
    from splatopt.optim import target_rms

    g = torch.Generator().manual_seed(3)
    target = torch.randn(3, 7, 5, generator=g, dtype=F64) * torch.tensor([1.0, 4.0, 0.1], dtype=F64)[:, None, None]
    mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None]
    want = torch.stack([target[b][mask[b]].pow(2).mean().sqrt() for b in range(3)])
    padded = torch.where(mask[..., None], target, float("nan"))
    rms = target_rms(padded, mask)
    assert rms.shape == (3, 1, 1)
    torch.testing.assert_close(rms.flatten(), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(target_rms(torch.full((1, 6, 384), 2.5, dtype=F64), torch.ones(1, 6, dtype=torch.bool)),
                               torch.full((1, 1, 1), 2.5, dtype=F64))


# ------------------------------------------------------------------ closed-form embeddings


def lstsq_reference(a, target, tok, act):
    """Per prompt: argmin |A v - T|^2 over its tokens and active slots (scipy), zeros elsewhere."""
    B, L, N = a.shape
    out = np.zeros((B, N, target.shape[-1]))
    for b in range(B):
        A = a[b].numpy()[tok[b].numpy()][:, act[b].numpy()]
        T = target[b].numpy()[tok[b].numpy()]
        x, *_ = linalg.lstsq(A, T)
        out[b, act[b].numpy()] = x
    return torch.from_numpy(out)


@FAST
@given(seed=st.integers(0, 10_000))
def test_closed_form_v_is_the_least_squares_solution(seed):
    B, L, N, d = 3, 9, 4, 3
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, L, N, generator=g, dtype=F64) + 0.1 * torch.eye(L, N, dtype=F64)
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    tok = torch.ones(B, L, dtype=torch.bool)
    tok[1, 7:] = False
    tok[2, 5:] = False
    act = torch.ones(B, N, dtype=torch.bool)
    act[0, 3] = False
    act[2, 1] = False
    v = closed_form_v(a, target, tok, act, ridge=1e-10)
    torch.testing.assert_close(v, lstsq_reference(a, target, tok, act), atol=1e-6, rtol=1e-6)
    assert torch.equal(v[~act], torch.zeros_like(v[~act]))


def test_closed_form_v_ignores_masked_token_positions():
    B, L, N, d = 2, 8, 3, 2
    g = torch.Generator().manual_seed(2)
    a = torch.rand(B, L, N, generator=g, dtype=F64)
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    tok = torch.ones(B, L, dtype=torch.bool)
    tok[0, 6:] = False
    tok[1, 2] = False
    act = torch.ones(B, N, dtype=torch.bool)
    v = closed_form_v(a, target, tok, act)
    a2 = torch.where(tok[..., None], a, torch.full_like(a, float("nan")))
    target2 = torch.where(tok[..., None], target, torch.full_like(target, float("nan")))
    v2 = closed_form_v(a2, target2, tok, act)
    assert torch.isfinite(v2).all()
    torch.testing.assert_close(v2, v, atol=1e-12, rtol=1e-10)


def test_closed_form_v_handles_coincident_and_empty_splats():
    B, L, N, d = 2, 6, 3, 2
    g = torch.Generator().manual_seed(3)
    column = torch.rand(B, L, 1, generator=g, dtype=F64)
    a = column.expand(B, L, N).clone()  # three identical splats: singular without the ridge
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    act = torch.ones(B, N, dtype=torch.bool)
    act[1] = False  # a prompt with no active splat
    v = closed_form_v(a, target, torch.ones(B, L, dtype=torch.bool), act)
    assert torch.isfinite(v).all()
    assert torch.equal(v[1], torch.zeros_like(v[1]))
    # the three copies share the least-squares coefficient of the one column
    best = (column[0, :, 0] @ target[0]) / (column[0, :, 0] @ column[0, :, 0])
    torch.testing.assert_close(v[0].sum(0), best, atol=1e-3, rtol=1e-3)


def test_closed_form_v_is_differentiable_in_the_coefficients():
    B, L, N, d = 1, 6, 2, 2
    g = torch.Generator().manual_seed(4)
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    tok = torch.ones(B, L, dtype=torch.bool)
    act = torch.ones(B, N, dtype=torch.bool)
    a = (torch.rand(B, L, N, generator=g, dtype=F64) + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: closed_form_v(a, target, tok, act), (a,), eps=1e-6, atol=1e-6)


def test_closed_form_v_on_rendered_coefficients_minimises_the_field_error():
    B, L, N, d = 2, 10, 3, 4
    g = torch.Generator().manual_seed(5)
    splats = SplatSet(torch.tensor([[1.0, 4.5, 8.0]] * B, dtype=F64), torch.zeros(B, N, dtype=F64),
                      torch.zeros(B, N, dtype=F64), torch.zeros(B, N, d, dtype=F64), torch.ones(B, N, dtype=torch.bool))
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    tok = torch.ones(B, L, dtype=torch.bool)
    v = closed_form_v(splat_weights(splats, L), target, tok, splats.mask, ridge=1e-12)
    best = relative_mse(render(splats.with_params({"v": v}), L), target, tok)
    for k in range(5):
        nudged = v + 1e-2 * torch.randn(v.shape, generator=g, dtype=F64)
        assert (relative_mse(render(splats.with_params({"v": nudged}), L), target, tok) > best).all()


def test_warmup_ramps_every_learning_rate_linearly():
    from splatopt.optim import InnerOptimizer

    opt = InnerOptimizer(warmup=4, schedule="constant", mu_decay=1.0)
    scale = torch.ones(1, 1, 1)
    first, later = opt.learning_rates(0, 100, scale), opt.learning_rates(10, 100, scale)
    for k in ("mu", "log_sigma", "weight_logit"):
        assert abs(first[k] - 0.25 * later[k]) < 1e-12
    assert torch.allclose(first["v"], 0.25 * later["v"])
    with pytest.raises(ValueError, match="warmup"):
        InnerOptimizer(warmup=-1)


def test_numpy_scalars_are_numbers_and_stay_json_able():
    import json

    opt = InnerOptimizer(lr_mu=np.float32(0.25), warmup=np.int64(3), clip=np.float16(1.0))
    assert opt == InnerOptimizer(lr_mu=0.25, warmup=3, clip=1.0)
    assert type(opt.lr_mu) is float and type(opt.warmup) is int
    json.dumps(opt.to_dict())
    with pytest.raises(ValueError, match="lr_v=-1.0 must be a finite number >= 0"):
        InnerOptimizer(lr_v=np.float32(-1.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_closed_form_v_of_half_precision_coefficients_is_solved_in_float32_and_returned_in_theirs(dtype):
    """LU has no half-precision kernels: closed_form_v (and so GridInit on a half field) crashed deep in torch."""
    from splatopt import GridInit

    g = torch.Generator().manual_seed(0)
    a, target = torch.rand(2, 7, 3, generator=g), torch.randn(2, 7, 5, generator=g)
    tok, act = torch.ones(2, 7, dtype=torch.bool), torch.tensor([[True, True, False], [True, True, True]])
    v = closed_form_v(a.to(dtype), target.to(dtype), tok, act)
    assert v.dtype == dtype
    torch.testing.assert_close(v.float(), closed_form_v(a.to(dtype).float(), target.to(dtype).float(), tok, act).to(dtype).float())
    assert GridInit()(target.to(dtype), tok, torch.tensor([2, 3])).v.dtype == dtype


def test_adam_step_names_the_argument_that_lacks_a_parameter():
    """A researcher stepping a subset of groups by hand got a bare KeyError('log_sigma') from a missing
    gradient or learning rate, naming neither the argument nor the fix."""
    params = {"mu": torch.zeros(2, 3), "log_sigma": torch.zeros(2, 3)}
    cfg = InnerOptimizer()
    lrs = cfg.learning_rates(0, 10, 1.0)
    with pytest.raises(ValueError, match=r"adam_step: grads lacks \['log_sigma'\]; it needs an entry for every parameter"):
        adam_step(params, {"mu": torch.ones(2, 3)}, adam_init(params), lrs, cfg)
    with pytest.raises(ValueError, match=r"adam_step: lrs lacks \['x'\]"):
        adam_step({"x": torch.zeros(2)}, {"x": torch.ones(2)}, adam_init({"x": torch.zeros(2)}), lrs, cfg)
    new, _, _ = adam_step({"mu": params["mu"]}, {"mu": torch.ones(2, 3)}, adam_init({"mu": params["mu"]}), lrs, cfg)
    assert set(new) == {"mu"}  # a subset of the groups steps; extra learning rates are ignored


def test_adam_step_without_any_parameter_is_a_value_error():
    # was an assert (gone under python -O, then an AttributeError on None)
    with pytest.raises(ValueError, match="params"):
        adam_step({}, {}, {"m": {}, "v": {}, "t": 0}, {}, InnerOptimizer())
