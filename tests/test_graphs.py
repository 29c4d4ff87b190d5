"""The host-free inner loop (splatopt.graphs): device learning-rate table, static buffers, CUDA graphs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splatopt import GridInit, fit, render
from splatopt.graphs import AdamLoop, learning_rate_table
from splatopt.objectives import relative_mse
from splatopt.optim import GROUPS, InnerOptimizer, adam_init, adam_step


@settings(max_examples=30, deadline=None)
@given(schedule=st.sampled_from(["constant", "cosine", "linear", "wsd"]), warmup=st.integers(0, 7), total=st.integers(1, 40))
def test_learning_rate_table_rows_are_the_optimizers_learning_rates(schedule, warmup, total):
    opt = InnerOptimizer(schedule=schedule, warmup=warmup)
    table = learning_rate_table(opt, total)
    assert table.shape == (total, len(GROUPS))
    for i in range(total):
        lrs = opt.learning_rates(i, total, 1.0)
        assert table[i].tolist() == [float(lrs[k]) for k in GROUPS]


def _problem(seed=0, B=3, L=10, N=4, d=8, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, L, d, generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[1, 7:] = False
    splats = GridInit()(target, mask, torch.tensor([4, 3, 2], device=device))

    def gradients(p):
        with torch.enable_grad():
            live = {k: t.detach().requires_grad_(True) for k, t in p.items()}
            loss = relative_mse(render(splats.with_params(live), L), target, mask).sum()
            return dict(zip(live, torch.autograd.grad(loss, list(live.values()))))

    params = {k: t.detach().clone() for k, t in splats.params().items()}
    return splats, params, gradients, (torch.rand(B, 1, 1, generator=g) + 0.5).to(device)


def test_adam_loop_equals_adam_step_step_by_step():
    """Steps taken from the device table, with Adam's count on the device and results copied into
    static buffers, equal adam_step with learning_rates: a cosine schedule with warm-up, clipping,
    an Adam count carried over from a warm start, segments of odd length, frozen slots first."""
    splats, params, gradients, v_scale = _problem()
    opt = InnerOptimizer(warmup=3, clip=0.5)
    state = {**adam_init(params), "t": 5}
    free = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    total, frozen_until = 9, 3
    loop = AdamLoop(gradients, params, state, opt, total, v_scale)
    for stop in (3, 4, 7, 9):
        loop.run(stop, free if loop.step < frozen_until else None)
    skipped = torch.zeros(3, dtype=torch.long)
    for i in range(total):
        lrs = opt.learning_rates(i, total, v_scale)
        if i < frozen_until:
            f = free.float()
            lrs = {k: lr * (f[..., None] if k == "v" else f) for k, lr in lrs.items()}
        params, state, sk = adam_step(params, gradients(params), state, lrs, opt)
        skipped += sk
    for k in params:
        torch.testing.assert_close(loop.params[k], params[k], rtol=1e-6, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(loop.state["v"][k], state["v"][k], rtol=1e-6, atol=1e-12, equal_nan=True)
    assert float(loop.state["t"]) == state["t"] == 5 + total
    assert torch.equal(loop.skipped, skipped)
    frozen = splats.mask & ~free
    assert not torch.equal(loop.params["mu"][~frozen & splats.mask], splats.mu[~frozen & splats.mask])


def test_adam_loop_refusals():
    _, params, gradients, v_scale = _problem()
    loop = AdamLoop(gradients, params, adam_init(params), InnerOptimizer(), 4, v_scale)
    with pytest.raises(ValueError, match="at step 0 of 4"):
        loop.run(5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            AdamLoop(gradients, params, adam_init(params), InnerOptimizer(), 4, v_scale, cuda_graphs=True)


@pytest.mark.cuda
def test_cuda_replayed_graphs_are_bitwise_the_launched_steps():
    """Capture is faithful: replaying the graphs gives the bits that launching the same steps gives
    (segments of odd length, a frozen first segment launched, cuBLAS products in the render)."""
    runs = []
    for cuda_graphs in (True, False):
        splats, params, gradients, v_scale = _problem(device="cuda")
        free = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)).cuda() < 0.5
        loop = AdamLoop(gradients, params, adam_init(params), InnerOptimizer(clip=0.5), 12, v_scale, cuda_graphs=cuda_graphs)
        for stop in (3, 4, 9, 12):
            loop.run(stop, free if loop.step < 3 else None)
        runs.append(loop)
    for k in runs[0].params:
        torch.testing.assert_close(runs[0].params[k], runs[1].params[k], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(runs[0].skipped, runs[1].skipped)


@pytest.mark.cuda
@pytest.mark.parametrize("options", [{}, {"objective": "mse+0.5*cosine"}, {"objective": "mse", "fused": False},
                                     {"basis": "dct"}, {"optimizer": InnerOptimizer(clip=1.0)}])
def test_cuda_fit_gives_the_same_bits_with_and_without_graphs(model, short_prompts, options):
    """The default objective (render, decoder head, fused cross-entropy, autograd, Adam), the fused
    cosine loss, the PyTorch MSE, a fixed basis and clipping: cuda_graphs changes the speed only
    (on CUDA both take the learning rates from the device table; capture replays the same kernels)."""
    kw = dict(n_splats=0.5, steps=23, device="cuda", progress=False, record_every=5, **options)
    graphed, launched = fit(short_prompts, model, **kw), fit(short_prompts, model, cuda_graphs=False, **kw)
    assert graphed.config["cuda_graphs"] is True and launched.config["cuda_graphs"] is False
    for k in ("loss", "field_error"):
        assert torch.equal(graphed.history[k], launched.history[k]), k
    assert torch.equal(graphed.token_accuracy, launched.token_accuracy)


@pytest.mark.cuda
@pytest.mark.parametrize("frozen_steps,moves", [(8, False), (23, False), (23, True)])
def test_cuda_fits_with_frozen_slots_are_captured_with_the_launched_bits(model, short_prompts, frozen_steps, moves):
    """A freeze (edit's far splats: the whole re-fit, centres free or not; or its first steps) is
    captured on its own graph: the same bits as launching every step."""
    lengths = [int(n) for n in model.tokenize(short_prompts).mask.sum(-1)]
    frozen = torch.rand(len(short_prompts), max(round(0.5 * n) for n in lengths), generator=torch.Generator().manual_seed(3)) < 0.5
    kw = dict(n_splats=0.5, steps=23, device="cuda", progress=False, record_every=5, frozen=frozen.cuda(),
              frozen_steps=frozen_steps, frozen_moves=moves)
    graphed, launched = fit(short_prompts, model, **kw), fit(short_prompts, model, cuda_graphs=False, **kw)
    assert graphed.config["cuda_graphs"] is True and launched.config["cuda_graphs"] is False
    for k in ("loss", "field_error"):
        assert torch.equal(graphed.history[k], launched.history[k]), k
    assert torch.equal(graphed.splats.mu, launched.splats.mu) and torch.equal(graphed.splats.v, launched.splats.v)


@pytest.mark.cuda
def test_cuda_solved_embeddings_and_density_launch_every_step(model, short_prompts):
    solved = fit(short_prompts[:2], model, steps=3, device="cuda", progress=False,
                 optimizer=InnerOptimizer(embeddings="solve"))
    assert solved.config["cuda_graphs"] is False
    with pytest.raises(ValueError, match="density"):
        fit(short_prompts[:2], model, steps=3, device="cuda", progress=False, density="budget", cuda_graphs=True)
    truncated = fit(short_prompts[:2], model, steps=3, device="cuda", progress=False, truncate=4.0)
    assert truncated.config["cuda_graphs"] is False
    with pytest.raises(ValueError, match="truncate"):
        fit(short_prompts[:2], model, steps=3, device="cuda", progress=False, truncate=4.0, cuda_graphs=True)


def test_truncated_fits_are_not_captured_because_the_local_renderer_sizes_its_tiles_on_the_host():
    """render_local reads its tile plan's size back every step: a capture would fail (a 10k-token fit did)."""
    from splatopt.density import NoDensify
    from splatopt.fit import _host_free_blocker

    cuda = torch.device("cuda")
    assert _host_free_blocker(cuda, False, NoDensify()) is None
    assert "truncate" in _host_free_blocker(cuda, False, NoDensify(), truncate=4.0)


def test_adam_loop_holds_only_the_named_groups_of_frozen_slots():
    """held: the parameter groups frozen slots keep; the others (here the centres) change in every slot."""
    splats, params, gradients, v_scale = _problem()
    opt = InnerOptimizer()
    free = torch.zeros(3, 4, dtype=torch.bool)
    loop = AdamLoop(gradients, params, adam_init(params), opt, 4, v_scale)
    held = ("log_sigma", "weight_logit", "v")
    loop.run(4, free, held)
    state = adam_init(params)
    for i in range(4):
        lrs = opt.learning_rates(i, 4, v_scale)
        lrs = {k: lr * 0.0 if k in held else lr for k, lr in lrs.items()}
        params, state, _ = adam_step(params, gradients(params), state, lrs, opt)
    for k in params:
        torch.testing.assert_close(loop.params[k], params[k], rtol=1e-6, atol=1e-7, equal_nan=True)
    on = splats.mask
    assert not torch.equal(loop.params["mu"][on], splats.mu[on])
    for k in held:
        torch.testing.assert_close(loop.params[k][on], getattr(splats, k)[on])
