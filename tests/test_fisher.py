"""The field-space metric of the inner Adam: Adam in whitened coordinates (against a reparametrized
reference), the whitening (against scipy), Fisher files and their errors, and the metric in fit,
the unrolled inner loop and the shipped file."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg

import splatopt
from splatopt import InnerOptimizer, adam_init, adam_step, meta
from splatopt.fisher import (estimate_field_fisher, load_field_fisher, resolve_metric, save_field_fisher,
                             shipped_fisher_path, whitening)
from splatopt.init import GridInit, WarmStart

F64 = torch.float64


def spd(d: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """A random symmetric positive-definite [d, d] whose eigenvalues span ``spread`` decades."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q @ torch.diag(torch.logspace(0, -spread, d, dtype=F64)) @ q.T


def fake_model(d=6, model_hash="abc123"):
    return SimpleNamespace(name="fake", layer=1, dim=d, model_hash=model_hash)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), group=st.sampled_from(["v", "offset"]), beta1=st.sampled_from([0.0, 0.3, 0.9]))
def test_adam_in_a_metric_is_adam_on_the_reparametrized_embeddings(seed, group, beta1):
    """Moments of g R and steps of update R equal plain Adam on y = x R^-1 mapped back (x = y R);
    the geometry groups ignore the metric."""
    g = torch.Generator().manual_seed(seed)
    d = 5
    R = whitening(spd(d, seed), 0.5)
    shape = (2, 3, d) if group == "v" else (2, 7, d)
    params = {"mu": torch.rand(2, 3, generator=g, dtype=F64), group: torch.randn(*shape, generator=g, dtype=F64)}
    lrs = {"mu": 0.1, group: 0.05 * torch.tensor([1.0, 2.0], dtype=F64)[:, None, None]}
    cfg = InnerOptimizer(beta1=beta1, beta2=0.9)
    ours, ours_state = dict(params), adam_init(params)
    ref = {"mu": params["mu"], group: params[group] @ torch.linalg.inv(R)}
    ref_state = adam_init(ref)
    for _ in range(4):
        grads = {k: torch.randn(t.shape, generator=g, dtype=F64) for k, t in params.items()}
        ours, ours_state, _ = adam_step(ours, grads, ours_state, lrs, cfg, metric=R)
        ref, ref_state, _ = adam_step(ref, {"mu": grads["mu"], group: grads[group] @ R}, ref_state, lrs, cfg)
    torch.testing.assert_close(ours[group], ref[group] @ R, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours["mu"], ref["mu"], rtol=0, atol=0)


def test_the_identity_metric_is_plain_adam():
    g = torch.Generator().manual_seed(0)
    params = {"v": torch.randn(2, 3, 4, generator=g, dtype=F64)}
    grads = {"v": torch.randn(2, 3, 4, generator=g, dtype=F64)}
    cfg = InnerOptimizer()
    plain, _, _ = adam_step(params, grads, adam_init(params), {"v": 0.1}, cfg)
    eye, _, _ = adam_step(params, grads, adam_init(params), {"v": 0.1}, cfg, metric=torch.eye(4, dtype=F64))
    torch.testing.assert_close(eye["v"], plain["v"], rtol=0, atol=0)


