"""End-to-end fits on the embedded defaults, batching, reproducibility, files, CLI and bad input."""

import json
from dataclasses import replace

import pytest
import torch

import splatopt
from splatopt import GridInit, Targets, WarmStart, fit, render
from splatopt.fit import FitResult


def test_fit_reads_text_back_at_half_density(model, short_prompts):
    result = fit(short_prompts, model, n_splats=0.5, steps=120, device="cpu", progress=False)
    assert result.token_accuracy.shape == (len(short_prompts),)
    assert float(result.token_accuracy.min()) >= 0.95
    assert result.splats.counts.tolist() == [max(1, round(int(n) * 0.5)) for n in result.mask.sum(-1)]
    # decoded text is the prompt's text, up to the uncased model's normalisation
    assert result.texts[0].replace(" ", "") == model.detokenize(result.ids[0], result.mask[0])[0].replace(" ", "")


def test_fit_improves_on_its_initializer(model, short_prompts):
    start = fit(short_prompts[:2], model, n_splats=0.25, steps=0, device="cpu", progress=False)
    end = fit(short_prompts[:2], model, n_splats=0.25, steps=60, device="cpu", progress=False)
    assert float(end.history["loss"][-1].mean()) < float(start.history["loss"][-1].mean())
    assert float(end.token_accuracy.mean()) >= float(start.token_accuracy.mean())


def test_batched_fit_equals_prompt_by_prompt_fits(model, short_prompts):
    """Masks, not loops: a prompt's fit does not depend on the other prompts in its batch."""
    a, b = short_prompts[0], short_prompts[1]
    both = fit([a, b], model, n_splats=0.5, steps=15, objective="mse+ce", device="cpu", progress=False)
    alone = [fit([t], model, n_splats=0.5, steps=15, objective="mse+ce", device="cpu", progress=False) for t in (a, b)]
    for i, single in enumerate(alone):
        n = int(single.splats.counts[0])
        torch.testing.assert_close(both.splats.mu[i, :n], single.splats.mu[0, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both.splats.v[i, :n], single.splats.v[0, :n], atol=1e-3, rtol=1e-3)
        assert torch.isclose(both.field_error[i], single.field_error[0], atol=1e-4)


def test_chunked_fit_restores_prompt_order(model, short_prompts):
    whole = fit(short_prompts, model, n_splats=0.5, steps=5, objective="mse", device="cpu", progress=False)
    chunked = fit(short_prompts, model, n_splats=0.5, steps=5, objective="mse", device="cpu", progress=False, batch_size=1)
    torch.testing.assert_close(whole.field_error, chunked.field_error, atol=1e-3, rtol=1e-3)
    assert whole.texts == chunked.texts


def test_same_seed_same_fit_and_seed_changes_a_random_init(model, short_prompts):
    init = GridInit(jitter=0.8)
    runs = [fit(short_prompts[:2], model, n_splats=0.5, steps=10, init=init, seed=s, device="cpu", progress=False) for s in (3, 3, 4)]
    assert torch.equal(runs[0].splats.mu, runs[1].splats.mu)
    assert not torch.equal(runs[0].splats.mu, runs[2].splats.mu)


def test_a_jittered_start_does_not_depend_on_chunking_or_batch_mates(model, short_prompts):
    init, opts = GridInit(jitter=0.8), dict(steps=0, n_splats=0.5, seed=7, device="cpu", progress=False)
    whole = fit(short_prompts[:3], model, init=init, **opts)
    chunked = fit(short_prompts[:3], model, init=init, batch_size=1, **opts)
    torch.testing.assert_close(whole.splats.mu, chunked.splats.mu, rtol=0, atol=0)
    # prompt 0 beside another prompt 1: the same start, though the chunk's capacity changed
    other = fit([short_prompts[0], short_prompts[2]], model, init=init, **opts)
    n0 = int(whole.splats.mask[0].sum())
    torch.testing.assert_close(other.splats.mu[0, :n0], whole.splats.mu[0, :n0], rtol=0, atol=0)


def test_fit_to_given_fields_without_text():
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(3, 12, 16, generator=gen)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 8:] = False
    result = fit(Targets(field, mask), n_splats=0.5, steps=100, objective="mse", device="cpu", progress=False)
    assert result.token_accuracy is None and result.texts is None
    assert result.splats.counts.tolist() == [6, 4, 6]
    start = fit(Targets(field, mask), n_splats=0.5, steps=0, objective="mse", device="cpu", progress=False)
    assert (result.field_error <= start.field_error + 1e-6).all()


@pytest.mark.parametrize("objective", ["mse", "mse+cosine"])
def test_a_bare_field_with_a_model_reports_the_tokens_its_decoder_reads(model, objective):
    """A field-only objective on a bare field still has a decoder: the fit reports accuracy against
    the tokens the decoder reads from the target field (it used to crash after the fit)."""
    field = model.encode(model.tokenize(["Return the sum of a and b."]))
    result = fit(field, model, objective=objective, n_splats=2, steps=3, device="cpu", progress=False)
    target_ids = model.decode(field).argmax(-1)
    assert torch.equal(result.ids, target_ids) and result.token_accuracy.shape == (1,)
    assert result.texts is not None


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=0), ValueError, "batch_size=0"),
    (dict(n_splats=[2.7]), ValueError, "counts .ints., not fractions"),
    (dict(n_splats="4"), TypeError, "n_splats='4'"),
    (dict(seed=1.5), TypeError, "seed=1.5"),
    (dict(dtype=torch.float16), ValueError, "float32 .the default. or torch.float64"),
    (dict(optimizer={"lr_muu": 0.1}), ValueError, "unknown InnerOptimizer fields .'lr_muu'."),
])
def test_bad_fit_arguments_are_named_before_any_work(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit(["Return the sum of two numbers."], model, steps=1, device="cpu", progress=False, **{"n_splats": 2, **kwargs})


def test_numpy_and_torch_numbers_and_optimizer_dicts_are_accepted(model, tmp_path):
    np = pytest.importorskip("numpy")
    text = ["Return the sum of two numbers."]
    for n_splats in (np.int64(3), torch.tensor(3), [3.0]):
        result = fit(text, model, n_splats=n_splats, steps=1, device="cpu", progress=False)
        assert result.splats.counts.tolist() == [3] and result.save(tmp_path / "run.safetensors")  # JSON-clean config
    assert fit(text, model, n_splats=torch.tensor(0.5), steps=0, device="cpu", progress=False).config["n_splats"] == 0.5
    result = fit(text, model, n_splats=2, steps=1, optimizer={"lr_mu": 0.3}, device="cpu", progress=False)
    assert result.config["optimizer"] == {**splatopt.InnerOptimizer().to_dict(), "lr_mu": 0.3}


def test_varpro_fits_only_geometry_and_keeps_v_optimal(model, short_prompts):
    result = fit(short_prompts[:2], model, n_splats=0.5, steps=20, objective="mse", varpro=True, device="cpu", progress=False)
    init = fit(short_prompts[:2], model, n_splats=0.5, steps=0, objective="mse", device="cpu", progress=False)
    assert (result.field_error <= init.field_error + 1e-5).all()
    assert not torch.equal(result.splats.mu, init.splats.mu)  # the geometry moved
    # the fitted embeddings are the least-squares ones for the fitted geometry, not Adam's
    target = model.encode(model.tokenize(short_prompts[:2]))
    L = target.shape[1]
    best = splatopt.closed_form_v(splatopt.splat_weights(result.splats, L), target, result.mask, result.splats.mask)
    torch.testing.assert_close(result.splats.v, best, atol=1e-4 * float(best.abs().max()), rtol=1e-4)


def test_history_and_trajectory_are_recorded(model, short_prompts):
    result = fit(short_prompts[:2], model, n_splats=0.5, steps=20, record_every=5, device="cpu", progress=False)
    assert result.history["step"].tolist() == [0, 5, 10, 15, 20]
    assert result.skipped_steps.tolist() == [0, 0]
    assert result.history["token_accuracy"].shape == (5, 2)
    assert result.trajectory["mu"].shape == (5, 2, result.splats.capacity)
    assert torch.isnan(result.trajectory["mu"][:, ~result.splats.mask]).all()


def test_fit_result_save_load_round_trip(tmp_path, model, short_prompts):
    result = fit(short_prompts[:2], model, n_splats=0.5, steps=5, device="cpu", progress=False)
    path = result.save(tmp_path / "run.safetensors")
    back = FitResult.load(path, expect_model_hash=model.model_hash)
    assert torch.equal(back.splats.mu, result.splats.mu.cpu()) and torch.equal(back.ids, result.ids.cpu())
    assert back.texts == result.texts and back.input_texts == list(short_prompts[:2])
    assert back.config["steps"] == 5 and torch.equal(back.skipped_steps, result.skipped_steps.cpu())
    with pytest.raises(ValueError, match="fitted with model"):
        FitResult.load(path, expect_model_hash="0" * 64)


def test_a_result_prints_as_one_line_of_its_metrics_not_every_tensor(model, short_prompts):
    """`result` in a notebook printed the dataclass default: every tensor of the history and trajectory,
    thousands of lines for a 300-step fit. It is one line now, for a fixed basis (no splats) too."""
    result = fit(short_prompts[:2], model, n_splats=0.5, steps=5, device="cpu", progress=False)
    text = repr(result)
    assert "\n" not in text and len(text) < 400 and "tensor(" not in text
    s = result.summary()
    assert text.startswith(f"FitResult(2 prompts, {s['tokens']} tokens, {s['splats']} splats, 5 steps")
    assert f"token_accuracy={s['token_accuracy']:.2%}" in text and "on cpu" in text
    dct = fit(short_prompts[:1], model, n_splats=0.5, steps=2, basis="dct", device="cpu", progress=False)
    assert repr(dct).startswith("FitResult(1 prompt, ") and "dct terms" in repr(dct) and "\n" not in repr(dct)


def test_a_result_loaded_onto_a_device_keeps_its_counters_on_the_cpu_as_fit_does(tmp_path, model, short_prompts):
    # fit keeps n_terms, skipped_steps, floats_per_token and density counts on the CPU; a result loaded
    # with device="cuda" must too, or FitResult.cat of it and a new fit fails ("meta": any non-CPU device)
    result = fit(short_prompts[:2], model, n_splats=0.5, steps=2, density="adaptive", device="cpu", progress=False)
    back = FitResult.load(result.save(tmp_path / "run.safetensors"), device="meta")
    assert back.splats.mu.device.type == "meta" and back.field_error.device.type == "meta"
    for name in ("n_terms", "skipped_steps", "floats_per_token"):
        assert getattr(back, name).device.type == "cpu", name
    assert all(t.device.type == "cpu" for t in back.density.values())


@pytest.mark.cuda
def test_a_result_loaded_onto_cuda_concatenates_with_a_new_cuda_fit(tmp_path, model, short_prompts):
    first = fit(short_prompts[:1], model, n_splats=0.5, steps=2, density="adaptive", device="cuda", progress=False)
    loaded = FitResult.load(first.save(tmp_path / "run.safetensors"), device="cuda")
    second = fit(short_prompts[1:2], model, n_splats=0.5, steps=2, density="adaptive", device="cuda", progress=False)
    both = FitResult.cat([loaded, second])
    assert both.splats.mu.device.type == "cuda" and both.token_accuracy.shape == (2,)
    assert torch.equal(both.token_accuracy.cpu(), torch.cat([first.token_accuracy, second.token_accuracy]).cpu())


@pytest.mark.parametrize("basis", ["splats", "dct"])
def test_a_float64_fit_loads_back_in_float64(tmp_path, basis):
    field = torch.randn(2, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = fit(Targets(field), n_splats=3, steps=2, objective="mse", basis=basis, dtype=torch.float64, device="cpu",
                 progress=False)
    back = FitResult.load(result.save(tmp_path / "run.safetensors"))
    saved = back.coefficients if basis == "dct" else back.splats.v
    assert saved.dtype == torch.float64 and torch.equal(saved, result.coefficients if basis == "dct" else result.splats.v)


@pytest.mark.parametrize("basis", ["splats", "dct"])
def test_load_moves_to_a_device_given_as_an_index_too(tmp_path, basis):
    # device=0 is cuda:0, as fit takes it: a falsy index must not leave the result silently on the CPU
    field = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(0))
    path = fit(Targets(field), n_splats=3, steps=1, objective="mse", basis=basis, device="cpu", progress=False).save(tmp_path / "r")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=0: CUDA is not available"):  # as fit(device=0) refuses
            FitResult.load(path, device=0)
        return
    back = FitResult.load(path, device=0)
    assert back.field_error.device == torch.device("cuda", 0)
    assert (back.coefficients if basis == "dct" else back.splats.mu).device == torch.device("cuda", 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"texts_or_fields": [""]}, "empty"),
        ({"texts_or_fields": ["   "]}, "whitespace"),
        ({"n_splats": 0}, ">= 1"),
        ({"n_splats": 0.0}, r"\(0, 1\]"),
        ({"n_splats": 1000}, "exceeds prompt 0"),
        ({"n_splats": [2, 3]}, "entries for 1 prompts"),
        ({"steps": -1}, "steps=-1"),
        ({"kernel": "box"}, "kernel="),
        ({"mode": "max"}, "mode="),
        ({"objective": "mse+foo"}, "cannot read term"),
        ({"init": {"name": "learned", "file": "init.safetensors"}}, "takes only path"),
    ],
)
def test_bad_fit_arguments_raise_clear_errors(model, kwargs, message):
    args = {"texts_or_fields": ["Return the sum of two numbers."], "model": model, "steps": 1, "device": "cpu", "progress": False}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        fit(**args)


