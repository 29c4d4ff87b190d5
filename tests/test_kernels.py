"""Fused Triton field loss against the PyTorch reference (render + objective_terms, autograd).

Without CUDA the kernels run in Triton's CPU interpreter; with CUDA the same small cases run
compiled, and the `cuda` tests add the benchmark shape. Skipped when triton is not installed.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decorates its own library (tl.sigmoid, ...) when first imported: the interpreter must be
    # on before that, and stays on for the session (no other CPU test runs Triton kernels)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
pytest.importorskip("triton")

from splatopt import SplatSet, render  # noqa: E402
from splatopt.kernels import available, field_loss, fused_field_loss, fused_field_terms  # noqa: E402
from splatopt.kernels.fused import launch_config  # noqa: E402
from splatopt.objectives import objective_terms, Objective  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OBJECTIVES = ["mse", "cosine", "0.5*mse+cosine"]


def make_case(B=3, N=5, L=12, d=32, seed=0, target_dtype=torch.float32, device=DEVICE, nan=True):
    """Random splats (some slots inactive, holding NaN), a target with per-prompt lengths (NaN padding)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(B, N, generator=g) * (L - 1)
    log_sigma = torch.rand(B, N, generator=g) * 1.5 - 0.3
    weight_logit = torch.randn(B, N, generator=g)
    v = torch.randn(B, N, d, generator=g)
    slot_mask = torch.rand(B, N, generator=g) < 0.7
    slot_mask[:, 0] = True
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    token_mask = torch.arange(L)[None] < lengths[:, None]
    target = torch.randn(B, L, d, generator=g)
    if nan:
        nan_t = torch.tensor(float("nan"))
        mu, log_sigma, weight_logit = (torch.where(slot_mask, t, nan_t) for t in (mu, log_sigma, weight_logit))
        v = torch.where(slot_mask[..., None], v, nan_t)
        target = torch.where(token_mask[..., None], target, nan_t)
    splats = SplatSet(mu, log_sigma, weight_logit, v, slot_mask).to(device)
    return splats, target.to(device, target_dtype), token_mask.to(device)


def loss_and_grads(splats, target, token_mask, objective, fused, weights=None, **kw):
    """Loss [B] and the gradients of sum_b weights_b loss_b wrt the four parameters."""
    live = {k: t.detach().clone().requires_grad_(True) for k, t in splats.params().items()}
    if fused:
        loss = fused_field_loss(*live.values(), splats.mask, target, token_mask, objective, **kw)
    else:
        field = render(splats.with_params(live), target.shape[1], "gaussian", "additive")
        loss = objective_terms(Objective.parse(objective), field, target, token_mask)[0]
    w = torch.ones_like(loss) if weights is None else weights
    grads = torch.autograd.grad((loss * w).sum(), list(live.values()))
    return loss.detach(), dict(zip(live, grads))