@pytest.mark.parametrize("damping", [0.1, 1.0, 10.0])
def test_whitening_is_the_damped_inverse_square_root_scaled_to_a_unit_mean_diagonal(damping):
    F = spd(8, 3)
    R = whitening(F, damping)
    damped = F.numpy() + damping * np.linalg.eigvalsh(F.numpy()).mean() * np.eye(8)
    want = np.real(linalg.inv(linalg.sqrtm(damped)))
    want /= np.diag(want).mean()
    np.testing.assert_allclose(R.numpy(), want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(R, R.T)
    assert abs(float(R.diagonal().mean()) - 1) < 1e-12


def test_a_fisher_file_round_trips_and_bad_files_name_the_problem(tmp_path):
    model = fake_model()
    F = spd(6, 1).float()
    path = save_field_fisher(tmp_path / "f.safetensors", F, model, {"prompts": 3})
    torch.testing.assert_close(load_field_fisher(str(path), model), F)
    with pytest.raises(ValueError, match="no Fisher file at"):
        load_field_fisher(str(tmp_path / "missing.safetensors"), model)
    with pytest.raises(ValueError, match="d=5"):
        load_field_fisher(str(path), fake_model(d=5))
    with pytest.raises(ValueError, match="estimated for model_hash"):
        load_field_fisher(str(path), fake_model(model_hash="fff999"))
    other_layer = fake_model()
    other_layer.layer = 4  # the same weights read at another layer: another decoder head
    with pytest.raises(ValueError, match="estimated for layer"):
        load_field_fisher(str(path), other_layer)
    with pytest.raises(ValueError, match="not a square"):
        load_field_fisher(str(save_field_fisher(tmp_path / "scalar.safetensors", torch.tensor(1.0), model)), model)
    bad = F.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        load_field_fisher(str(save_field_fisher(tmp_path / "nan.safetensors", bad, model)), model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is corrupt or not a safetensors file"):
        load_field_fisher(str(tmp_path / "junk.safetensors"), model)
    with pytest.raises(ValueError, match="no field Fisher is shipped"):
        load_field_fisher("fisher", model)


def test_a_fisher_without_a_positive_eigenvalue_cannot_whiten():
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        whitening(torch.zeros(4, 4), 1.0)


@pytest.mark.parametrize("kwargs", [{"metric": "euclid"}, {"metric": 3}, {"metric_damping": 0.0}, {"metric_damping": float("nan")}])
def test_bad_metric_settings_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="metric"):
        InnerOptimizer(**kwargs)


def small_problem(seed=5):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2, 9, 6, generator=g, dtype=F64)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    splats = GridInit()(target, mask, torch.tensor([3, 2]))
    return target, mask, splats.with_params({"v": splats.v + 0.1 * torch.randn(splats.v.shape, generator=g, dtype=F64)})


@pytest.mark.parametrize("embeddings", ["adam", "solve"])
def test_fit_and_the_unrolled_loop_take_the_same_steps_in_a_metric(tmp_path, embeddings):
    """fit reads the metric from its file, meta.unroll takes it as a tensor: the same losses step by
    step (MSE, float64), and not the identity's."""
    target, mask, splats = small_problem()
    path = save_field_fisher(tmp_path / "f.safetensors", spd(6, 2).float(), None)
    opt = InnerOptimizer(embeddings=embeddings, metric=str(path), metric_damping=0.3)
    R = resolve_metric(opt, None, "cpu", F64)
    losses, _ = meta.unroll(splats, target, mask, None, None, "mse", opt, 4, metric=R)
    with pytest.raises(ValueError, match="no metric tensor"):
        meta.unroll(splats, target, mask, None, None, "mse", opt, 4)
    common = dict(n_splats=[3, 2], steps=4, objective="mse", init=WarmStart(splats), device="cpu", dtype=F64,
                  record_every=1, progress=False)
    fitted = splatopt.fit(splatopt.Targets(target, mask), None, optimizer=opt, **common)
    plain = splatopt.fit(splatopt.Targets(target, mask), None, optimizer=InnerOptimizer(embeddings=embeddings), **common)
    torch.testing.assert_close(losses.detach(), fitted.history["loss"].double(), rtol=1e-6, atol=1e-9)
    assert fitted.config["optimizer"]["metric"] == str(path)
    assert not torch.allclose(fitted.history["loss"][-1], plain.history["loss"][-1])


def test_fit_refuses_a_metric_it_cannot_apply(tmp_path):
    """varpro moves no embedding; a Fisher of another width; 'fisher' with no model to name one."""
    target, mask, _ = small_problem()
    t = splatopt.Targets(target.float(), mask)
    path = str(save_field_fisher(tmp_path / "f.safetensors", spd(6, 2).float(), None))
    common = dict(n_splats=[3, 2], steps=1, objective="mse", device="cpu", progress=False)
    with pytest.raises(ValueError, match="varpro"):
        splatopt.fit(t, None, optimizer=InnerOptimizer(metric=path), varpro=True, **common)
    wide = str(save_field_fisher(tmp_path / "wide.safetensors", spd(8, 2).float(), None))
    with pytest.raises(ValueError, match="d=8.*d=6"):
        splatopt.fit(t, None, optimizer=InnerOptimizer(metric=wide), **common)
    with pytest.raises(ValueError, match="pass model="):
        splatopt.fit(t, None, optimizer=InnerOptimizer(metric="fisher"), **common)