def test_bad_fields_raise_clear_errors(model):
    field = torch.randn(2, 6, model.dim)
    field[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="prompt 1, position 3"):
        fit(Targets(field), model, steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="width 7"):
        fit(Targets(torch.randn(1, 6, 7)), model, steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"\[B, L, d\]"):
        fit(torch.randn(6, model.dim), model, steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="no valid position"):
        fit(Targets(torch.randn(1, 4, model.dim), torch.zeros(1, 4, dtype=torch.bool)), model, steps=1, device="cpu", progress=False)


@pytest.mark.parametrize("targets, message", [
    (lambda d: Targets(torch.randn(2, 6, d), None, torch.zeros(2, 5, dtype=torch.long)), r"ids has shape \(2, 5\) but the field is \(2, 6\)"),
    (lambda d: Targets(torch.randn(2, 6, d), None, torch.zeros(2, 6)), "ids must be a .B, L. integer tensor"),
    (lambda d: Targets(torch.randn(2, 6, d), None, torch.full((2, 6), 10**6)), "token id 1000000, outside minilm-l6's vocabulary"),
    (lambda d: Targets(torch.randn(2, 6, d), None, torch.full((2, 6), -5)), "token id -5, outside"),
    (lambda d: Targets(torch.randn(2, 6, d), torch.full((2, 6), 0.5)), "values other than 0 and 1: give a bool tensor"),
    (lambda d: Targets(torch.randn(2, 6, d), torch.full((2, 6), float("nan"))), "values other than 0 and 1"),
    (lambda d: torch.randn(0, 6, d), r"shape \(0, 6, 384\): it needs at least one prompt"),
    (lambda d: torch.randn(2, 6, d).numpy(), "not ndarray: convert it with torch.as_tensor"),
])
def test_bad_target_ids_masks_and_empty_fields_are_named_before_the_fit(model, targets, message):
    """Wrong ids used to fail inside the cross-entropy (shape, dtype or index errors from torch), a
    float mask of 0.5 or NaN was silently read as all valid, an empty batch failed in max()."""
    with pytest.raises((ValueError, TypeError), match=message):
        fit(targets(model.dim), model, n_splats=2, steps=1, device="cpu", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(record_every="5"), "record_every='5' must be an int >= 0"),
    (dict(record_every=2.5), "record_every=2.5 must be an int >= 0"),
    (dict(varpro="no"), "varpro='no': give True or False"),
    (dict(fused_ce="no"), "fused_ce='no': give True"),
    (dict(frozen_steps=-2), "frozen_steps=-2 must be an int >= 0"),
    (dict(frozen=torch.ones(1, 2)), "frozen is a torch.float32 tensor .* give a .B, N. bool tensor"),
    (dict(frozen=torch.ones(3, 2, dtype=torch.bool)), r"shape \(3, 2\): give a \[B, N\] bool tensor, B = 1"),
    (dict(init=splatopt.WarmStart(splatopt.SplatSet(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1, 384),
                                                      torch.ones(2, 1, dtype=torch.bool)))), "WarmStart holds splats of 2 prompts but 1"),
])
def test_bad_fit_option_types_are_named_instead_of_failing_deep_or_silently(kwargs, message):
    """These were a raw TypeError from a comparison or range(), a truthy string taken as True, a
    negative frozen_steps ignored, a float frozen mask failing at ~, a WarmStart of the wrong batch an IndexError."""
    with pytest.raises((ValueError, TypeError), match=message):
        fit(torch.randn(1, 6, 384), n_splats=1, steps=1, objective="mse", device="cpu", progress=False, **kwargs)


def test_a_frozen_mask_of_another_slot_count_than_the_fit_is_refused():
    """A frozen mask wider than the fit's slots was silently cut to them (its extra columns dropped),
    a narrower one padded; both now name the expected [B, N]. The exact shape still fits."""
    field = torch.randn(2, 6, 8)
    common = dict(n_splats=[2, 3], steps=1, objective="mse", device="cpu", progress=False, frozen_steps=1)
    for n in (2, 5):
        with pytest.raises(ValueError, match=rf"shape \(2, {n}\): give a \[B, N\] bool tensor, B = 2 prompts, N = 3 slots"):
            fit(field, frozen=torch.ones(2, n, dtype=torch.bool), **common)
    frozen = torch.tensor([[True, False, False], [False, False, True]])
    start = fit(field, **{**common, "steps": 0})
    held = fit(field, frozen=frozen, init=splatopt.WarmStart(start.splats), **common)
    torch.testing.assert_close(held.splats.mu[frozen & start.splats.mask], start.splats.mu[frozen & start.splats.mask])