def assert_matches(fused, ref, rtol):
    """Loss and each gradient within rtol of the reference's largest magnitude (gradients span decades)."""
    (lf, gf), (lr, gr) = fused, ref
    torch.testing.assert_close(lf.float(), lr.float(), rtol=rtol, atol=rtol * lr.abs().max().item())
    for k in gr:
        assert torch.isfinite(gf[k]).all(), k
        scale = gr[k].abs().max().item()
        torch.testing.assert_close(gf[k].float(), gr[k].float(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(objective, target_dtype):
    splats, target, token_mask = make_case(target_dtype=target_dtype, seed=1)
    weights = torch.tensor([1.0, -0.5, 2.0], device=DEVICE)  # a per-prompt incoming gradient
    fused = loss_and_grads(splats, target, token_mask, objective, True, weights)
    # the kernel accumulates in float32: the exact reference is the target read as float32 ...
    assert_matches(fused, loss_and_grads(splats, target.float(), token_mask, objective, False, weights), 1e-4)
    if target_dtype == torch.bfloat16:
        # ... while the bf16 reference rounds |T|^2 and the norms to bf16 on its way (about 1e-3 off)
        assert_matches(fused, loss_and_grads(splats, target, token_mask, objective, False, weights), 3e-2)
        assert fused[0].dtype == torch.float32


@pytest.mark.parametrize("objective", ["mse", "cosine"])
def test_fused_tiles_tokens_dims_and_slots(objective):
    # L = 150: three token tiles; d = 80: a partial d-tile; N = 20: BLOCK_N = 32 with padding slots
    splats, target, token_mask = make_case(B=2, N=20, L=150, d=80, seed=2)
    assert launch_config(150, 20, 80)["BLOCK_L"] < 150
    ref = loss_and_grads(splats, target, token_mask, objective, False)
    assert_matches(loss_and_grads(splats, target, token_mask, objective, True), ref, 1e-4)
    if objective == "mse":  # the width split across programs (grid (B, S)) sums to the same
        assert_matches(loss_and_grads(splats, target, token_mask, objective, True, d_split=2), ref, 1e-4)


def test_launch_config_override_and_tuner_candidates(monkeypatch):
    from splatopt.kernels.tune import candidates

    splats, target, token_mask = make_case(B=2, N=5, L=40, d=48, seed=12)
    ref = loss_and_grads(splats, target, token_mask, "cosine", False)
    monkeypatch.setenv("SPLATOPT_FUSED_CONFIG", '{"BLOCK_L": 16, "BLOCK_D": 16, "num_warps": 4}')
    assert launch_config(40, 5, 48)["BLOCK_L"] == 16
    assert_matches(loss_and_grads(splats, target, token_mask, "cosine", True), ref, 1e-4)
    monkeypatch.setenv("SPLATOPT_FUSED_CONFIG", '{"BLOCK_X": 16}')
    with pytest.raises(ValueError, match="BLOCK_X"):
        launch_config(40, 5, 48)
    configs = candidates(64, 16, 384)
    assert configs and all(c["BLOCK_N"] == 16 and c["BLOCK_L"] <= 64 for c in configs)


def test_tuner_always_names_a_configuration(monkeypatch):
    from splatopt.kernels.tune import choose, env_value

    default = launch_config(64, 16, 384)
    other = {**default, "BLOCK_D": 32}
    third = {**default, "num_warps": 4}
    assert choose([{"config": default, "ms": 1.0, "matches_default": True},
                   {"config": other, "ms": 0.5, "matches_default": True}], default)[0] == other
    slower = [{"config": default, "ms": 1.0, "matches_default": True}, {"config": other, "ms": 2.0, "matches_default": True}]
    assert choose(slower, default) == (default, "the default, 1.000 ms: no configuration beat it")
    wrong = [{"config": default, "ms": 1.0, "matches_default": True}, {"config": other, "ms": 0.1, "matches_default": False}]
    assert choose(wrong, default)[0] == default  # a faster configuration with another loss is not a result
    failed = [{"config": default, "error": "OutOfResources"}, {"config": third, "ms": 3.0, "matches_default": True}]
    assert choose(failed, default)[0] == third
    config, why = choose([{"config": default, "error": "OutOfResources"}], default)
    assert config == default and "no configuration ran" in why
    # the printed value is what launch_config reads back
    monkeypatch.setenv("SPLATOPT_FUSED_CONFIG", env_value(other))
    assert launch_config(64, 16, 384) == other


def test_inactive_slots_get_exactly_zero_gradient_and_clamped_widths_none():
    splats, target, token_mask = make_case(B=2, N=6, L=20, d=16, seed=3)
    ls = splats.log_sigma.clone()
    ls[0, 0], ls[1, 0] = -9.0, 12.0  # beyond log SIGMA_MIN and log SIGMA_MAX: clamped, zero gradient
    splats = splats.with_params({"log_sigma": ls})
    loss, grads = loss_and_grads(splats, target, token_mask, "mse", True)
    assert torch.isfinite(loss).all()
    off = ~splats.mask
    for k, g in grads.items():
        assert (g[off] == 0).all(), k
    assert grads["log_sigma"][0, 0] == 0 and grads["log_sigma"][1, 0] == 0
    assert_matches((loss, grads), loss_and_grads(splats, target, token_mask, "mse", False), 1e-4)


def test_fused_terms_and_no_grad_forward():
    splats, target, token_mask = make_case(seed=4)
    with torch.no_grad():
        loss, mse, cos = fused_field_terms(*splats.params().values(), splats.mask, target, token_mask, "mse+0.25*cosine")
    field = render(splats, target.shape[1])
    _, terms = objective_terms(Objective.parse("mse+0.25*cosine"), field, target, token_mask)
    torch.testing.assert_close(mse, terms["mse"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos, terms["cosine"], rtol=1e-5, atol=1e-6)
    assert not loss.requires_grad


def test_only_some_parameters_require_grad_and_strided_target():
    splats, target, token_mask = make_case(B=2, L=16, d=24, seed=5, nan=False)
    wide = torch.randn(2, 16, 40, device=DEVICE)
    wide[..., :24] = target
    target = wide[..., :24]  # a view whose rows are not contiguous
    v = splats.v.detach().clone().requires_grad_(True)
    loss = fused_field_loss(splats.mu, splats.log_sigma, splats.weight_logit, v, splats.mask, target, token_mask)
    (gv,) = torch.autograd.grad(loss.sum(), [v])
    _, ref = loss_and_grads(splats, target.contiguous(), token_mask, "mse", False)
    torch.testing.assert_close(gv, ref["v"], rtol=1e-4, atol=1e-4 * ref["v"].abs().max().item())


def test_second_order_through_the_fused_loss_raises():
    splats, target, token_mask = make_case(seed=13, nan=False)
    live = {k: t.detach().clone().requires_grad_(True) for k, t in splats.params().items()}
    loss = fused_field_loss(*live.values(), splats.mask, target, token_mask)
    with pytest.raises(RuntimeError, match="first-order"):  # loud: a cut meta-gradient would be silent
        torch.autograd.grad(loss.sum(), [live["v"]], create_graph=True)


# ------------------------------------------------------------------ dispatch


def test_field_loss_dispatch():
    splats, target, token_mask = make_case(seed=6)
    loss_ref, terms_ref = field_loss(splats, target, token_mask, "mse+cosine", fused=False)
    loss, terms = field_loss(splats, target, token_mask, "mse+cosine", fused=True)
    assert set(terms) == set(terms_ref) == {"mse", "cosine"}
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert available("cpu") is False  # the interpreter is never picked on its own
    if DEVICE == "cpu":
        auto, _ = field_loss(splats, target, token_mask, "mse")  # fused=None on the CPU: PyTorch
        assert auto.grad_fn is None or "FusedFieldLoss" not in type(auto.grad_fn).__name__
    else:
        assert available("cuda") and not available("cuda", kernel="erf") and not available("cuda", truncate=3.0)
    with pytest.raises(ValueError, match="gaussian"):
        field_loss(splats, target, token_mask, "mse", fused=True, kernel="erf")
    with pytest.raises(ValueError, match="cross-entropy"):
        field_loss(splats, target, token_mask, "mse+ce", fused=True)


def test_fused_refuses_bad_input():
    splats, target, token_mask = make_case(seed=7)
    p = list(splats.params().values())
    with pytest.raises(ValueError, match="token_mask"):
        fused_field_loss(*p, splats.mask, target, token_mask[:, :-1])
    with pytest.raises(ValueError, match="precision"):
        fused_field_loss(*p, splats.mask, target, token_mask, precision="fp8")
    with pytest.raises(ValueError, match="cross-entropy"):
        fused_field_loss(*p, splats.mask, target, token_mask, "ce")


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter runs what the compiler may refuse: compile both variants with Triton's ptxas."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    code = ("import json; from splatopt.kernels.tune import compile_report as c; "
            "print(json.dumps([c(64, 16, 384, False), c(64, 16, 384, True)]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for report in json.loads(done.stdout.splitlines()[-1]):
        # spills (report["stack"]) depend on the Triton version: `python -m splatopt.kernels.tune --compile-only`
        assert report["shared"] > 0 and report["num_warps"] == 8, report


# ------------------------------------------------------------------ fit


def _fit(prompts, model, fused, **kw):
    from splatopt import fit

    return fit(prompts, model, n_splats=0.5, steps=kw.pop("steps", 12), objective=kw.pop("objective", "mse"),
               fused=fused, device=DEVICE, progress=False, record_every=4, **kw)


@pytest.mark.parametrize("objective", ["mse", "mse+0.5*cosine"])
def test_fit_with_the_fused_loss_follows_the_pytorch_fit(model, short_prompts, objective):
    ref = _fit(short_prompts[:2], model, False, objective=objective)
    fused = _fit(short_prompts[:2], model, True, objective=objective)
    assert fused.config["fused"] is True and ref.config["fused"] is False
    assert torch.equal(fused.history["step"], ref.history["step"])
    for k in ("loss", "field_error", "cosine", "token_accuracy"):
        torch.testing.assert_close(fused.history[k], ref.history[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(fused.splats.mu, ref.splats.mu, rtol=1e-4, atol=1e-4)
    # Adam takes a full-size step whatever the gradient's magnitude: where a v-gradient is ~0, rounding
    # picks its sign, so a few entries may differ by up to a step or two (lr_v = 0.1 of the field's RMS)
    on = ref.splats.mask
    diff = (fused.splats.v - ref.splats.v)[on].abs()
    rms = ref.splats.v[on].pow(2).mean().sqrt()
    assert diff.max() <= 0.2 * rms and (diff > 1e-3 * rms).float().mean() < 0.02, (diff.max(), rms)
    assert torch.equal(fused.token_accuracy, ref.token_accuracy)


def test_fit_fused_keeps_frozen_slots_and_density_control(model, short_prompts):
    start = _fit(short_prompts[:2], model, False, steps=0)
    frozen = torch.zeros_like(start.splats.mask)  # [B, N]: the fit's slots
    frozen[:, :2] = True
    held = _fit(short_prompts[:2], model, True, steps=6, frozen=frozen, frozen_steps=6)
    torch.testing.assert_close(held.splats.mu[:, :2], start.splats.mu[:, :2])  # the frozen slots never moved
    assert not torch.equal(held.splats.mu[:, 2:], start.splats.mu[:, 2:])
    density = {"name": "adaptive", "start": 2, "interval": 3}
    ref, fused = (_fit(short_prompts[:2], model, f, steps=8, density=density) for f in (False, True))
    assert sum(int(t.sum()) for t in fused.density.values()) > 0  # density control acted on the fused gradients
    for k in ref.density:
        assert torch.equal(fused.density[k], ref.density[k]), k
    torch.testing.assert_close(fused.field_error, ref.field_error, rtol=1e-4, atol=1e-5)


def test_fit_fused_choice_and_refusals(model, short_prompts):
    auto = _fit(short_prompts[:1], model, None, steps=1)
    assert auto.config["fused"] is (DEVICE == "cuda")  # never the CPU interpreter unless asked for
    assert auto.config["cuda_graphs"] is (DEVICE == "cuda")
    assert _fit(short_prompts[:1], model, True, steps=1, cuda_graphs=False).config["cuda_graphs"] is False
    with pytest.raises(ValueError, match="runs on cpu" if DEVICE == "cpu" else "density"):
        _fit(short_prompts[:1], model, True, steps=1, density="adaptive", cuda_graphs=True)
    assert _fit(short_prompts[:1], model, None, steps=1, objective="mse+ce").config["fused"] is False
    for kw, why in (({"objective": "mse+ce"}, "cross-entropy"), ({"varpro": True}, "varpro"),
                    ({"kernel": "erf"}, "gaussian"), ({"truncate": 3.0}, "truncat"), ({"basis": "dct"}, "basis"),
                    ({"dtype": torch.float64}, "float32")):
        with pytest.raises(ValueError, match=why):
            _fit(short_prompts[:1], model, True, steps=1, **kw)


@pytest.mark.cuda
def test_cuda_fit_replaying_graphs_equals_fit_launching_steps(model, short_prompts):
    """fit's default on CUDA (graphs) gives the same bits as launching every step, records included."""
    graphed = _fit(short_prompts[:8], model, None, steps=31)
    launched = _fit(short_prompts[:8], model, None, steps=31, cuda_graphs=False)
    assert graphed.config["cuda_graphs"] is True and launched.config["cuda_graphs"] is False
    for k in ("mu", "log_sigma", "weight_logit", "v"):
        torch.testing.assert_close(getattr(graphed.splats, k), getattr(launched.splats, k), rtol=0, atol=0, equal_nan=True)
    for k in ("loss", "field_error"):
        assert torch.equal(graphed.history[k], launched.history[k]), k


# ------------------------------------------------------------------ bench


def test_bench_times_the_fused_path_and_the_roofline(tmp_path, capsys):
    import json

    from splatopt.bench import BenchConfig, device_peak_gbs, run_bench
    from splatopt.cli import main

    cfg = BenchConfig(batch=4, length=8, splats=2, dim=16, warmup=0, iters=1)
    out = run_bench(cfg, DEVICE, ("eager", "fused"), peak_gbs=100.0)
    fused = out["results"]["fused"]
    assert fused["step_ms"] > 0 and fused["loss_backward_ms"] > 0 and fused["speedup_vs_eager"] > 0
    assert out["roofline_bytes"] == 4 * 8 * 16 * 4 + 6 * (3 * 4 * 2 + 4 * 2 * 16) * 4
    expected = out["roofline_bytes"] / (fused["step_ms"] / 1e3) / 100e9
    assert fused["hbm_roofline_fraction"] == pytest.approx(expected)
    assert fused["prompt_steps_per_s"] == pytest.approx(4 / (fused["step_ms"] / 1e3))
    assert device_peak_gbs("NVIDIA H100 80GB HBM3") == 3350.0 and device_peak_gbs("NVIDIA H100 PCIe") == 2000.0
    assert device_peak_gbs("Some Future GPU") is None
    argv = ["bench", "--batch", "2", "--length", "8", "--splats", "2", "--dim", "16", "--warmup", "0", "--iters", "1",
            "--paths", "eager", "--fused", "--peak-gbs", "50", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "fused" in capsys.readouterr().out
    (written,) = tmp_path.glob("*.json")
    assert set(json.loads(written.read_text())["results"]) == {"eager", "fused"}


# ------------------------------------------------------------------ the fused step (loss + backward + Adam)


def reference_step(splats, target, token_mask, optimizer, step, lrs, free=None, objective="mse"):
    """fit's PyTorch step: autograd gradients of the summed loss, then optim.adam_step (frozen: lr * free)."""
    from splatopt.optim import adam_init, adam_step

    params = {k: t.detach().clone() for k, t in splats.params().items()}
    state = adam_init(params)
    for _ in range(step):  # warm moments: a few earlier steps' state, as inside a fit
        _, g = loss_and_grads(splats.with_params(params), target, token_mask, objective, False)
        params, state, _ = adam_step(params, g, state, lrs, optimizer)
    _, grads = loss_and_grads(splats.with_params(params), target, token_mask, objective, False)
    if free is not None:
        f = free.to(target.dtype)
        lrs = {k: lr * (f[..., None] if k == "v" else f) for k, lr in lrs.items()}
    new, new_state, skipped = adam_step(params, grads, state, lrs, optimizer)
    return params, state, new, new_state, skipped


def fused_from(splats, params, state, target, token_mask, optimizer, lrs, free=None, objective="mse", config=None):
    from splatopt.kernels.step import fused_adam_step, mse_coefficients

    coef = mse_coefficients(target, token_mask, objective)
    return fused_adam_step(params, state, splats.mask, target, token_mask, coef, lrs, optimizer, free=free, config=config)


def assert_step_matches(got, want, rtol):
    (p, st, sk), (p_ref, st_ref, sk_ref) = got, want
    assert torch.equal(sk, sk_ref)
    for name, a, b in [(f"param {k}", p[k], p_ref[k]) for k in p_ref] + \
            [(f"moment {m} {k}", st[m][k], st_ref[m][k]) for m in ("m", "v") for k in p_ref]:
        scale = b.nan_to_num().abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale + 1e-30, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert st["t"] == st_ref["t"]


@pytest.mark.parametrize("shape", [dict(B=3, N=5, L=12, d=32), dict(B=2, N=20, L=150, d=80)])
def test_fused_step_matches_pytorch_adam_on_autograd_gradients(shape):
    """Parameters and both moments after a fused step equal adam_step on autograd's gradients; NaN
    in inactive slots stays put; one token tile (the expanded products) and several, a partial
    d-tile and padding slots included."""
    from splatopt.optim import InnerOptimizer

    splats, target, token_mask = make_case(seed=21, **shape)
    opt = InnerOptimizer()
    v_scale = torch.rand(shape["B"], 1, 1, device=DEVICE) + 0.5
    lrs = opt.learning_rates(3, 10, v_scale)
    params, state, *want = reference_step(splats, target, token_mask, opt, 2, lrs)
    assert_step_matches(fused_from(splats, params, state, target, token_mask, opt, lrs), want, 1e-4)
    # d split across programs: the geometry partials are summed by the second kernel
    assert_step_matches(fused_from(splats, params, state, target, token_mask, opt, lrs, config={"d_split": 3}), want, 1e-4)


def test_fused_step_first_moment_is_the_gradient_with_beta1_zero():
    """With beta1 = 0 the new first moment is the gradient itself: the kernel's gradients within 1e-4."""
    from splatopt.optim import InnerOptimizer, adam_init

    splats, target, token_mask = make_case(seed=22)
    opt = InnerOptimizer(beta1=0.0)
    params = {k: t.detach().clone() for k, t in splats.params().items()}
    _, st, _ = fused_from(splats, params, adam_init(params), target, token_mask, opt,
                          opt.learning_rates(0, 5, torch.ones(3, 1, 1, device=DEVICE)), objective="2*mse")
    _, grads = loss_and_grads(splats, target, token_mask, "2*mse", False)
    for k, g in grads.items():
        torch.testing.assert_close(st["m"][k], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=lambda m: f"{k}: {m}")


def test_fused_step_frozen_slots_and_the_nan_guard():
    """Frozen slots do not move (their moments do); a prompt with a non-finite gradient keeps
    everything, the other prompts step as adam_step does."""
    from splatopt.optim import InnerOptimizer

    splats, target, token_mask = make_case(B=3, N=5, L=12, d=32, seed=23)
    v = splats.v.clone()
    v[1, 0, 3] = float("inf")  # an active slot: prompt 1's gradient is not finite
    splats = splats.with_params({"v": v})
    free = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)).to(DEVICE) < 0.5
    opt = InnerOptimizer()
    lrs = opt.learning_rates(0, 5, torch.ones(3, 1, 1, device=DEVICE))
    params, state, *want = reference_step(splats, target, token_mask, opt, 0, lrs, free=free)
    got = fused_from(splats, params, state, target, token_mask, opt, lrs, free=free)
    assert got[2].tolist() == [False, True, False]
    assert_step_matches(got, want, 1e-4)
    on_frozen = splats.mask & ~free
    assert torch.equal(got[0]["mu"][on_frozen], params["mu"][on_frozen])


def run_loop_and_steps(splats, target, token_mask, opt, total, stops, free=None, frozen_until=0, cuda_graphs=False):
    """(FusedAdamLoop run to each of ``stops``, fused_adam_step called once per step): their (params, state, skipped)."""
    from splatopt.kernels.step import FusedAdamLoop, fused_adam_step, mse_coefficients
    from splatopt.optim import adam_init

    v_scale = torch.rand(target.shape[0], 1, 1, generator=torch.Generator().manual_seed(1)).to(target.device) + 0.5
    coef = mse_coefficients(target, token_mask)
    params = {k: t.detach().clone() for k, t in splats.params().items()}
    state = {**adam_init(params), "t": 4}  # a warm start's Adam count: the bias corrections continue from it
    loop = FusedAdamLoop(params, state, splats.mask, target, token_mask, coef, opt, total, v_scale, cuda_graphs=cuda_graphs)
    for stop in stops:
        loop.run(stop, free if loop.step < frozen_until else None)
    skipped = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    for step in range(total):
        params, state, sk = fused_adam_step(params, state, splats.mask, target, token_mask, coef,
                                            opt.learning_rates(step, total, v_scale), opt, free if step < frozen_until else None)
        skipped += sk
    return (loop.params, loop.state, loop.skipped), (params, state, skipped)


def test_fused_loop_equals_one_fused_step_per_step():
    """FusedAdamLoop over a cosine schedule (device-side rows and step counter, ping-pong buffers,
    segments of odd length, frozen slots in the first segment) equals fused_adam_step taken step by
    step with InnerOptimizer.learning_rates. The steps start from the dicts the loop was given after
    it ran: the loop never writes its inputs."""
    from splatopt.optim import InnerOptimizer

    splats, target, token_mask = make_case(B=3, N=5, L=12, d=32, seed=26)
    free = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE) < 0.5
    got, want = run_loop_and_steps(splats, target, token_mask, InnerOptimizer(warmup=2), 7, [3, 4, 7], free, 3)
    assert_step_matches((got[0], got[1], got[2].bool()), (want[0], want[1], want[2].bool()), 1e-6)
    assert torch.equal(got[2], want[2]) and got[1]["t"] == want[1]["t"] == 4 + 7


def test_fused_loop_refusals():
    from splatopt.kernels.step import FusedAdamLoop, mse_coefficients
    from splatopt.optim import InnerOptimizer, adam_init

    splats, target, token_mask = make_case(seed=27)
    params = {k: t.detach().clone() for k, t in splats.params().items()}
    args = (params, adam_init(params), splats.mask, target, token_mask, mse_coefficients(target, token_mask), InnerOptimizer())
    with pytest.raises(ValueError, match="even"):
        FusedAdamLoop(*args, 5, torch.ones(3, device=DEVICE), unroll=3)
    loop = FusedAdamLoop(*args, 5, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="at step 0 of 5"):
        loop.run(6)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA"):
            FusedAdamLoop(*args, 5, torch.ones(3), cuda_graphs=True)


def test_fused_step_refusals():
    from splatopt.kernels.step import fused_adam_step, mse_coefficients
    from splatopt.optim import InnerOptimizer, adam_init

    splats, target, token_mask = make_case(seed=24)
    with pytest.raises(ValueError, match="cosine"):
        mse_coefficients(target, token_mask, "mse+cosine")
    params = {k: t.detach().clone() for k, t in splats.params().items()}
    opt = InnerOptimizer(clip=1.0)
    with pytest.raises(ValueError, match="clip"):
        fused_adam_step(params, adam_init(params), splats.mask, target, token_mask, mse_coefficients(target, token_mask),
                        opt.learning_rates(0, 1, torch.ones(3, 1, 1, device=DEVICE)), opt)
    opt = InnerOptimizer()
    with pytest.raises(ValueError, match="one device"):
        fused_adam_step(params, adam_init(params), splats.mask, target.to("meta"), token_mask,
                        mse_coefficients(target, token_mask), opt.learning_rates(0, 1, torch.ones(3, 1, 1, device=DEVICE)), opt)


# ------------------------------------------------------------------ GPU, benchmark shapes


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["mse", "cosine"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_cuda_benchmark_shape(objective, target_dtype):
    splats, target, token_mask = make_case(B=4096, N=16, L=64, d=384, seed=8, target_dtype=target_dtype, device="cuda")
    weights = torch.rand(4096, device="cuda")
    fused = loss_and_grads(splats, target, token_mask, objective, True, weights)
    assert_matches(fused, loss_and_grads(splats, target.float(), token_mask, objective, False, weights), 1e-4)


@pytest.mark.cuda
def test_cuda_long_prompts_and_many_slots():
    splats, target, token_mask = make_case(B=64, N=64, L=512, d=384, seed=9, device="cuda")
    for objective in ("mse", "cosine"):
        ref = loss_and_grads(splats, target, token_mask, objective, False)
        assert_matches(loss_and_grads(splats, target, token_mask, objective, True), ref, 1e-4)


@pytest.mark.cuda
def test_cuda_never_materializes_the_field():
    splats, target, token_mask = make_case(B=4096, N=16, L=64, d=384, seed=10, device="cuda", nan=False)
    live = {k: t.detach().clone().requires_grad_(True) for k, t in splats.params().items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_field_loss(*live.values(), splats.mask, target, token_mask)
    torch.autograd.grad(loss.sum(), list(live.values()))
    extra = torch.cuda.max_memory_allocated() - base
    # gradients of v (kept + scaled) are 2 x 100 MB; a field [B, L, d] would be 400 MB more
    assert extra < 0.6 * target.numel() * target.element_size(), extra / 1e6


@pytest.mark.cuda
def test_cuda_tuner_runs(capsys, monkeypatch):
    import json

    from splatopt.kernels.tune import main

    assert main(["--batch", "256", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines[: lines.index("fastest first:")]]
    assert len(rows) == 2 and rows[0]["default"] and rows[0]["matches_default"], rows  # the default always runs
    # the promise: the last stdout line selects a configuration that ran and matched the default's loss
    assert lines[-1].startswith("SPLATOPT_FUSED_CONFIG='") and lines[-2].startswith("chosen: "), lines[-2:]
    monkeypatch.setenv("SPLATOPT_FUSED_CONFIG", lines[-1].split("=", 1)[1].strip("'"))
    assert launch_config(64, 16, 384) in [r["config"] for r in rows if r.get("matches_default")]


@pytest.mark.cuda
def test_cuda_fast_precisions_stay_close():
    splats, target, token_mask = make_case(B=1024, N=16, L=64, d=384, seed=11, device="cuda", nan=False)
    ref = loss_and_grads(splats, target, token_mask, "mse", False)
    assert_matches(loss_and_grads(splats, target, token_mask, "mse", True, precision="tf32x3"), ref, 1e-3)
    assert_matches(loss_and_grads(splats, target, token_mask, "mse", True, precision="tf32"), ref, 2e-2)


@pytest.mark.cuda
def test_cuda_fused_step_at_the_benchmark_shape():
    """Issue 7's numerics at B = 4096, L = 64, N = 16, d = 384: the step's gradients (its first moment
    with beta1 = 0) within 1e-4 of autograd's, and a full step as adam_step takes it."""
    from splatopt.optim import InnerOptimizer, adam_init

    splats, target, token_mask = make_case(B=4096, N=16, L=64, d=384, seed=25, device="cuda")
    opt = InnerOptimizer(beta1=0.0)
    params = {k: t.detach().clone() for k, t in splats.params().items()}
    lrs = opt.learning_rates(0, 5, torch.rand(4096, 1, 1, device="cuda") + 0.5)
    _, st, _ = fused_from(splats, params, adam_init(params), target, token_mask, opt, lrs)
    _, grads = loss_and_grads(splats, target, token_mask, "mse", False)
    for k, g in grads.items():
        torch.testing.assert_close(st["m"][k], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=lambda m: f"{k}: {m}")
    opt = InnerOptimizer()
    params, state, *want = reference_step(splats, target, token_mask, opt, 2, lrs)
    assert_step_matches(fused_from(splats, params, state, target, token_mask, opt, lrs), want, 1e-4)


@pytest.mark.cuda
def test_cuda_graphed_loop_equals_launched_steps():
    """CUDA graphs replay exactly the launched steps: the same bits at the benchmark shape, across
    segments of odd and even length (both buffer sets' graphs) and a frozen first segment."""
    from splatopt.optim import InnerOptimizer

    splats, target, token_mask = make_case(B=4096, N=16, L=64, d=384, seed=28, device="cuda")
    free = torch.rand(4096, 16, device="cuda") < 0.5
    opt = InnerOptimizer()
    graphed, _ = run_loop_and_steps(splats, target, token_mask, opt, 12, [2, 7, 8, 12], free, 2, cuda_graphs=True)
    launched, stepped = run_loop_and_steps(splats, target, token_mask, opt, 12, [2, 7, 8, 12], free, 2)
    for k in graphed[0]:
        torch.testing.assert_close(graphed[0][k], launched[0][k], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(launched[0][k], stepped[0][k], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(graphed[2], launched[2])


@pytest.mark.cuda
def test_cuda_step_tuner_runs(capsys):
    from splatopt.kernels.tune import main

    assert main(["--step", "--batch", "256", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("SPLATOPT_STEP_CONFIG='"), lines[-3:]


def test_fused_fit_with_frozen_splats_that_may_move(model, short_prompts):
    """frozen_moves needs held parameter groups, which the fused step does not have: with frozen
    slots the fit steps in PyTorch (the frozen centres move, the embeddings stay), and with none
    frozen_moves changes nothing and the fused step runs."""
    start = _fit(short_prompts[:2], model, False, steps=0)
    frozen = torch.zeros_like(start.splats.mask)  # [B, N]: the fit's slots
    frozen[:, :2] = True
    moved = _fit(short_prompts[:2], model, None, steps=4, frozen=frozen, frozen_steps=4, frozen_moves=True)
    held = frozen[:, : start.splats.capacity] & start.splats.mask
    assert not torch.equal(moved.splats.mu[held], start.splats.mu[held])
    torch.testing.assert_close(moved.splats.v[held], start.splats.v[held])
    unfrozen = _fit(short_prompts[:2], model, True, steps=4, frozen_moves=True)  # nothing frozen: the fused loop
    assert unfrozen.config["fused"] is True and torch.isfinite(unfrozen.field_error).all()


@pytest.mark.parametrize("scale", [1e-9, 1e12])
def test_fused_loss_matches_the_reference_at_any_field_scale(scale):
    """The fused MSE's floor on the target's squared norm is relative_mse's: at a field of scale 1e-9
    both read the error against the norm, not against a fixed 1e-12."""
    splats, target, token_mask = make_case(seed=5)
    splats = splats.with_params({"v": splats.v * scale})
    ref = loss_and_grads(splats, target * scale, token_mask, "mse", False)
    assert_matches(loss_and_grads(splats, target * scale, token_mask, "mse", True), ref, 1e-4)
    unscaled = loss_and_grads(splats.with_params({"v": splats.v / scale}), target, token_mask, "mse", False)[0]
    torch.testing.assert_close(ref[0], unscaled, rtol=1e-4, atol=0)
