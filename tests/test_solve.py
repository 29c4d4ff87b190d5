"""embeddings="solve": least-squares embeddings for the target plus an offset Adam moves
(against scipy's lstsq), warm starts carried over, frozen slots held, masks, differentiability, and fit."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import linalg

import splatopt
from splatopt import InnerOptimizer, SplatSet, Targets, WarmStart, fit, render, solve_embeddings, splat_weights
from splatopt.optim import offset_for

F64 = torch.float64


def problem(B=3, L=10, N=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, L, N, generator=g, dtype=F64) + 0.1 * torch.eye(L, N, dtype=F64)
    target = torch.randn(B, L, d, generator=g, dtype=F64)
    offset = torch.randn(B, L, d, generator=g, dtype=F64)
    tok = torch.ones(B, L, dtype=torch.bool)
    tok[1, 7:] = False
    act = torch.ones(B, N, dtype=torch.bool)
    act[B - 1, N - 1] = False
    return a, target, offset, tok, act


def test_solve_embeddings_is_the_least_squares_fit_of_target_plus_offset_with_held_slots():
    a, target, offset, tok, act = problem()
    held = torch.zeros_like(act)
    held[0, 1] = held[1, 0] = held[2, 3] = True  # [2, 3] is inactive: held or not, it stays 0
    held_v = torch.randn(*act.shape, target.shape[-1], generator=torch.Generator().manual_seed(9), dtype=F64)
    v = solve_embeddings(a, target, offset, tok, act, ridge=1e-12, held=held, held_v=held_v)
    for b in range(a.shape[0]):
        t, on, fix = tok[b].numpy(), act[b].numpy(), (held[b] & act[b]).numpy()
        free = on & ~fix
        A = a[b].numpy()[t]
        goal = (target[b] + offset[b]).numpy()[t] - A[:, fix] @ held_v[b].numpy()[fix]
        x, *_ = linalg.lstsq(A[:, free], goal)
        np.testing.assert_allclose(v[b].numpy()[free], x, atol=1e-6)
        np.testing.assert_array_equal(v[b].numpy()[fix], held_v[b].numpy()[fix])
        np.testing.assert_array_equal(v[b].numpy()[~on], 0.0)


@settings(max_examples=25, deadline=None)
@given(extra_slots=st.integers(1, 12), extra_tokens=st.integers(0, 6), ridge=st.sampled_from([1e-4, 1e-2, 1.0]),
       seed=st.integers(0, 2**16))
def test_a_prompt_gets_the_same_embeddings_padded_into_a_larger_batch(extra_slots, extra_tokens, ridge, seed):
    """Padding slots and tokens change nothing, whatever the ridge: the ridge is relative to the
    prompt's own splats (it was relative to every slot, so a prompt padded to a batch's capacity got
    a smaller one and other embeddings than fitted alone)."""
    a, target, _, tok, act = (t[1:2] for t in problem(B=2, seed=seed))  # padded tokens and an inactive slot of its own
    alone = solve_embeddings(a, target, torch.zeros_like(target), tok, act, ridge=ridge)
    pad = lambda t, n, dim, value: torch.cat([t, torch.full((*t.shape[:dim], n, *t.shape[dim + 1:]), value, dtype=t.dtype)], dim)  # noqa: E731
    g = torch.Generator().manual_seed(seed + 1)
    big_a = pad(pad(a, extra_slots, 2, 0.0), extra_tokens, 1, 0.0)
    big_a[:, :, a.shape[2]:] = torch.rand(1, big_a.shape[1], extra_slots, generator=g, dtype=F64)  # junk under the padding
    big_target = pad(target, extra_tokens, 1, float("nan"))
    padded = solve_embeddings(big_a, big_target, torch.zeros_like(big_target), pad(tok, extra_tokens, 1, False),
                              pad(act, extra_slots, 1, False), ridge=ridge)
    torch.testing.assert_close(padded[:, : a.shape[2]], alone, rtol=1e-9, atol=1e-9)
    assert torch.equal(padded[:, a.shape[2]:], torch.zeros_like(padded[:, a.shape[2]:]))


def test_offset_for_gives_back_the_embeddings_and_ignores_padding():
    a, target, _, tok, act = problem(seed=1)
    v = torch.randn(*act.shape, target.shape[-1], generator=torch.Generator().manual_seed(2), dtype=F64) * act[..., None]
    # padding may hold NaN: neither the offset nor the solve may see it
    target = torch.where(tok[..., None], target, torch.full_like(target, float("nan")))
    a = torch.where(tok[..., None], a, torch.full_like(a, float("nan")))
    offset = offset_for(a, v, target, tok, act, ridge=1e-10)
    assert torch.isfinite(offset).all() and torch.equal(offset[~tok], torch.zeros_like(offset[~tok]))
    torch.testing.assert_close(solve_embeddings(a, target, offset, tok, act, ridge=1e-10), v, atol=1e-6, rtol=1e-6)
    # least-squares embeddings have offset zero
    v_ls = solve_embeddings(a, target, torch.zeros_like(target), tok, act, ridge=1e-10)
    assert offset_for(a, v_ls, target, tok, act, ridge=1e-10).abs().max() < 1e-8


def test_solve_embeddings_is_differentiable_in_coefficients_and_offset():
    a, target, offset, tok, act = problem(B=2, L=6, N=3, d=2, seed=3)
    held = torch.zeros_like(act)
    held[1, 0] = True
    held_v = torch.randn(*act.shape, 2, dtype=F64)
    a.requires_grad_(True)
    offset.requires_grad_(True)
    fn = lambda a, o: solve_embeddings(a, target, o, tok, act, 1e-4, held, held_v)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, offset), eps=1e-6, atol=1e-6)


def test_one_offset_step_moves_the_field_by_the_projected_gradient():
    """The offset's gradient is the field gradient projected onto the span of A: with MSE alone,
    a gradient step of the right length lands the field on the projection of the new target."""
    a, target, _, tok, act = problem(B=2, seed=4)
    tok[:] = True
    shift = torch.randn_like(target)
    goal = target + shift  # the field is asked to reach goal; the solve starts at the target's optimum
    offset = torch.zeros_like(target).requires_grad_(True)
    field = a @ solve_embeddings(a, target, offset, tok, act, 1e-12)
    (grad,) = torch.autograd.grad(0.5 * ((field - goal) ** 2).sum(), offset)
    stepped = a @ solve_embeddings(a, target, offset.detach() - grad, tok, act, 1e-12)
    best = a @ solve_embeddings(a, goal, torch.zeros_like(goal), tok, act, 1e-12)
    torch.testing.assert_close(stepped, best, atol=1e-6, rtol=1e-6)


def test_inner_optimizer_checks_embeddings_and_ridge():
    with pytest.raises(ValueError, match="embeddings='lstsq'"):
        InnerOptimizer(embeddings="lstsq")
    with pytest.raises(ValueError, match="solve_ridge"):
        InnerOptimizer(embeddings="solve", solve_ridge=0.0)


SOLVE = InnerOptimizer(embeddings="solve")


def test_mse_fit_with_fixed_geometry_stays_at_the_least_squares_field():
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(2, 12, 8, generator=gen, dtype=F64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    still = InnerOptimizer(embeddings="solve", lr_mu=0.0, lr_log_sigma=0.0, lr_weight=0.0)
    common = dict(n_splats=0.5, objective="mse", device="cpu", progress=False, dtype=F64)
    start = fit(Targets(field, mask), steps=0, **common)
    end = fit(Targets(field, mask), steps=10, optimizer=still, **common)
    torch.testing.assert_close(end.splats.mu, start.splats.mu, atol=0, rtol=0)
    a = splat_weights(start.splats, 12)
    for b in range(2):  # the unregularised optimum of this geometry (the ridge nudges Adam by a hair)
        t, on = mask[b].numpy(), start.splats.mask[b].numpy()
        A, T = a[b].numpy()[t][:, on], field[b].numpy()[t]
        x, *_ = linalg.lstsq(A, T)
        best = ((A @ x - T) ** 2).sum() / (T**2).sum()
        assert best - 1e-9 <= float(end.field_error[b]) <= best * (1 + 1e-3)
    moving = fit(Targets(field, mask), steps=30, optimizer=SOLVE, **common)
    assert (moving.field_error < start.field_error).all()


def test_a_warm_start_is_carried_into_the_solve():
    gen = torch.Generator().manual_seed(1)
    B, N, L, d = 2, 3, 9, 5
    splats = SplatSet(torch.tensor([[1.0, 4.0, 7.0]] * B), torch.zeros(B, N), torch.zeros(B, N),
                      torch.randn(B, N, d, generator=gen), torch.ones(B, N, dtype=torch.bool))
    target = torch.randn(B, L, d, generator=gen)
    out = fit(Targets(target), n_splats=N, steps=0, init=WarmStart(splats), objective="mse", optimizer=SOLVE,
              device="cpu", progress=False)
    torch.testing.assert_close(out.splats.v, splats.v, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(render(out.splats, L), render(splats, L), atol=1e-3, rtol=1e-3)


def test_solve_fit_beats_adam_on_text_in_few_steps(model, short_prompts):
    adam = fit(short_prompts, model, n_splats=0.5, steps=15, device="cpu", progress=False)
    solve = fit(short_prompts, model, n_splats=0.5, steps=15, optimizer=SOLVE, device="cpu", progress=False)
    assert solve.config["optimizer"]["embeddings"] == "solve"
    # it trades a little field error for the decoder's cross-entropy: the tokens come back sooner
    assert float(solve.history["ce"][-1].mean()) < float(adam.history["ce"][-1].mean())
    assert float(solve.token_accuracy.mean()) > float(adam.token_accuracy.mean())
    assert int(solve.skipped_steps.sum()) == 0


def test_solve_refit_holds_frozen_splats(model):
    text = "Return a new list containing all items from the iterable in ascending order."
    old = fit([text], model, n_splats=0.5, steps=40, optimizer=SOLVE, device="cpu", progress=False)
    new = text.replace("ascending", "descending")
    for kw in ({"local": True}, {"local": False, "freeze_steps": 4}):
        result = splatopt.edit(old, new, steps=8, optimizer=SOLVE, progress=False, **kw)
        far = result.edit["far_from_edit"]
        assert far
        warm = result.edit["start_splats"]
        moved = (result.splats.v[0, far].cpu() - warm.v[0, far]).abs().max()
        if kw.get("local"):
            assert float(moved) == 0.0
            torch.testing.assert_close(result.splats.mu[0, far].cpu(), warm.mu[0, far])
        else:
            assert float(moved) > 0.0  # free after the freeze
        assert torch.isfinite(result.splats.v).all()


@pytest.mark.parametrize("kw, why", [({"varpro": True}, "varpro"), ({"density": "adaptive"}, "density")])
def test_solve_refuses_what_it_cannot_combine_with(kw, why):
    field = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match=why):
        fit(Targets(field), n_splats=0.5, steps=1, objective="mse", optimizer=SOLVE, device="cpu", progress=False, **kw)


def test_solve_embeddings_with_held_but_no_held_v_is_a_value_error_naming_both_arguments():
    # was an assert: gone under python -O, where the missing held_v failed deep inside torch.where
    a, target, offset, tok, act = problem()
    held = torch.zeros_like(act)
    held[0, 1] = True
    with pytest.raises(ValueError, match="held_v"):
        solve_embeddings(a, target, offset, tok, act, held=held)
    with pytest.raises(ValueError, match="held"):  # held_v alone was silently ignored
        solve_embeddings(a, target, offset, tok, act, held_v=torch.zeros(*act.shape, target.shape[-1], dtype=F64))