@pytest.mark.parametrize("basis", ["fixed-grid", "dct", "segments"])
def test_frozen_terms_of_a_fixed_basis_with_solved_embeddings_are_refused(basis):
    """The solve holds frozen splats' embeddings, not a fixed basis's coefficients: it re-solved them
    all, and crashed (AttributeError on None) where the freeze ended. Adam holds them, as before."""
    from splatopt.basis import terms_for_budget

    field = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0))
    K = int(terms_for_budget(basis, torch.tensor([4, 4]), torch.tensor([12, 12]), 8).max())
    frozen = torch.zeros(2, K, dtype=torch.bool)
    frozen[:, 0] = True
    common = dict(n_splats=4, steps=4, objective="mse", basis=basis, device="cpu", progress=False, record_every=0,
                  frozen=frozen, frozen_steps=2)
    with pytest.raises(ValueError, match="cannot hold frozen terms; use embeddings='adam'"):
        fit(Targets(field), optimizer=splatopt.InnerOptimizer(embeddings="solve"), **common)
    start = fit(Targets(field), **{**common, "steps": 0, "frozen": None, "frozen_steps": 0})
    held = fit(Targets(field), **{**common, "frozen_steps": 4})
    coefficients = lambda r: r.coefficients if r.coefficients is not None else r.splats.v  # noqa: E731
    torch.testing.assert_close(coefficients(held)[:, 0], coefficients(start)[:, 0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(model):
    with pytest.raises(ValueError, match="CUDA is not available"):
        fit(["Some text."], model, steps=1, device="cuda", progress=False)


@pytest.mark.parametrize("option, value, message", [
    ("--out", "", "is a folder"), ("--plot", "", "is a folder"), ("--plot", "fit.bogus", "unknown figure format"),
])
def test_cli_refuses_an_unwritable_output_before_fitting(tmp_path, capsys, monkeypatch, option, value, message):
    from splatopt.cli import main

    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted before checking the output path"))
    for command in (["fit", "Return the sum of two numbers."], ["edit", str(tmp_path / "run.safetensors"), "New text."]):
        assert main([*command, option, str(tmp_path / value), "--device", "cpu", "--quiet"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("out, hint", [("traj.png", "the figure goes to --plot"), ("run.json", "run.safetensors")])
def test_cli_refuses_an_out_named_as_a_figure_or_json_before_fitting(tmp_path, capsys, monkeypatch, out, hint):
    """`--out traj.png` (meant as --plot) wrote safetensors bytes into traj.png, replacing the figure there;
    --out run.json wrote safetensors that no JSON reader opens. Both are refused with the name to give."""
    from splatopt.cli import main

    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted before checking --out"))
    (tmp_path / out).write_bytes(b"a figure already here")
    for command in (["fit", "Return the sum of two numbers."], ["edit", str(tmp_path / "run.safetensors"), "New text."],
                    ["demo"]):
        assert main([*command, "--out", str(tmp_path / out), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "the fit is written as safetensors" in err and hint in err
    assert (tmp_path / out).read_bytes() == b"a figure already here"


def test_cli_says_how_many_prompts_its_listing_left_out_and_show_lists_them(tmp_path, capsys):
    """fit and show list 8 prompts; the 9th and later were left out without a word, so a fit of 12 prompts
    read as one of 8. The metric names say what they are (a relative field error, not an MSE in field units)."""
    from splatopt.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"Return item number {i} of the list.\n" for i in range(10)))
    out = tmp_path / "run.safetensors"
    assert main(["fit", "--file", str(texts), "--steps", "0", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[7] " in printed and "[8] " not in printed
    assert f"... and 2 more prompt(s), not listed (splatopt show {out} --prompts 10 lists them)" in printed
    assert "relative field error" in printed and "10 prompts, " in printed and "means over prompts" in printed
    assert main(["show", str(out), "--prompts", "10"]) == 0
    printed = capsys.readouterr().out
    assert "[9] " in printed and "more prompt(s)" not in printed


def test_cli_plot_prompt_draws_the_prompt_asked_for_and_refuses_one_out_of_range(tmp_path, capsys, monkeypatch):
    """--plot drew prompt 0 of a fit of several prompts, with no way to draw another."""
    from splatopt import plot as plot_module
    from splatopt.cli import main

    out = tmp_path / "run.safetensors"
    args = ["Return the sum of two numbers.", "Close the file now.", "--steps", "2", "--device", "cpu", "--quiet"]
    assert main(["fit", *args, "--out", str(out)]) == 0
    drawn = []
    real = plot_module.trajectory_figure
    monkeypatch.setattr(plot_module, "trajectory_figure", lambda result, prompt=0, *a, **k: drawn.append(prompt) or real(result, prompt, *a, **k))
    assert main(["show", str(out), "--plot", str(tmp_path / "p.png"), "--plot-prompt", "1"]) == 0
    assert drawn == [1] and (tmp_path / "p.png").is_file()
    capsys.readouterr()
    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted before checking --plot-prompt"))
    assert main(["fit", *args, "--plot", str(tmp_path / "q.png"), "--plot-prompt", "2"]) == 2
    assert "--plot-prompt 2: the fit holds prompts 0..1" in capsys.readouterr().err
    assert main(["show", str(out), "--plot-prompt", "1"]) == 2
    assert "give --plot FILE too" in capsys.readouterr().err
    # with --prompt the edit holds that prompt alone: --plot-prompt 1 read "the fit holds prompts 0..0"
    assert main(["edit", str(out), "Close the file.", "--prompt", "1", "--plot", str(tmp_path / "e.png"),
                 "--plot-prompt", "1", "--device", "cpu", "--quiet"]) == 2
    assert "with --prompt 1 the edit and its plot hold that prompt alone: drop --plot-prompt" in capsys.readouterr().err


def test_cli_refuses_a_file_name_given_as_the_text_and_points_at_file(tmp_path, capsys, monkeypatch):
    """`splatopt fit texts.txt` fitted the literal text "texts.txt" (4 tokens) instead of the file's texts;
    `splatopt edit run.safetensors new.txt` did the same with the edit."""
    from splatopt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("Return the sum of two numbers.\n")
    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted a file name as a text"))
    assert main(["fit", "texts.txt", "--device", "cpu", "--quiet"]) == 2
    assert "'texts.txt' is the name of a file here, not a text: to use the texts in it, give --file texts.txt" in capsys.readouterr().err
    monkeypatch.undo()
    fit(Targets(torch.randn(1, 4, 8)), n_splats=2, steps=1, objective="mse", device="cpu", progress=False).save(tmp_path / "run.safetensors")
    monkeypatch.setattr(splatopt, "edit", lambda *a, **k: pytest.fail("re-fitted a file name as a text"))
    assert main(["edit", str(tmp_path / "run.safetensors"), str(tmp_path / "texts.txt"), "--device", "cpu", "--quiet"]) == 2
    assert f"give --file {tmp_path / 'texts.txt'}" in capsys.readouterr().err


def test_cli_skips_the_trajectory_plot_of_a_fixed_basis_instead_of_crashing(tmp_path, capsys):
    from splatopt.cli import main

    out, plot = tmp_path / "grid.safetensors", tmp_path / "traj.png"
    args = ["--basis", "fixed-grid", "--steps", "3", "--device", "cpu", "--quiet", "--out", str(out), "--plot", str(plot)]
    assert main(["fit", "Return the sum of two numbers.", *args]) == 0
    assert main(["show", str(out), "--plot", str(plot)]) == 0
    assert capsys.readouterr().out.count("no trajectory plot") == 2 and not plot.exists()


def test_cli_fit_and_show_on_cpu(tmp_path, capsys):
    from splatopt.cli import main

    out, plot = tmp_path / "run.safetensors", tmp_path / "traj.png"
    code = main(["fit", "Return the sum of two numbers.", "--splats", "0.5", "--steps", "30", "--device", "cpu",
                 "--out", str(out), "--plot", str(plot), "--quiet"])
    assert code == 0 and out.is_file() and plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "token accuracy" in printed and "decoded:" in printed
    assert main(["show", str(out)]) == 0
    assert "slot" in capsys.readouterr().out
    (tmp_path / "bad.safetensors").write_bytes(b"not a file at all")
    assert main(["show", str(tmp_path / "bad.safetensors")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_bench_writes_json(tmp_path):
    from splatopt.bench import BenchConfig, run_bench, save_bench

    result = run_bench(BenchConfig(batch=8, length=16, splats=4, dim=8, warmup=1, iters=2), "cpu", ("eager",))
    path = save_bench(result, tmp_path)
    data = json.loads(path.read_text())
    assert data["results"]["eager"]["prompt_steps_per_s"] > 0 and data["results"]["eager"]["speedup_vs_eager"] == 1.0


def test_e2e_bench_fits_real_prompts_and_writes_json(tmp_path, capsys, model):
    from splatopt.bench import E2EBenchConfig, run_e2e_bench, save_bench
    from splatopt.cli import main

    cfg = E2EBenchConfig(prompts=6, max_tokens=16, steps=(0, 2), warmup_steps=1, batch_size=4)
    out = run_e2e_bench(cfg, "cpu", model=model)
    assert out["prompts"] == out["distinct_prompts"] == 6 and out["note"] is None and out["max_length"] <= 16
    assert out["encode_seconds"] > 0 and out["warmup_seconds"] > 0 and out["device_type"] == "cpu"
    assert [r["steps"] for r in out["runs"]] == [0, 2]
    for r in out["runs"]:
        assert r["wall_seconds"] >= r["fit_seconds"] > 0 and 0 <= r["token_accuracy_min"] <= r["token_accuracy_mean"] <= 1
        assert r["meets_target"] == (r["token_accuracy_pooled"] >= 0.99 and r["wall_seconds"] <= 60) and r["fused"] is False
    assert out["met"] == any(r["meets_target"] for r in out["runs"])
    path = save_bench(out, tmp_path)
    assert path.name == "e2e-cpu-P6-stdlib_test-L16-n0.5-mse_ce-grid-K0_2-b4.json"
    assert json.loads(path.read_text())["runs"][1]["steps"] == 2
    # a corpus with fewer passages than prompts is cycled, and the JSON says so
    corpus = tmp_path / "two.txt"
    corpus.write_text("Return the sum of two numbers given as arguments.\nOpen a file and return a stream object for it.\n")
    argv = ["bench", "--e2e", "--prompts", "5", "--corpus", str(corpus), "--length", "16", "--steps", "1", "--warmup", "0",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "note:" in capsys.readouterr().out
    data = json.loads((tmp_path / "e2e-cpu-P5-two.txt-L16-n0.5-mse_ce-grid-K1.json").read_text())
    assert data["prompts"] == 5 and data["distinct_prompts"] == 2 and "cycled" in data["note"] and data["warmup_seconds"] is None


@pytest.mark.cuda
def test_fit_on_cuda_matches_cpu(model, short_prompts):
    gpu = fit(short_prompts, model, n_splats=0.5, steps=120, device="cuda", progress=False)
    cpu = fit(short_prompts, model, n_splats=0.5, steps=120, device="cpu", progress=False)
    assert gpu.splats.mu.device.type == "cuda"
    assert float(gpu.token_accuracy.min()) >= 0.95
    torch.testing.assert_close(gpu.field_error.cpu(), cpu.field_error, atol=2e-2, rtol=5e-2)


@pytest.mark.cuda
def test_a_jittered_start_is_the_same_on_cuda_and_cpu(model, short_prompts):
    opts = dict(steps=0, n_splats=0.5, seed=5, init=GridInit(jitter=0.8), progress=False)
    gpu, cpu = fit(short_prompts, model, device="cuda", **opts), fit(short_prompts, model, device="cpu", **opts)
    torch.testing.assert_close(gpu.splats.mu.cpu(), cpu.splats.mu, rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_cuda_bench_runs_both_paths():
    from splatopt.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(batch=256, length=64, splats=16, dim=384, warmup=2, iters=5), "cuda")
    assert set(result["results"]) == {"eager", "compile"}
    # the graph path replays fit's CUDA step: the fused MSE loop, and AdamLoop for the decode-aware one
    for objective, paths in (("mse", ("fused", "graph")), ("mse+ce", ("fused_ce", "graph"))):
        result = run_bench(BenchConfig(batch=64, objective=objective, warmup=2, iters=5), "cuda", paths)
        assert all(r["step_ms"] > 0 for r in result["results"].values()), result["results"]


def test_nan_in_padding_is_ignored_and_non_prefix_masks_are_refused():
    field = torch.randn(2, 8, 16)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    field[1, 6] = float("nan")
    result = fit(Targets(field, mask), n_splats=0.5, steps=5, objective="mse", device="cpu", progress=False)
    assert torch.isfinite(result.field_error).all() and torch.isfinite(result.splats.v).all()
    bad = torch.zeros(1, 8, dtype=torch.bool)
    bad[0, 4:] = True
    with pytest.raises(ValueError, match="not a prefix"):
        fit(Targets(torch.randn(1, 8, 16), bad), steps=1, objective="mse", device="cpu", progress=False)


def test_field_and_curve_figures_render(tmp_path, model, short_prompts):
    from splatopt.plot import curves_figure, field_figure, save_figure

    result = fit(short_prompts[:2], model, n_splats=0.5, steps=10, record_every=5, device="cpu", progress=False)
    target = model.encode(model.tokenize(short_prompts[:1]))[0]
    rendered = splatopt.render(result.splats.select(0), target.shape[0])[0]
    paths = save_figure(field_figure(target, rendered), tmp_path / "field.png", ["pdf"])
    paths += save_figure(curves_figure({"grid": result.history}), tmp_path / "curves.svg")
    assert [p.suffix for p in paths] == [".png", ".pdf", ".svg"] and all(p.stat().st_size > 2000 for p in paths)
    from splatopt.plot import trajectory_figure

    with pytest.raises(IndexError, match=r"prompt=5: this result holds prompts 0..1"):
        trajectory_figure(result, prompt=5)


@pytest.mark.parametrize("options", [{}, {"optimizer": splatopt.InnerOptimizer(embeddings="solve")},
                                     {"objective": "mse", "optimizer": splatopt.InnerOptimizer(clip=1.0)},
                                     {"density": {"name": "adaptive", "start": 0, "interval": 1}}, {"density": "budget"}])
def test_the_inner_loop_never_reads_a_tensor_back_to_the_host(model, short_prompts, monkeypatch, options):
    """On CUDA every .item(), .tolist(), .cpu(), bool(tensor) or .nonzero() waits for the device to
    finish: none may run between two inner steps (metrics are read only at record steps)."""
    import tqdm.auto

    in_loop = {"on": False}
    real_tqdm = tqdm.auto.tqdm

    class Steps(real_tqdm):
        def __iter__(self):
            for step in super().__iter__():
                in_loop["on"] = True
                yield step
                in_loop["on"] = False  # the body of a step ran between the two yields

    def guard(name):
        method = getattr(torch.Tensor, name)

        def checked(self, *args, **kwargs):
            assert not in_loop["on"], f"Tensor.{name} inside the inner loop synchronizes with the device"
            return method(self, *args, **kwargs)
        return checked

    monkeypatch.setattr(tqdm.auto, "tqdm", Steps)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "nonzero", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    result = splatopt.fit(short_prompts[:2], model, n_splats=0.5, steps=3, record_every=0, device="cpu", progress=False,
                          **options)
    assert result.history["step"].tolist() == [3]


def test_concatenated_results_are_the_prompts_of_each_in_order(model, short_prompts):
    """FitResult.cat pads tokens and splats and keeps every per-prompt field; selecting a part back
    gives that part's values."""
    long_one = fit(short_prompts[:2], model, n_splats=0.5, steps=4, device="cpu", progress=False, record_every=2)
    short_one = fit(["Add two numbers."], model, n_splats=0.25, steps=4, device="cpu", progress=False, record_every=2)
    both = FitResult.cat([long_one, short_one])
    assert both.mask.shape == (3, max(long_one.mask.shape[1], short_one.mask.shape[1]))
    assert both.input_texts == short_prompts[:2] + ["Add two numbers."] and len(both.texts) == 3
    assert both.splats.capacity == max(long_one.splats.capacity, short_one.splats.capacity)
    assert both.config["n_splats"] == long_one.splats.counts.tolist() + short_one.splats.counts.tolist()
    assert both.seconds == pytest.approx(long_one.seconds + short_one.seconds)
    back = both.select([2])
    L, N = short_one.mask.shape[1], short_one.splats.capacity
    assert torch.equal(back.mask[:, :L], short_one.mask) and not back.mask[:, L:].any()
    assert torch.equal(back.ids[:, :L], short_one.ids)
    for name, t in short_one.splats.params().items():
        torch.testing.assert_close(back.splats.params()[name][:, :N], t)
    assert not back.splats.mask[:, N:].any()
    for same in (2, -1, torch.tensor(2), [False, False, True], torch.tensor([False, False, True])):
        assert back.input_texts == both.select(same).input_texts, same  # a mask is not the prompt numbers 0 and 1
    with pytest.raises(IndexError, match="one entry per prompt"):
        both.select([True, False])
    for key in ("token_accuracy", "field_error", "cosine"):
        torch.testing.assert_close(getattr(back, key), getattr(short_one, key))
    torch.testing.assert_close(back.history["loss"], short_one.history["loss"])
    torch.testing.assert_close(back.trajectory["mu"][..., :N], short_one.trajectory["mu"], equal_nan=True)
    torch.testing.assert_close(FitResult.cat([long_one]).field_error, long_one.field_error)
    other_steps = fit(["Add two numbers."], model, n_splats=0.25, steps=6, device="cpu", progress=False, record_every=2)
    with pytest.raises(ValueError, match="record different history"):
        FitResult.cat([long_one, other_steps])
    with pytest.raises(ValueError, match="at least one"):
        FitResult.cat([])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_frozen_splats_that_may_move_only_translate(model, short_prompts, device):
    """frozen_moves=True: frozen slots' centres follow the gradient; their widths, weights and
    embeddings are held. The other slots train as usual (CUDA: the host-free loop)."""
    start = fit(short_prompts[:2], model, n_splats=0.5, steps=0, device=device, progress=False)
    frozen = torch.zeros_like(start.splats.mask)
    frozen[:, :2] = True
    moved = fit(short_prompts[:2], model, n_splats=0.5, steps=5, device=device, progress=False, init=splatopt.WarmStart(start.splats),
                frozen=frozen, frozen_steps=5, frozen_moves=True)
    held = frozen & start.splats.mask
    assert not torch.equal(moved.splats.mu[held], start.splats.mu[held])
    for name in ("log_sigma", "weight_logit", "v"):
        torch.testing.assert_close(getattr(moved.splats, name)[held], getattr(start.splats, name)[held])
    free = ~frozen & start.splats.mask
    assert not torch.equal(moved.splats.v[free], start.splats.v[free])


def test_frozen_embeddings_within_a_tolerance_move_at_most_that_far(model, short_prompts):
    """frozen_v_tolerance: frozen slots' embeddings train, but each ends within that fraction of its
    starting norm; without it they are held exactly. Solved embeddings refuse it."""
    start = fit(short_prompts[:2], model, n_splats=0.5, steps=0, device="cpu", progress=False)
    frozen = torch.zeros_like(start.splats.mask)
    frozen[:, :2] = True
    held = frozen & start.splats.mask
    common = dict(n_splats=0.5, steps=6, device="cpu", progress=False, init=splatopt.WarmStart(start.splats),
                  frozen=frozen, frozen_steps=6, optimizer=splatopt.InnerOptimizer(lr_v=0.5))
    loose = fit(short_prompts[:2], model, frozen_v_tolerance=0.03, **common)
    change = (loose.splats.v[held] - start.splats.v[held]).norm(dim=-1) / start.splats.v[held].norm(dim=-1)
    assert (change > 0.01).all() and (change <= 0.03 + 1e-5).all()
    torch.testing.assert_close(loose.splats.mu[held], start.splats.mu[held])
    tight = fit(short_prompts[:2], model, **common)
    torch.testing.assert_close(tight.splats.v[held], start.splats.v[held])
    with pytest.raises(ValueError, match="embeddings='solve'"):
        fit(short_prompts[:1], model, frozen_v_tolerance=0.03, **{**common, "optimizer": splatopt.InnerOptimizer(embeddings="solve"),
                                                                   "init": "grid", "frozen": frozen[:1]})
    with pytest.raises(ValueError, match="frozen_v_tolerance"):
        fit(short_prompts[:1], model, frozen_v_tolerance=-0.1, **{**common, "init": "grid", "frozen": frozen[:1]})


def test_optimizer_picked_takes_the_one_shipped_beside_the_learned_initializer(model):
    """fit(init="learned", optimizer="picked") fits with the optimizer in the JSON beside the
    initializer (recorded in the config); without a learned initializer "picked" is refused."""
    from splatopt.learned import load_learned

    text = ["Return the number of items in the queue."]
    picked = splatopt.fit(text, model, n_splats=0.25, steps=2, init="learned", optimizer="picked", device="cpu", progress=False)
    assert picked.config["optimizer"] == load_learned(model).picked_optimizer.to_dict()
    assert picked.config["optimizer"]["metric"] == "fisher"
    meta = splatopt.fit(text, model, n_splats=0.25, steps=2, init="learned", device="cpu", progress=False)
    assert meta.config["optimizer"] == load_learned(model).inner_optimizer().to_dict()
    with pytest.raises(ValueError, match="optimizer='picked'"):
        splatopt.fit(text, model, n_splats=0.25, steps=2, init="grid", optimizer="picked", device="cpu", progress=False)


@pytest.mark.parametrize("damage", ["no field_error", "config not an object"])
def test_a_fit_file_with_missing_metrics_or_a_bad_config_is_refused_naming_it(tmp_path, model, damage):
    from fixedpos.cache import read_safetensors, write_safetensors

    path = fit(["Return the sum of two numbers."], model, n_splats=2, steps=1, device="cpu", progress=False).save(tmp_path / "run.safetensors")
    tensors, header = read_safetensors(path)
    meta = json.loads(header["meta"])
    if damage == "no field_error":
        del tensors["extra.field_error"]
    else:
        header["meta"] = json.dumps({**meta, "config": "a string"})
    write_safetensors(path, tensors, header)
    with pytest.raises(ValueError, match="run.safetensors .*damaged or was not written by FitResult.save"):
        FitResult.load(path)


@pytest.mark.parametrize("damage, message", [
    ("token_mask of another batch", r"holds 2 prompts but token_mask \(1, \d+\) \(expected \(2, \d+\)\)"),
    ("field_error of another batch", r"holds 2 prompts but field_error \(1,\) \(expected \(2,\)\)"),
    ("integer field_error", r"holds 2 prompts but field_error is torch.int32"),
])
def test_a_fit_file_whose_per_prompt_tensors_disagree_with_its_splats_is_refused(tmp_path, damage, message):
    """Such a file loaded, and summary() or select() failed later (or reported the wrong prompts)."""
    from fixedpos.cache import read_safetensors, write_safetensors

    path = fit(torch.randn(2, 6, 384), n_splats=2, steps=1, objective="mse", device="cpu", progress=False).save(tmp_path / "run.safetensors")
    tensors, header = read_safetensors(path)
    if damage == "token_mask of another batch":
        tensors["extra.token_mask"] = tensors["extra.token_mask"][:1].clone()
    elif damage == "field_error of another batch":
        tensors["extra.field_error"] = tensors["extra.field_error"][:1].clone()
    else:
        tensors["extra.field_error"] = tensors["extra.field_error"].to(torch.int32)
    write_safetensors(path, tensors, header)
    with pytest.raises(ValueError, match="run.safetensors " + message):
        FitResult.load(path)


@pytest.mark.parametrize("key, value, message", [
    ("texts", 5, "metadata texts is int"),
    ("decoded", ["a", "b", "c"], "metadata decoded is list of 3 .expected a list of 2 strings"),
    ("seconds", "abc", "metadata seconds is 'abc'"),
    ("config", {"kernel": "bogus"}, "config kernel is 'bogus'"),
])
def test_damaged_fit_metadata_is_refused_on_loading_not_at_first_use(tmp_path, key, value, message):
    """A file whose JSON metadata was damaged loaded, then failed in show (texts: an int), gave a result
    with more texts than prompts, or failed with a float() error that named no file."""
    from fixedpos.cache import read_safetensors, write_safetensors

    path = fit(torch.randn(2, 6, 384), n_splats=2, steps=1, objective="mse", device="cpu", progress=False).save(tmp_path / "run.safetensors")
    tensors, header = read_safetensors(path)
    meta = json.loads(header["meta"])
    meta[key] = value
    header["meta"] = json.dumps(meta)
    write_safetensors(path, tensors, header)
    with pytest.raises(ValueError, match=f"run.safetensors holds 2 prompts but {message}"):
        FitResult.load(path)


def test_the_meta_device_is_refused_and_leaves_the_shared_model_intact(model, short_prompts):
    """fit(device="meta") moved the cached encoder to the meta device, erasing its weights for every later fit."""
    with pytest.raises(ValueError, match="device='meta': fields and splats live on cpu or cuda devices"):
        fit(short_prompts[:1], model, n_splats=0.5, steps=1, device="meta", progress=False)
    with pytest.raises(ValueError, match="the batch lies on meta"):
        model.encode(model.tokenize(short_prompts[:1]).to("meta"))
    assert fit(short_prompts[:1], model, n_splats=0.5, steps=1, device="cpu", progress=False).field_error.isfinite().all()


@pytest.mark.parametrize("damage, message", [
    ("no coefficients", "fixed-basis fit without its coefficients"),
    ("corrupt metadata", "has corrupt metadata"),
    ("NaN coefficients", "coefficients holds NaN"),
])
def test_a_damaged_fixed_basis_fit_file_is_refused_naming_it(tmp_path, damage, message):
    """A fixed-basis file without coefficients raised KeyError, one with broken metadata a bare
    JSONDecodeError, and NaN coefficients loaded (splat files refuse all three)."""
    from fixedpos.cache import read_safetensors, write_safetensors

    path = fit(torch.randn(1, 8, 384), n_splats=2, steps=0, objective="mse", basis="dct", device="cpu",
               progress=False).save(tmp_path / "dct.safetensors")
    tensors, header = read_safetensors(path)
    if damage == "no coefficients":
        del tensors["coefficients"]
    elif damage == "corrupt metadata":
        header["meta"] = "{not json"
    else:
        tensors["coefficients"] = tensors["coefficients"] * float("nan")
    write_safetensors(path, tensors, header)
    with pytest.raises(ValueError, match="dct.safetensors.* " + message):
        FitResult.load(path)


def test_cli_version_is_the_package_version(capsys):
    from splatopt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"splatopt {splatopt.__version__}"


def test_targets_with_a_list_for_a_field_are_refused_with_a_type_error_naming_the_fix():
    """A list of lists as Targets.field failed with "'list' object has no attribute 'dim'"."""
    with pytest.raises(TypeError, match="Targets.field must be a .* tensor, not list: wrap it with torch.as_tensor"):
        fit(Targets([[[0.0] * 4] * 3]), objective="mse", device="cpu", progress=False)


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", " \n\n\t\n"), ("blank.jsonl", '{"text": "  "}\n\n')])
def test_cli_fit_of_a_file_without_text_says_the_file_holds_none(tmp_path, capsys, monkeypatch, name, content):
    """It said "give a text to fit, or --file with one text per line", though --file was given."""
    from splatopt.cli import main

    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted a file without text"))
    (tmp_path / name).write_text(content)
    assert main(["fit", "--file", str(tmp_path / name), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splatopt: error: ") and f"--file {tmp_path / name} holds no" in err


def _help(argv: list[str], capsys) -> str:
    """The help text of ``splatopt ARGV --help``, its whitespace runs as single spaces (wrapping aside).
    Rendered unwrapped: argparse wraps at $COLUMNS and breaks words at hyphens ("blank-line- separated"),
    so the phrases checked here failed in a terminal or CI whose COLUMNS was narrow."""
    from unittest import mock

    from splatopt.cli import main

    with pytest.raises(SystemExit) as exit_info, mock.patch.dict("os.environ", {"COLUMNS": "10000"}):
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_cli_help_shows_the_defaults_and_what_each_option_means(capsys, tmp_path):
    import fixedpos

    fit_help = _help(["fit"], capsys)
    for shown in ("--splats SPLATS splats: a fraction of L (0.25) or a count (8) (default: 0.5)", "--steps STEPS optimizer steps (default: 300)",
                  "(default: mse+ce)", "(default: grid)", "--seed SEED random seed (default: 0)", "(default: auto)"):
        assert shown in fit_help
    assert "(default: None)" not in fit_help and "(default: False)" not in fit_help
    # --file as it is read: one text a line, but a file with blank lines gives one text per paragraph
    assert "one text per line, or, in a file with blank lines, one per blank-line-separated paragraph (its lines joined" in fit_help
    (tmp_path / "lines.txt").write_text("First text.\nSecond text.\n")
    (tmp_path / "paragraphs.txt").write_text("First line\nof the first.\n\nSecond.\n")
    assert fixedpos.load_text_file(tmp_path / "lines.txt") == ["First text.", "Second text."]
    assert fixedpos.load_text_file(tmp_path / "paragraphs.txt") == ["First line of the first.", "Second."]
    assert "--steps STEPS re-fit steps (default: 60)" in _help(["edit"], capsys)
    assert "(default: 100 150 200)" in _help(["bench"], capsys)
    # --prompts is a count, not a list of prompts
    assert "--prompts N list the splats (slot, mu, sigma, weight, |v|) of the first N prompts; 0: none (the metrics of the first " \
        "max(N, 8) are listed) (default: 1)" in _help(["show"], capsys)


def test_cli_show_into_a_closed_pipe_ends_quietly(tmp_path, model):
    """``splatopt show x | head -1`` printed "splatopt: error: [Errno 32] Broken pipe" and exited 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = fit(["Return the sum of two numbers."], model, steps=1, device="cpu", progress=False).save(tmp_path / "run.safetensors")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    # the reader is gone before the command starts (closing it after the start raced the command's first write)
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "splatopt", "show", str(path)], stdout=write_end,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert err.decode() == "" and proc.returncode == 141


def test_cli_warnings_read_as_the_commands_own_lines_not_python_source(tmp_path):
    """A warning printed Python's file, line number and source line ("cli.py:432: UserWarning: ... net =
    meta.train(cfg, ...)"); the command now says "splatopt: warning: ..." and nothing else."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "splatopt", "fit", "Close the file now.", "--optimizer", '{"lr_v": 1e20}',
                           "--steps", "2", "--device", "cpu", "--quiet"], capture_output=True, env=env, cwd=tmp_path, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and err.startswith("splatopt: warning: prompt(s) [0] diverged"), err
    assert "Warning:" not in err and ".py:" not in err and "warnings.warn" not in err


def _bare_field(B=2, L=6, d=8, seed=0) -> Targets:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L // 2 :] = False
    return Targets(torch.randn(B, L, d, generator=g), mask)


def test_a_custom_initializer_in_another_precision_is_fitted_in_the_fits_dtype():
    """An initializer's float16 splats were fitted in float16 (NaN field errors, every step skipped), and a
    float32 one's in a float64 fit stayed float32: fit moves them to its own dtype and device."""
    def half(target, mask, n, generator=None):
        return GridInit()(target, mask, n).to(torch.float16)

    def single(target, mask, n, generator=None):
        return GridInit()(target.float(), mask, n)

    opts = dict(n_splats=2, steps=3, objective="mse", device="cpu", progress=False)
    fitted = fit(_bare_field(), init=half, **opts)
    reference = fit(_bare_field(), init=lambda t, m, n, g=None: GridInit()(t, m, n).to(torch.float16).to(torch.float32), **opts)
    assert fitted.splats.mu.dtype == torch.float32 and torch.isfinite(fitted.field_error).all()
    assert int(fitted.skipped_steps.sum()) == 0
    torch.testing.assert_close(fitted.splats.v, reference.splats.v)
    wide = fit(_bare_field(), init=single, dtype=torch.float64, **opts)
    assert wide.splats.mu.dtype == wide.splats.v.dtype == torch.float64


def test_a_numpy_seed_is_an_int_seed():
    import numpy as np

    opts = dict(n_splats=3, steps=2, objective="mse", init={"name": "grid", "jitter": 0.5}, device="cpu", progress=False)
    a, b = fit(_bare_field(), seed=np.int64(3), **opts), fit(_bare_field(), seed=3, **opts)
    assert torch.equal(a.splats.mu, b.splats.mu) and a.config["seed"] == 3 and type(a.config["seed"]) is int
    json.dumps(a.config)


def test_result_select_takes_numpy_integers_and_slices():
    import numpy as np

    result = fit(_bare_field(B=3), n_splats=2, steps=1, objective="mse", device="cpu", progress=False)
    assert torch.equal(result.select(np.int64(2)).splats.mu, result.select(2).splats.mu)
    assert torch.equal(result.select(slice(1, None)).field_error, result.field_error[1:])
    assert torch.equal(result.select(slice(None, None, -1)).mask, result.mask.flip(0))


def test_a_device_name_torch_does_not_know_is_a_value_error_naming_the_option():
    with pytest.raises(ValueError, match=r"device='gpu' is not a device; give auto, cpu, cuda or cuda:N"):
        fit(_bare_field(), n_splats=2, steps=1, objective="mse", device="gpu", progress=False)


def test_malformed_api_arguments_are_type_errors_naming_the_argument(model):
    """Each of these failed deep inside (AttributeError, 'NoneType' is not iterable) or, worse, ran:
    select([0.5]) picked prompt 0 and bytes were fitted as a list of ints."""
    field = _bare_field(B=2)
    opts = dict(steps=1, objective="mse", device="cpu", progress=False)
    cases = [
        (lambda: fit(field, n_splats="4", **opts), TypeError, "n_splats='4': give a number"),
        (lambda: fit(field, n_splats=[[2, 3]], **opts), ValueError, r"n_splats is a \(1, 2\) array: give a flat list of 2"),
        (lambda: fit(field, n_splats=2, optimizer=3, **opts), TypeError, "optimizer must be an InnerOptimizer"),
        (lambda: fit("Some text.", "minilm-l6", **opts), TypeError, r"model must be a fixedpos.FieldModel, not str: pass fixedpos.load\('minilm-l6'\)"),
        (lambda: fit(b"abc", model, **opts), TypeError, "texts_or_fields is bytes: decode it"),
        (lambda: fit(field, n_splats=2, init=lambda *a: None, **opts), TypeError, "the initializer returned NoneType, not a SplatSet"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    result = fit(field, n_splats=2, **opts)
    for index in ([0.5], 0.5, "0"):
        with pytest.raises(TypeError, match="select"):
            result.select(index)
    for empty in ([], slice(5, 9)):
        with pytest.raises(IndexError, match="selects no prompt; this result holds prompts 0..1"):
            result.select(empty)
    with pytest.raises(TypeError, match="FitResult.cat takes FitResults only, not int"):
        FitResult.cat([result, 3])
    with pytest.raises(TypeError, match="WarmStart takes a SplatSet, not FitResult: pass result.splats"):
        WarmStart(result)
    with pytest.raises(TypeError, match="render takes a SplatSet, not FitResult: pass result.splats"):
        render(result, 8)
    import numpy as np

    assert torch.equal(result.select(np.array([1, 0])).field_error, result.field_error.flip(0))  # arrays still index


def test_a_diverged_fit_warns_and_save_refuses_what_load_would_refuse(tmp_path):
    """With a learning rate that overflows, the centres reach inf without a non-finite gradient (the NaN
    guard's trigger); save wrote a file that load then refused."""
    from splatopt import InnerOptimizer

    opts = dict(n_splats=2, steps=10, objective="mse", device="cpu", progress=False)
    with pytest.warns(RuntimeWarning, match=r"prompt\(s\) \[0\] diverged"):  # prompt 1 stayed finite
        result = fit(_bare_field(), optimizer=InnerOptimizer(lr_mu=3e38), **opts)
    with pytest.raises(ValueError, match=r"not saving .*run.safetensors: mu holds NaN or inf in active splats of prompt\(s\) \[0\]"):
        result.save(tmp_path / "run.safetensors")
    assert not (tmp_path / "run.safetensors").exists()
    kept = FitResult.load(result.select([1]).save(tmp_path / "kept.safetensors"))
    assert torch.equal(kept.splats.mu, result.splats.mu[1:].cpu())


def test_save_refuses_a_fixed_basis_fit_with_non_finite_coefficients_that_load_would_refuse(tmp_path):
    """Only the splat path checked for NaN before writing: a diverged dct fit was saved, then refused by load."""
    result = fit(_bare_field(), n_splats=2, steps=1, objective="mse", basis="dct", device="cpu", progress=False)
    coefficients = result.coefficients.clone()
    coefficients[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not saving .*run.safetensors: coefficients hold NaN or inf for prompt\(s\) \[1\]"):
        replace(result, coefficients=coefficients).save(tmp_path / "run.safetensors")
    assert not (tmp_path / "run.safetensors").exists()
    kept = FitResult.load(replace(result, coefficients=coefficients).select([0]).save(tmp_path / "kept.safetensors"))
    assert torch.equal(kept.coefficients, result.coefficients[:1].cpu())


def test_cli_fit_whose_out_fails_after_the_fit_keeps_the_fit_and_says_where(tmp_path, monkeypatch, capsys):
    """--out was checked before the fit, but a write that failed after it (the disk full, the folder made
    read-only meanwhile) ended the command with the error alone: the fit was lost. It is now kept in the
    temporary folder, and the error names that file."""
    import fixedpos.cache
    from splatopt.cli import main

    out, real_replace = tmp_path / "run.safetensors", fixedpos.cache.os.replace

    def full_disk(src, dst):
        if str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fixedpos.cache.os, "replace", full_disk)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    code = main(["fit", "Close the file now.", "--splats", "2", "--steps", "1", "--device", "cpu", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    kept = list((tmp_path / "tmp").glob("splatopt-rescued-*-run.safetensors"))
    assert code == 2 and not out.exists() and len(kept) == 1
    assert f"--out {out} could not be written after the fit" in err and f"the fit kept in {kept[0]}" in err
    assert FitResult.load(kept[0]).input_texts == ["Close the file now."]


def test_saving_a_partly_diverged_fit_from_the_cli_keeps_the_other_prompts():
    """FitResult.save refuses a diverged prompt's NaN splats, so `splatopt fit --out` lost every prompt of
    the batch to one that diverged; the others are now written beside --out, and the error names the file."""
    import tempfile
    from pathlib import Path

    from splatopt import InnerOptimizer
    from splatopt.cli import _save_fit

    with pytest.warns(RuntimeWarning, match="diverged"):
        result = fit(_bare_field(), optimizer=InnerOptimizer(lr_mu=3e38), n_splats=2, steps=10, objective="mse",
                     device="cpu", progress=False)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run.safetensors"
        with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] .*the 1 other prompt\(s\) \(\[1\] of the fit\) kept in "
                                             r".*run\.finite\.safetensors"):
            _save_fit(result, str(out))
        kept = FitResult.load(Path(folder) / "run.finite.safetensors")
        assert not out.exists() and torch.equal(kept.splats.mu, result.splats.mu[1:])


def test_targets_on_the_meta_device_and_bool_splat_counts_are_named_errors():
    """A Targets field, mask or ids on the meta device failed deep in torch ("Cannot copy out of meta tensor"),
    and n_splats=[True, 3] fitted prompt 0 with one splat; a scalar True was already refused."""
    field = _bare_field()
    opts = dict(steps=1, objective="mse", device="cpu", progress=False)
    for name in ("field", "mask"):
        meta = Targets(**{"field": field.field, "mask": field.mask, name: getattr(field, name).to("meta")})
        with pytest.raises(ValueError, match=f"Targets.{name} lies on the meta device"):
            fit(meta, n_splats=2, **opts)
    with pytest.raises(TypeError, match=r"n_splats=\[True, 2\]: a per-prompt list holds splat counts \(ints\), not bools"):
        fit(field, n_splats=[True, 2], **opts)


def test_saving_a_result_on_the_meta_device_names_the_file(tmp_path):
    """FitResult.load(device="meta") reads a fit's shapes; saving it failed with torch's "Tensor.item() cannot be
    called on meta tensors"."""
    result = fit(_bare_field(), n_splats=2, steps=1, objective="mse", basis="dct", device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"not saving .*run.safetensors: \['token_mask', 'field_error', 'coefficients'\] lie on the meta"):
        replace(result, mask=result.mask.to("meta"), field_error=result.field_error.to("meta"),
                coefficients=result.coefficients.to("meta")).save(tmp_path / "run.safetensors")


def test_a_fit_whose_finite_splats_render_an_overflowing_field_warns_too():
    """lr_v = 1e20 leaves every splat finite (about 1e20) but their squared error overflows: the fit printed
    "relative field error inf" and decoded [PAD] everywhere without the warning a diverged fit gives."""
    from splatopt import InnerOptimizer

    opts = dict(n_splats=2, steps=3, objective="mse", device="cpu", progress=False)
    with pytest.warns(RuntimeWarning, match=r"prompt\(s\) \[0, 1\] diverged: their splats render a field that overflows"):
        result = fit(_bare_field(), optimizer=InnerOptimizer(lr_v=1e20), **opts)
    assert torch.isfinite(result.splats.v).all() and not torch.isfinite(result.field_error).any()


def test_a_truncated_grid_fit_starts_at_its_least_squares_optimum():
    """The grid's embeddings were solved for the untruncated render, so a fit with truncate = 1 and
    one splat per token started at field error 0.18, not the exact solution it has."""
    result = fit(torch.randn(1, 6, 8), n_splats=1.0, steps=0, truncate=1.0, objective="mse", device="cpu", progress=False)
    assert float(result.field_error.max()) < 1e-6


def test_a_learned_start_renders_the_same_starting_field_in_normalized_mode(model, short_prompts):
    """Its embeddings were solved for the additive sum whatever the fit rendered with: a normalized
    fit started at field error 4-6 instead of about 0.9."""
    opts = dict(n_splats=0.25, steps=0, init="learned", device="cpu", progress=False)
    additive, normalized = fit(short_prompts, model, **opts), fit(short_prompts, model, mode="normalized", **opts)
    torch.testing.assert_close(normalized.field_error, additive.field_error, atol=0.05, rtol=0.05)


def test_loaded_splats_carry_the_render_not_the_results_texts(tmp_path):
    """A loaded result's splats carried the whole file metadata (texts, decoded, summary), stale after
    select or cat, and written as such by result.splats.save."""
    from splatopt.fit import SPLAT_META

    result = fit(_bare_field(), n_splats=2, steps=1, objective="mse", device="cpu", progress=False)
    loaded = FitResult.load(result.save(tmp_path / "run.safetensors"))
    assert set(loaded.splats.meta) <= set(SPLAT_META) and loaded.splats.meta["kernel"] == "gaussian"
    assert loaded.splats.meta == result.splats.meta


def test_a_warm_start_with_more_splats_than_tokens_is_refused():
    """n_splats is refused above L, but a WarmStart of 20 splats on 6 tokens was fitted as it was."""
    field = torch.randn(1, 6, 8)
    many = fit(torch.randn(1, 24, 8), n_splats=20, steps=0, objective="mse", device="cpu", progress=False).splats
    with pytest.raises(ValueError, match="init=WarmStart gives prompt 0 20 active splats for its 6 tokens"):
        fit(Targets(field), n_splats=2, init=WarmStart(many), steps=1, objective="mse", device="cpu", progress=False)


def test_a_warm_start_fit_records_the_starts_counts_not_the_default_budget():
    """With a WarmStart and no n_splats, the result recorded n_splats = 0.5 (the default budget) while
    the fit held the start's 3 and 2 splats. Density control keeps the default cap to grow to."""
    field = torch.randn(2, 12, 8)
    start = fit(field, n_splats=[3, 2], steps=0, objective="mse", device="cpu", progress=False).splats
    warm = fit(field, init=WarmStart(start), steps=1, objective="mse", device="cpu", progress=False)
    assert warm.config["n_splats"] == [3, 2]
    assert warm.splats.counts.tolist() == [3, 2]
    assert warm.select(1).config["n_splats"] == [2]
    given = fit(field, n_splats=4, init=WarmStart(start), steps=1, objective="mse", device="cpu", progress=False)
    assert given.config["n_splats"] == 4  # a given n_splats is the density cap, recorded as given
    assert fit(field, steps=0, objective="mse", device="cpu", progress=False).config["n_splats"] == 0.5
    long = torch.randn(1, 24, 8, generator=torch.Generator().manual_seed(3))
    three = fit(long, n_splats=3, steps=0, objective="mse", device="cpu", progress=False).splats
    grown = fit(long, init=WarmStart(three), steps=60, objective="mse", density="adaptive", device="cpu", progress=False)
    assert grown.config["n_splats"] == [12] and int(grown.splats.counts[0]) > 3  # a cap of the start's 3 never grew


@pytest.mark.parametrize("scale, message", [
    (0.0, "prompt 1 of the given field is zero at every valid position: its relative field error"),
    (1e19, "prompt 1 of the given field reaches 3.*e\\+19: its squared norm overflows float32; scale the field down"),
    (1e-17, "prompt 1 of the given field is at most 3.*e-17 in magnitude: its squares lose their digits below float32.s normal range; scale the field up"),
])
def test_a_field_whose_relative_error_cannot_be_computed_is_refused(scale, message):
    """A zero target gave an infinite error; a field of 1e19 overflowed its squared norm, so every step
    was skipped and the fit ended where it began, with only a 'diverged' warning."""
    field = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    field[1] = field[1] / field[1].abs().max() * 3.0 * scale  # peak exactly 3 * scale
    with pytest.raises(ValueError, match=message):
        fit(Targets(field), n_splats=2, steps=1, objective="mse", device="cpu", progress=False)
    if scale:
        assert fit(Targets(field), n_splats=2, steps=1, objective="mse", device="cpu", progress=False, dtype=torch.float64).field_error.isfinite().all()


def test_the_field_scale_check_measures_the_squared_norm_itself():
    """One entry of 1e19 was refused although the squared norm (1e38) fits float32, and in float64 the
    bound came out as float32 inf, so a field of 1e200 passed and ended in NaN."""
    field = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(1)) * 1e-3
    field[0, 2, 3] = 1e19
    assert fit(Targets(field), n_splats=2, steps=0, objective="mse", device="cpu", progress=False).field_error.isfinite().all()
    with pytest.raises(ValueError, match="squared norm overflows float64"):
        fit(Targets(field.double() * 1e181), n_splats=2, steps=0, objective="mse", device="cpu", progress=False, dtype=torch.float64)


def test_a_field_fits_with_a_custom_decoder_that_has_only_decode_and_dim():
    """A researcher's own decoder head for a field: fit asked for tokenize and encode it never calls on a
    field, and, given them, failed after the whole fit with AttributeError: no 'detokenize'."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 11, generator=g)

    class Head:
        dim = 8

        def decode(self, field):
            return field @ W.to(field.dtype)

    targets = _bare_field()
    targets.ids = (targets.field @ W).argmax(-1)
    result = fit(targets, Head(), n_splats=3, steps=3, device="cpu", progress=False)  # objective mse+ce: the head's CE
    assert result.texts is None and "ce" in result.history
    field = render(result.splats, targets.field.shape[1])
    torch.testing.assert_close(result.token_accuracy, splatopt.token_accuracy(field @ W, targets.ids, targets.mask))
    with pytest.raises(TypeError, match=r"for a field, any object with decode\(field \[B, L, d\]\) -> logits"):
        fit(targets, object(), n_splats=3, steps=1, device="cpu", progress=False)


def test_an_initializer_must_keep_to_the_splats_and_width_asked_for():
    """A custom initializer that activated more slots than n_splats was fitted with them silently (the result
    held 4 splats where config said 3); one of another width failed in the objective as 'field ... and target ...'."""
    opts = dict(n_splats=2, steps=1, objective="mse", device="cpu", progress=False)
    with pytest.raises(ValueError, match="the initializer function returned 3 active splats where 2 were asked for"):
        fit(_bare_field(), init=lambda t, m, n, g=None: GridInit()(t, m, n + 1), **opts)
    with pytest.raises(ValueError, match="the initializer returned embeddings of width d=4 for a target of d=8"):
        fit(_bare_field(), init=lambda t, m, n, g=None: GridInit()(t[..., :4], m, n), **opts)
    fewer = fit(_bare_field(), init=lambda t, m, n, g=None: GridInit()(t, m, n.clamp(max=1)), **opts)
    assert fewer.splats.counts.tolist() == [1, 1]  # fewer is the initializer's choice, never more


def test_a_custom_density_strategy_or_initializer_meta_of_any_kind_is_recorded_and_saved(tmp_path):
    """fit recorded a strategy by vars(): one with __slots__ failed before fitting (vars() argument must have
    __dict__), and a tensor field (or an initializer's tensor meta) made save() fail after the fit with
    'Object of type Tensor is not JSON serializable'. Shipped strategies are recorded by name, as fit takes them."""
    from splatopt.density import AdaptiveDensity

    class Hooks:  # no density control, the hooks alone
        __slots__ = ()

        def initial_counts(self, caps):
            return caps

        def init_state(self, params, slot_mask):
            return {}

        def observe(self, step, grads, slot_mask, state):
            return state

        def refine(self, step, steps, params, adam, slot_mask, state, ctx):
            return params, adam, slot_mask, state

    class Threshold(Hooks):  # a plain object with tensor settings
        def __init__(self):
            self.threshold = torch.tensor(0.25)
            self.table = torch.arange(40)

    class Slotted(Hooks):  # no __dict__ at all
        __slots__ = ("rate",)

        def __init__(self):
            self.rate = 0.5

    class Tagged:
        meta = {"trained_on": torch.tensor(3), "scale": torch.ones(2)}

        def __call__(self, target, mask, n, generator=None):
            return GridInit()(target, mask, n)

    opts = dict(n_splats=2, steps=2, objective="mse", device="cpu", progress=False)
    result = fit(_bare_field(), density=Threshold(), init=Tagged(), **opts)
    assert result.config["density"]["strategy"] == "Threshold" and result.config["density"]["threshold"] == 0.25
    assert result.config["initializer_meta"]["trained_on"] == 3 and isinstance(result.config["initializer_meta"]["scale"], str)
    loaded = FitResult.load(result.save(tmp_path / "custom.safetensors"))
    assert loaded.config == json.loads(json.dumps(result.config))
    assert fit(_bare_field(), density=Slotted(), **opts).config["density"] == {"strategy": "Slotted"}
    shipped = fit(_bare_field(), density=AdaptiveDensity(start=1), **opts).config["density"]
    assert shipped == {"name": "adaptive", **vars(AdaptiveDensity(start=1))}  # as fit takes it back


def test_selecting_a_partition_and_concatenating_it_gives_back_the_fits_time_once(model, short_prompts):
    """select() kept the whole fit's seconds and encode_seconds in every part, so FitResult.cat of the
    parts counted the fit's time once per part (two parts: twice), and a one-prompt selection's summary
    claimed the whole batch's time. Each part now holds its share, by tokens."""
    from dataclasses import replace

    result = replace(fit(short_prompts[:3], model, n_splats=0.5, steps=2, device="cpu", progress=False),
                     seconds=10.0, encode_seconds=4.0)  # round figures: a fast fit may take almost no time
    tokens = result.mask.sum(-1).float()
    parts = [result.select([0, 2]), result.select(1)]
    assert parts[1].seconds == pytest.approx(10.0 * float(tokens[1] / tokens.sum()))
    assert parts[1].summary()["seconds"] == pytest.approx(parts[1].seconds, abs=1e-3)
    assert parts[1].summary()["seconds"] < result.summary()["seconds"]
    again = FitResult.cat(parts)
    assert again.seconds == pytest.approx(10.0) and again.encode_seconds == pytest.approx(4.0)
    assert again.summary()["seconds"] == result.summary()["seconds"]
    assert result.select([0, 1, 2]).seconds == pytest.approx(10.0)  # the whole batch selected: all of it


@pytest.mark.parametrize("basis", ["splats", "dct"])
def test_cat_of_a_float32_and_a_float64_fit_is_refused_naming_each(tmp_path, basis):
    """FitResult.cat of a float32 and a float64 fit returned float64 splats (torch.cat promotes) under the
    first fit's config, which still said float32; and results on two devices got one message for two causes
    ("different models or lie on different devices"), naming neither result."""
    field = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(0))
    opts = dict(n_splats=3, steps=1, objective="mse", basis=basis, device="cpu", progress=False)
    single, double = fit(Targets(field), **opts), fit(Targets(field.double()), dtype=torch.float64, **opts)
    with pytest.raises(ValueError, match=r"different dtypes \(result 0 is torch.float32, result 1 is torch.float64\).*"
                                         r"dtype=torch.float32"):
        FitResult.cat([single, double])
    on_meta = FitResult.load(single.save(tmp_path / "run.safetensors"), device="meta")
    with pytest.raises(ValueError, match=r"different devices \(result 0 is cpu, result 1 is meta\).*device="):
        FitResult.cat([single, on_meta])



def _same_splats(a: FitResult, b: FitResult) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.splats.params().values(), b.splats.params().values()))


def test_a_saved_fits_config_repeats_it_bit_for_bit_through_fit_options(model, tmp_path):
    """A fit's config could not be fed back: a jittered GridInit object was recorded as "GridInit" (its
    jitter lost), density as {"strategy": "AdaptiveDensity", ...} (which fit refused), the dtype as a
    string, and batch_size (which moves the bits) not at all."""
    texts = ["Return the sum of a and b.", "Open a file and return a stream object for it."]
    first = fit(texts, model, n_splats=0.5, steps=6, init=GridInit(jitter=0.5), seed=3, batch_size=1, dtype=torch.float64,
                density={"name": "adaptive", "interval": 2, "start": 1}, device="cpu", progress=False, record_every=2)
    loaded = FitResult.load(first.save(tmp_path / "run.safetensors"))
    assert loaded.config["init"]["jitter"] == 0.5 and loaded.config["batch_size"] == 1
    again = fit(loaded.input_texts, model, device="cpu", progress=False, **loaded.fit_options())
    assert _same_splats(first, again) and again.splats.mu.dtype == torch.float64
    assert torch.equal(first.history["loss"], again.history["loss"])
    with pytest.raises(ValueError, match="written before splatopt recorded them"):
        splatopt.fit_options({k: v for k, v in loaded.config.items() if k != "batch_size"})
    with pytest.raises(ValueError, match="WarmStart"):
        splatopt.fit_options({**loaded.config, "init": "WarmStart"})


def test_cli_fit_config_repeats_a_saved_fit_and_options_given_override_it(tmp_path, capsys):
    """splatopt fit had no way to repeat a saved fit: every setting had to be typed again from its metadata."""
    from splatopt.cli import main

    first, again, longer = (tmp_path / f"{name}.safetensors" for name in ("first", "again", "longer"))
    assert main(["fit", "Return the sum of a and b.", "--steps", "4", "--seed", "4", "--optimizer", '{"lr_mu": 0.2}',
                 "--density", '{"name": "adaptive", "interval": 2, "start": 1}', "--device", "cpu", "--quiet",
                 "--out", str(first)]) == 0
    assert main(["fit", "--config", str(first), "--device", "cpu", "--quiet", "--out", str(again)]) == 0
    assert _same_splats(FitResult.load(first), FitResult.load(again))
    assert main(["fit", "--config", str(first), "--steps", "5", "--optimizer", '{"lr_v": 0.3}', "--device", "cpu",
                 "--quiet", "--out", str(longer)]) == 0
    config = FitResult.load(longer).config
    assert (config["steps"], config["seed"], config["optimizer"]["lr_mu"], config["optimizer"]["lr_v"]) == (5, 4, 0.2, 0.3)
    (tmp_path / "list.json").write_text("[1]")
    assert main(["fit", "x", "--config", str(tmp_path / "list.json")]) == 2
    assert "not a fit's config" in capsys.readouterr().err


def test_a_saved_fit_records_the_versions_and_its_metadata_is_strict_json(model, tmp_path):
    """A fit file recorded no splatopt, torch or python version, and a non-finite setting (clip = inf)
    was written as Infinity, which is not JSON: jq, R and strict parsers refused the file's metadata."""
    from safetensors import safe_open

    result = fit(["Return the sum of a and b."], model, steps=2, optimizer=splatopt.InnerOptimizer(clip=float("inf")),
                 device="cpu", progress=False)
    with safe_open(str(result.save(tmp_path / "run.safetensors")), "pt") as f:
        meta = json.loads(f.metadata()["meta"], parse_constant=lambda name: pytest.fail(f"{name} in the metadata"))
    assert meta["versions"] == {"splatopt": splatopt.__version__, "torch": torch.__version__,
                                "python": __import__("platform").python_version()}
