"""Fixed-basis baselines: equal float budgets, correct design matrices, and their closed-form MSE optimum."""

import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

import splatopt
from splatopt.basis import design_matrix, floats_per_term, terms_for_budget


def test_budgets_give_a_fixed_basis_the_splats_floats_to_within_half_a_term():
    n = torch.tensor([1, 4, 16, 64, 100, 128])
    lengths = torch.tensor([64, 64, 64, 64, 512, 512])
    for basis in ("fixed-grid", "dct", "segments"):
        k = terms_for_budget(basis, n, lengths, 384)
        assert ((k * floats_per_term(basis, 384) - n * floats_per_term("splats", 384)).abs() <= 384 / 2).all()
    assert terms_for_budget("dct", torch.tensor([128]), torch.tensor([512]), 384).item() == 129
    assert terms_for_budget("dct", torch.tensor([60]), torch.tensor([60]), 384).item() == 60  # capped at L


def test_dct_design_matrix_matches_scipy_dct_ii():
    L, K = 23, 9
    mask = torch.ones(1, L, dtype=torch.bool)
    a, _ = design_matrix("dct", mask, torch.tensor([K]))
    x = np.random.default_rng(0).normal(size=L)
    # scipy's DCT-II: X_k = 2 sum_n x_n cos(pi k (2n + 1) / (2L)), so A^T x = X / 2
    np.testing.assert_allclose(a[0].double().numpy().T @ x, scipy.fft.dct(x, type=2)[:K] / 2, rtol=1e-5, atol=1e-5)


def test_segments_partition_each_prompt_into_equal_runs():
    mask = torch.tensor([[True] * 10 + [False] * 2, [True] * 12])
    a, term_mask = design_matrix("segments", mask, torch.tensor([3, 4]))
    assert (a.sum(-1)[mask] == 1).all() and (a.sum(-1)[~mask] == 0).all()
    assert a[0, :10].sum(0).tolist() == [4, 3, 3, 0] and a[1].sum(0).tolist() == [3, 3, 3, 3]
    assert term_mask.tolist() == [[True, True, True, False], [True] * 4]


def numpy_design(basis, L, K, sigma_scale=0.6):
    t = np.arange(L)[:, None]
    if basis == "dct":
        return np.cos(math.pi * (t + 0.5) * np.arange(K)[None, :] / L)
    if basis == "segments":
        return (np.floor(t * K / L) == np.arange(K)[None, :]).astype(float)
    spacing = L / K
    mu = (np.arange(K) + 0.5) * spacing - 0.5
    return np.exp(-0.5 * ((t - mu[None, :]) / (sigma_scale * spacing)) ** 2)


@pytest.mark.parametrize("embeddings", ["adam", "solve"])
@pytest.mark.parametrize("basis", ["fixed-grid", "dct", "segments"])
def test_baselines_start_and_stay_at_their_least_squares_optimum_on_mse(basis, embeddings):
    torch.manual_seed(0)
    L, d, n = 30, 6, 5
    field = torch.randn(2, L, d, dtype=torch.float64).cumsum(1)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 24:] = False
    result = splatopt.fit(splatopt.Targets(field, mask), n_splats=n, steps=40, objective="mse", basis=basis,
                          device="cpu", dtype=torch.float64, progress=False, record_every=10,
                          optimizer=splatopt.InnerOptimizer(embeddings=embeddings))
    K = int(terms_for_budget(basis, torch.tensor([n]), torch.tensor([L]), d))
    for b, length in enumerate((L, 24)):
        T = field[b, :length].numpy()
        coef, *_ = scipy.linalg.lstsq(numpy_design(basis, length, K), T)
        optimum = np.sum((numpy_design(basis, length, K) @ coef - T) ** 2) / np.sum(T**2)
        # relative_mse is the MSE over the target's mean square: both have the same denominator
        assert result.history["field_error"][0, b].item() == pytest.approx(optimum, rel=1e-4, abs=1e-9)
        assert result.field_error[b].item() == pytest.approx(optimum, rel=2e-2, abs=1e-6)
    assert result.floats_per_token.tolist() == pytest.approx([K * d / L, K * d / 24])


def test_fixed_grid_result_renders_as_splats_and_dct_result_round_trips_through_a_file(tmp_path):
    torch.manual_seed(1)
    field = torch.randn(2, 16, 4)
    grid = splatopt.fit(splatopt.Targets(field), n_splats=4, steps=5, objective="mse", basis="fixed-grid", device="cpu",
                        progress=False)
    rendered = splatopt.render(grid.splats, 16)
    err = ((rendered - field) ** 2).sum((1, 2)) / (field**2).sum((1, 2))
    torch.testing.assert_close(err, grid.field_error, rtol=1e-4, atol=1e-6)
    assert grid.trajectory == {} or torch.isfinite(grid.trajectory["mu"]).all()

    dct = splatopt.fit(splatopt.Targets(field), n_splats=4, steps=5, objective="mse", basis="dct", device="cpu", progress=False)
    assert dct.splats is None and dct.coefficients.shape == (2, 7, 4)  # 4 splats of d + 3 = 7 floats = 7 terms of 4
    path = dct.save(tmp_path / "dct.safetensors")
    back = splatopt.FitResult.load(path)
    assert back.basis == "dct" and torch.equal(back.coefficients, dct.coefficients)
    assert torch.equal(back.floats_per_token, dct.floats_per_token) and back.summary()["terms"] == 14


@pytest.mark.parametrize("basis", ["dct", "segments"])
def test_loading_a_fixed_basis_fit_checks_the_model_it_was_fitted_with(basis, tmp_path, model, short_prompts):
    """FitResult.load(expect_model_hash=...) refused a splat file of another model but loaded a DCT or
    segments file of any model without a word."""
    result = splatopt.fit(short_prompts[:1], model, n_splats=0.25, steps=2, basis=basis, device="cpu", progress=False)
    path = result.save(tmp_path / "basis.safetensors")
    assert splatopt.FitResult.load(path, expect_model_hash=model.model_hash).basis == basis
    with pytest.raises(ValueError, match="fitted with model .* load it with the same model"):
        splatopt.FitResult.load(path, expect_model_hash="0" * 64)


def test_bad_basis_settings_are_refused_with_the_fix():
    f = splatopt.Targets(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="choose one of"):
        splatopt.fit(f, basis="wavelet", objective="mse", device="cpu", progress=False)
    with pytest.raises(ValueError, match="takes no varpro"):
        splatopt.fit(f, basis="dct", varpro=True, objective="mse", device="cpu", progress=False)
    with pytest.raises(ValueError, match="grid initializer"):
        splatopt.fit(f, basis="fixed-grid", init="tokens", objective="mse", device="cpu", progress=False)


def test_cli_fits_a_fixed_basis_and_shows_it(tmp_path, capsys):
    from splatopt.cli import main

    out = tmp_path / "dct.safetensors"
    assert main(["fit", "Return the sum of a and b.", "--splats", "2", "--steps", "3", "--basis", "dct", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    assert main(["show", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 dct terms" in printed and "dct basis: coefficients (1, 2, 384)" in printed
