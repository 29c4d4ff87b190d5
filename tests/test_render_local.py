"""Local (tiled, truncated) rendering: equal to the dense truncated render, symmetries, masks, memory, fit, bench."""

import importlib
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import splatopt
from splatopt import KERNELS, MODES, SplatSet, Targets, fit, render, render_local
from splatopt.init import grid_geometry
from splatopt.render_local import DEFAULT_TRUNCATE, plan_tiles

fit_module = importlib.import_module("splatopt.fit")  # the module: splatopt.fit is also the function's name
FAST = settings(max_examples=25, deadline=None)
KERNEL_MODES = [(k, m) for k in KERNELS for m in MODES]
PARAMS = ("mu", "log_sigma", "weight_logit", "v")


def random_splats(B=3, N=12, d=4, L=40, seed=0, dtype=torch.float64, p_active=0.75, spill=3.0) -> SplatSet:
    """Random splats, centres in [-spill, L - 1 + spill] (some off the ends), widths about 0.4..4.5 tokens."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(B, N, generator=g, dtype=dtype) * (L - 1 + 2 * spill) - spill
    log_sigma = torch.rand(B, N, generator=g, dtype=dtype) * 2.4 - 0.9
    weight_logit = torch.randn(B, N, generator=g, dtype=dtype)
    v = torch.randn(B, N, d, generator=g, dtype=dtype)
    mask = torch.rand(B, N, generator=g) < p_active
    mask[:, 0] = True
    return SplatSet(mu, log_sigma, weight_logit, v, mask)


def grid_splats(L, N, d, dtype=torch.float32, seed=0) -> SplatSet:
    """One prompt of N evenly spaced splats over L tokens (the fit's grid start), random embeddings."""
    mu, log_sigma, on = grid_geometry(torch.ones(1, L, dtype=torch.bool), torch.tensor([N]), 0.6, 0.0, None)
    v = torch.randn(1, N, d, generator=torch.Generator().manual_seed(seed))
    return SplatSet(mu.to(dtype), log_sigma.to(dtype), torch.zeros(1, N, dtype=dtype), v.to(dtype), on)


def field_and_grads(draw, s: SplatSet, weights: torch.Tensor):
    """(field, gradients of <field, weights> in each parameter) of ``draw(splats)``."""
    live = {k: t.detach().clone().requires_grad_(True) for k, t in s.params().items()}
    field = draw(s.with_params(live))
    grads = torch.autograd.grad((field * weights).sum(), list(live.values()))
    return field.detach(), dict(zip(PARAMS, grads))


# ------------------------------------------------------------------ equality with the dense reference


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
@pytest.mark.parametrize("L,N,tile,k", [(40, 12, 64, 2.5), (40, 12, 8, 1.0), (57, 20, 1, 3.0), (90, 30, 16, 4.0), (5, 9, 3, 0.7)])
def test_local_equals_dense_truncated_forward_and_gradients_float64(kernel, mode, L, N, tile, k):
    s = random_splats(N=N, L=L, seed=L + N)
    weights = torch.randn(s.batch_size, L, s.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense, dense_g = field_and_grads(lambda q: render(q, L, kernel, mode, truncate=k), s, weights)
    local, local_g = field_and_grads(lambda q: render_local(q, L, kernel, mode, truncate=k, tile=tile), s, weights)
    assert local.shape == dense.shape == (s.batch_size, L, s.dim)
    torch.testing.assert_close(local, dense, atol=1e-10, rtol=0)
    for name in PARAMS:
        torch.testing.assert_close(local_g[name], dense_g[name], atol=1e-10, rtol=0, msg=f"gradient in {name}")


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_local_equals_dense_truncated_float32_on_a_long_prompt(kernel, mode):
    s = grid_splats(L=1500, N=375, d=8)
    s = s.with_params({"mu": s.mu + torch.randn(s.mu.shape, generator=torch.Generator().manual_seed(2))})  # off the grid
    weights = torch.randn(1, 1500, 8, generator=torch.Generator().manual_seed(3))
    dense, dense_g = field_and_grads(lambda q: render(q, 1500, kernel, mode, truncate=DEFAULT_TRUNCATE), s, weights)
    local, local_g = field_and_grads(lambda q: render_local(q, 1500, kernel, mode), s, weights)
    torch.testing.assert_close(local, dense, atol=1e-5, rtol=0)
    for name in PARAMS:
        torch.testing.assert_close(local_g[name], dense_g[name], atol=1e-5, rtol=1e-5, msg=f"gradient in {name}")


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_gradcheck_and_gradgradcheck_on_tiny_shapes(kernel, mode):
    s = random_splats(B=2, N=4, d=2, L=9, seed=5)

    def f(mu, log_sigma, weight_logit, v):
        return render_local(SplatSet(mu, log_sigma, weight_logit, v, s.mask), 9, kernel, mode, truncate=2.0, tile=4)

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in s.params().values())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# ------------------------------------------------------------------ symmetries and linearity


@FAST
@given(seed=st.integers(0, 10_000), shift=st.integers(0, 70), kernel=st.sampled_from(KERNELS), mode=st.sampled_from(MODES),
       tile=st.integers(1, 20))
def test_integer_translation_shifts_the_field(seed, shift, kernel, mode, tile):
    s = random_splats(seed=seed, L=30)
    moved = s.with_params({"mu": s.mu + shift})
    field = render_local(s, 30, kernel, mode, truncate=2.5, tile=tile)
    shifted = render_local(moved, 30 + shift, kernel, mode, truncate=2.5, tile=tile)
    torch.testing.assert_close(shifted[:, shift:], field, atol=1e-9, rtol=1e-7)


@FAST
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(KERNELS), mode=st.sampled_from(MODES))
def test_permuting_splat_slots_changes_nothing(seed, kernel, mode):
    s = random_splats(seed=seed)
    perm = torch.randperm(s.capacity, generator=torch.Generator().manual_seed(seed))
    permuted = SplatSet(s.mu[:, perm], s.log_sigma[:, perm], s.weight_logit[:, perm], s.v[:, perm], s.mask[:, perm])
    torch.testing.assert_close(render_local(permuted, 40, kernel, mode, 3.0, 8), render_local(s, 40, kernel, mode, 3.0, 8),
                               atol=1e-12, rtol=1e-10)