def test_the_host_free_loop_takes_the_eager_steps_in_a_metric():
    """AdamLoop (fit's loop on CUDA, here uncaptured on the CPU) carries the metric: each step is adam_step's."""
    from splatopt.graphs import AdamLoop
    from splatopt.optim import target_rms

    target, mask, splats = small_problem()
    R = whitening(spd(6, 4), 0.5)
    opt = InnerOptimizer(beta1=0.5)
    W = torch.randn(6, 6, generator=torch.Generator().manual_seed(9), dtype=F64)

    def gradients(p):  # a smooth non-quadratic loss in every group
        live = {k: t.detach().requires_grad_(True) for k, t in p.items()}
        loss = sum(((t.tanh() if k != "v" else t @ W) ** 2).sum() for k, t in live.items())
        return dict(zip(live, torch.autograd.grad(loss, list(live.values()))))

    params = {k: t.clone() for k, t in splats.params().items()}
    v_scale = target_rms(target, mask)

    def looped(metric):
        loop = AdamLoop(gradients, params, adam_init(params), opt, 5, v_scale, cuda_graphs=False, metric=metric)
        loop.run(5)
        return loop.params

    eager, state = dict(params), adam_init(params)
    for i in range(5):
        eager, state, _ = adam_step(eager, gradients(eager), state, opt.learning_rates(i, 5, v_scale), opt, metric=R)
    in_metric = looped(R)
    for k in params:
        torch.testing.assert_close(in_metric[k], eager[k], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(in_metric["v"], looped(None)["v"])


def test_the_shipped_fisher_for_the_default_model_is_symmetric_positive_semidefinite(model):
    assert shipped_fisher_path(model).is_file()
    F = load_field_fisher("fisher", model).double()
    assert F.shape == (model.dim, model.dim)
    torch.testing.assert_close(F, F.T, rtol=0, atol=1e-6 * float(F.abs().max()))
    assert float(torch.linalg.eigvalsh(F).min()) > -1e-6 * float(F.diagonal().max())


def test_estimated_fisher_is_a_symmetric_psd_average_of_token_gradients(model, short_prompts):
    F = estimate_field_fisher(model, short_prompts[:2], init="grid", steps=(0, 1), device="cpu").double()
    assert F.shape == (model.dim, model.dim) and torch.isfinite(F).all()
    torch.testing.assert_close(F, F.T)
    evals = torch.linalg.eigvalsh(F)  # a few tokens: rank-deficient, zero up to float32 rounding
    assert float(evals.min()) > -1e-7 * float(evals.max()) and float(evals.max()) > 0
    with pytest.raises(ValueError, match="at least one text"):
        estimate_field_fisher(model, [], device="cpu")


def test_metric_fisher_in_a_fit_reads_the_shipped_file(model, short_prompts):
    common = dict(n_splats=0.25, steps=3, device="cpu", progress=False)
    r = splatopt.fit(short_prompts[:2], model, optimizer=InnerOptimizer(embeddings="solve", metric="fisher"), **common)
    plain = splatopt.fit(short_prompts[:2], model, optimizer=InnerOptimizer(embeddings="solve"), **common)
    assert torch.isfinite(r.field_error).all() and r.config["optimizer"]["metric"] == "fisher"
    assert not torch.allclose(r.splats.v, plain.splats.v)


@pytest.mark.cuda
def test_the_captured_loop_takes_the_eager_steps_in_a_metric(tmp_path):
    """On CUDA the host-free loop (AdamLoop, captured or not) carries the metric: the same bits with
    and without CUDA graphs, and the CPU's steps up to float32 rounding."""
    target, mask, splats = small_problem()
    path = save_field_fisher(tmp_path / "f.safetensors", spd(6, 2).float(), None)
    opt = InnerOptimizer(metric=str(path), metric_damping=0.3)
    common = dict(n_splats=[3, 2], steps=6, objective="mse", init=WarmStart(splats.to("cpu", torch.float32)),
                  optimizer=opt, record_every=0, progress=False)
    t = splatopt.Targets(target.float(), mask)
    captured = splatopt.fit(t, None, device="cuda", cuda_graphs=True, fused=False, **common)
    eager = splatopt.fit(t, None, device="cuda", cuda_graphs=False, fused=False, **common)
    cpu = splatopt.fit(t, None, device="cpu", **common)
    assert captured.config["cuda_graphs"] and not eager.config["cuda_graphs"]
    assert torch.equal(captured.splats.v, eager.splats.v)
    torch.testing.assert_close(captured.splats.v.cpu(), cpu.splats.v, rtol=1e-4, atol=1e-5)
    # the fused MSE step has no metric: where it would run, the fit steps in PyTorch instead
    auto = splatopt.fit(t, None, device="cuda", **common)
    torch.testing.assert_close(auto.splats.v.cpu(), cpu.splats.v, rtol=1e-4, atol=1e-5)