@FAST
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(KERNELS), tile=st.integers(1, 50))
def test_additive_field_is_the_sum_over_disjoint_splat_subsets(seed, kernel, tile):
    s = random_splats(seed=seed, p_active=1.0)
    part = torch.rand(s.mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    whole = render_local(s, 40, kernel, "additive", 2.0, tile)
    a = render_local(SplatSet(s.mu, s.log_sigma, s.weight_logit, s.v, part), 40, kernel, "additive", 2.0, tile)
    b = render_local(SplatSet(s.mu, s.log_sigma, s.weight_logit, s.v, ~part), 40, kernel, "additive", 2.0, tile)
    torch.testing.assert_close(a + b, whole, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------ masks and arguments


@pytest.mark.parametrize("kernel,mode", KERNEL_MODES)
def test_inactive_slots_holding_nan_and_inf_contribute_nothing_and_get_zero_gradients(kernel, mode):
    s = random_splats(B=2, N=10, seed=9, p_active=0.6)
    s.mask[1] = False  # a prompt without any active splat renders zeros
    junk = {"mu": float("nan"), "log_sigma": float("inf"), "weight_logit": float("nan"), "v": float("-inf")}
    dirty = s.with_params({k: torch.where(s.mask[..., None] if k == "v" else s.mask, t, junk[k]) for k, t in s.params().items()})
    weights = torch.randn(2, 40, s.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean, _ = field_and_grads(lambda q: render_local(q, 40, kernel, mode, 3.0, 8), s, weights)
    field, grads = field_and_grads(lambda q: render_local(q, 40, kernel, mode, 3.0, 8), dirty, weights)
    torch.testing.assert_close(field, clean, atol=0, rtol=0)
    assert torch.equal(field[1], torch.zeros_like(field[1]))
    for name in PARAMS:
        off = ~s.mask[..., None].expand_as(grads[name]) if name == "v" else ~s.mask
        assert torch.isfinite(grads[name]).all() and torch.equal(grads[name][off], torch.zeros_like(grads[name][off]))


@pytest.mark.parametrize("name", ["mu", "log_sigma", "weight_logit"])
def test_nan_in_an_active_slot_makes_its_prompt_nan_as_in_the_dense_path(name):
    s = random_splats(B=2, seed=4)
    broken = s.params()[name].clone()
    broken[0, 0] = math.nan  # slot 0 is active
    s = s.with_params({name: broken})
    local, dense = render_local(s, 40, truncate=3.0, tile=8), render(s, 40, truncate=3.0)
    assert local[0].isnan().all() and dense[0].isnan().all()
    torch.testing.assert_close(local[1], dense[1], atol=1e-12, rtol=0)


def test_batch_of_different_lengths_and_counts_matches_dense():
    """Prompts of several lengths in one padded batch: each prompt's positions, padding rendered like render does."""
    lengths, counts = torch.tensor([7, 40, 23]), torch.tensor([2, 10, 6])
    token_mask = torch.arange(40)[None, :] < lengths[:, None]
    mu, log_sigma, on = grid_geometry(token_mask, counts, 0.6, 0.5, torch.Generator().manual_seed(0))
    v = torch.randn(3, 10, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = SplatSet(mu.double(), log_sigma.double(), torch.zeros_like(mu).double(), v, on)
    torch.testing.assert_close(render_local(s, 40, truncate=3.0, tile=16), render(s, 40, truncate=3.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs,message", [
    ({"length": torch.arange(5.0)}, "int L"), ({"length": 0}, "int L"), ({"truncate": None}, "truncate"),
    ({"truncate": 0.0}, "truncate"), ({"truncate": math.inf}, "truncate"), ({"kernel": "box"}, "kernel"),
    ({"mode": "max"}, "mode"), ({"tile": 0}, "tile"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = {"length": 10, "truncate": 3.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        render_local(random_splats(), **args)


# ------------------------------------------------------------------ memory


def saved_sizes(draw, s: SplatSet) -> tuple[list[int], dict]:
    """numel of every tensor autograd saves while rendering ``s`` (parameters requiring grad)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    live = {k: t.detach().clone().requires_grad_(True) for k, t in s.params().items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        draw(s.with_params(live))
    return sizes, live


def test_saved_memory_is_the_tiles_coefficients_and_v_not_l_times_n():
    """No saved tensor is larger than v [N, d] or the tile blocks [L, S]; the dense path saves [L, N]."""
    L, N, d = 4096, 1024, 96
    s = grid_splats(L, N, d)
    sizes, _ = saved_sizes(lambda q: render_local(q, L, truncate=3.0), s)
    plan = plan_tiles(s.mu, s.sigma, s.mask, L, 64, 3.0)
    blocks = plan.tiles * 64 * plan.width
    assert plan.width <= 32  # about (64 + 2·(3·2.4 + 1)) / 4 candidates per tile for splats 4 tokens apart
    assert max(sizes) <= max(N * d, blocks)  # v's tiles [nT, S, d] (here 1.5x v) are not kept for backward
    dense, _ = saved_sizes(lambda q: render(q, L, truncate=3.0), s)
    assert max(dense) >= L * N  # what the bound above rules out


def test_saved_memory_grows_linearly_with_length_at_fixed_density():
    def total(L):
        return sum(saved_sizes(lambda q: render_local(q, L, truncate=4.0), grid_splats(L, L // 4, 16))[0])

    small, large = total(1024), total(8192)
    assert large <= 8 * 1.1 * small  # linear in L; the dense path would grow 64-fold


# ------------------------------------------------------------------ fit


def test_fit_with_truncate_renders_locally_and_matches_the_dense_truncated_fit(model, short_prompts, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return render_local(*args, **kwargs)

    monkeypatch.setattr(fit_module, "render_local", spy)
    local = fit(short_prompts[:2], model, n_splats=0.5, steps=12, truncate=3.0, device="cpu", progress=False)
    assert calls and local.config["truncate"] == 3.0

    def dense(s, L, kernel, mode, truncate):
        return render(s, L, kernel, mode, truncate)

    monkeypatch.setattr(fit_module, "render_local", dense)
    reference = fit(short_prompts[:2], model, n_splats=0.5, steps=12, truncate=3.0, device="cpu", progress=False)
    for name in ("mu", "log_sigma", "weight_logit", "v"):
        torch.testing.assert_close(getattr(local.splats, name), getattr(reference.splats, name), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(local.field_error, reference.field_error, atol=1e-5, rtol=1e-4)
    assert torch.equal(local.token_accuracy, reference.token_accuracy)


def test_short_prompts_stay_dense_and_long_ones_get_the_default_truncation(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return render_local(*args, **kwargs)

    monkeypatch.setattr(fit_module, "render_local", spy)
    field = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    short = fit(Targets(field), n_splats=0.25, steps=3, objective="mse", device="cpu", progress=False)
    assert short.config["truncate"] is None and not calls
    monkeypatch.setattr(fit_module, "LONG_LENGTH", 32)  # 40 tokens now count as a long text
    long = fit(Targets(field), n_splats=0.25, steps=3, objective="mse", device="cpu", progress=False)
    assert long.config["truncate"] == DEFAULT_TRUNCATE and long.splats.meta["truncate"] == DEFAULT_TRUNCATE
    assert calls and all(c == (40, "gaussian", "additive", DEFAULT_TRUNCATE) for c in calls)


def test_varpro_refuses_a_dense_coefficient_tensor_too_large_and_bad_truncate_is_refused(monkeypatch):
    field = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(fit_module, "VARPRO_MAX_BYTES", 40 * 10 * 4 - 1)
    with pytest.raises(ValueError, match=r"varpro=True .* A \[1, 40, 10\]"):
        fit(Targets(field), n_splats=0.25, steps=1, objective="mse", varpro=True, device="cpu", progress=False)
    fit(Targets(field), n_splats=0.2, steps=1, objective="mse", varpro=True, device="cpu", progress=False)  # 8 splats fit
    for bad in (0.0, -1.0, math.nan, True, "4"):
        with pytest.raises(ValueError, match="truncate"):
            fit(Targets(field), n_splats=0.25, steps=1, objective="mse", truncate=bad, device="cpu", progress=False)


# ------------------------------------------------------------------ bench


def test_long_bench_smoke_and_cli(tmp_path, capsys):
    from splatopt.bench import LongBenchConfig, run_long_bench, save_bench
    from splatopt.cli import main

    result = run_long_bench(LongBenchConfig(batch=2, length=300, splats=75, dim=8, warmup=1, iters=2), "cpu")
    assert result["max_abs_diff"] < 1e-5 and result["tile_candidates"] >= 8
    assert result["results"]["local"]["step_ms"] > 0 and result["results"]["local"]["speedup_vs_dense"] > 0
    path = save_bench(result, tmp_path)
    assert path.name == "long-cpu-mse-B2-L300-N75-d8.json" and json.loads(path.read_text())["bench"] == "long"
    assert main(["bench", "--long", "--length", "200", "--dim", "8", "--warmup", "1", "--iters", "1", "--paths", "local",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "x" not in capsys.readouterr().out.split("local")[1].split("ms/step")[1]  # no speedup without a dense path
    data = json.loads((tmp_path / "long-cpu-mse-B1-L200-N50-d8.json").read_text())
    assert set(data["results"]) == {"local"} and data["max_abs_diff"] is None


def test_public_api_exports_render_local():
    assert splatopt.render_local is render_local


@pytest.mark.cuda
def test_a_10000_token_document_at_a_quarter_density_fits_in_8_gb(model):
    import fixedpos

    doc = fixedpos.sample_prompts(model, [" ".join(fixedpos.load_corpus("stdlib", "test"))], 1, max_tokens=10_000,
                                  min_tokens=9_900)
    torch.cuda.reset_peak_memory_stats()
    result = fit(doc, model, n_splats=0.25, steps=50, objective="mse", device="cuda", progress=False)
    peak = torch.cuda.max_memory_allocated()
    print(f"10k-token fit, N = L/4, objective mse: peak {peak / 1e9:.2f} GB, {result.seconds:.1f} s, "
          f"token accuracy {float(result.token_accuracy[0]):.3f}")
    assert int(result.mask.sum()) >= 9_900 and result.config["truncate"] == DEFAULT_TRUNCATE
    assert int(result.splats.counts[0]) == round(int(result.mask.sum()) / 4)
    assert peak < 8e9
    assert float(result.field_error[0]) < 1.0


def test_an_empty_batch_and_a_numpy_length_render_as_render_does():
    import numpy as np

    empty = SplatSet(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3, 4), torch.zeros(0, 3, dtype=torch.bool))
    assert render_local(empty, 5).shape == render(empty, 5).shape == (0, 5, 4)
    mu, log_sigma, mask = grid_geometry(torch.ones(2, 9, dtype=torch.bool), torch.tensor([3, 2]), 0.6, 0.0, None)
    s = SplatSet(mu, log_sigma, torch.zeros_like(mu), torch.randn(2, 3, 4), mask)
    torch.testing.assert_close(render_local(s, np.int64(9)), render(s, 9, truncate=DEFAULT_TRUNCATE))


def test_splats_on_the_meta_device_are_a_value_error_naming_the_device_and_the_fix():
    # torch's raw "Cannot copy out of meta tensor" came from inside the tiling, not naming the input
    meta = SplatSet(mu=torch.zeros(1, 2, device="meta"), log_sigma=torch.zeros(1, 2, device="meta"),
                    weight_logit=torch.zeros(1, 2, device="meta"), v=torch.zeros(1, 2, 3, device="meta"),
                    mask=torch.ones(1, 2, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="meta device.*render"):
        render_local(meta, 5)
