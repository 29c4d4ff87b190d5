"""Warm-started re-fitting after edits: transport, pruning, spawning, freezing, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import splatopt
from splatopt.edit import apply_char_edits, edit_script, transport
from splatopt.render import render

TEXT = "Return a new list containing all items from the iterable in ascending order."


@pytest.fixture(scope="module")
def fitted(model):
    return splatopt.fit([TEXT], model, n_splats=0.5, steps=80, device="cpu", progress=False)


def test_insert_at_start_shifts_every_splat_by_the_inserted_length(model, fitted):
    new_text = "Please kindly " + TEXT
    result = splatopt.edit(fitted, new_text, steps=0, progress=False)
    inserted = len(model.tokenize(["Please kindly"]).ids[0])
    warm, old = result.edit["start_splats"], fitted.splats
    n_old = int(old.counts[0])
    torch.testing.assert_close(warm.mu[0, :n_old], old.mu[0, :n_old] + inserted)
    torch.testing.assert_close(warm.v[0, :n_old], old.v[0, :n_old])
    assert result.edit["pruned"] == [] and len(result.edit["spawned"]) >= 1
    # away from the edit the warm start renders exactly the old field, shifted, and it decodes the new tokens
    target_len = int(result.mask.sum())
    rendered = render(warm, target_len)[0]
    old_rendered = render(old, int(fitted.mask.sum()))[0]
    far = slice(inserted + 4, target_len)
    torch.testing.assert_close(rendered[far], old_rendered[far.start - inserted :], atol=1e-4, rtol=1e-4)
    new_ids = model.tokenize([new_text]).ids[0]
    assert torch.equal(model.decode(rendered[far]).argmax(-1), new_ids[far])


def test_replacing_the_text_by_a_much_shorter_one_keeps_at_most_one_splat_per_token(model, fitted):
    """Every old splat is squeezed into a 2-token replacement; fit() holds at most one splat per
    token, so even without holding the budget (hold_budget=False) the least weighted transported
    splats are pruned, and a fresh start has as many."""
    for fresh_start in (False, True):
        result = splatopt.edit(fitted, "Sum it", steps=2, fresh_start=fresh_start, hold_budget=False, progress=False)
        L = int(result.mask.sum())
        assert int(result.splats.counts[0]) <= L and int(result.edit["start_splats"].counts[0]) <= L
        assert len(result.edit["pruned"]) >= int(fitted.splats.counts[0]) - L
        assert result.config["n_splats"] == [int(result.splats.counts[0])]
    # of the splats the script itself keeps, the cap drops the least weighted
    batch = model.tokenize(["Sum it"])
    script = edit_script(fitted.ids[0][fitted.mask[0]].tolist(), batch.ids[0][batch.mask[0]].tolist())
    _, _, deleted = transport(fitted.splats.mu[0], fitted.splats.sigma[0], script)
    survivors = fitted.splats.mask[0] & ~deleted
    pruned = splatopt.edit(fitted, "Sum it", steps=0, fresh_start=False, hold_budget=False, progress=False).edit["pruned"]
    capped = survivors.clone()
    capped[[i for i in range(len(capped)) if i not in pruned]] = False
    kept = survivors & ~capped
    weights = fitted.splats.weight_logit[0]
    assert capped.any() and kept.any() and weights[kept].min() >= weights[capped].max()


def test_deleting_all_but_one_word_leaves_a_valid_splat_set(fitted):
    result = splatopt.edit(fitted, "order", steps=5, progress=False)
    s = result.splats
    assert s.mask.any() and torch.isfinite(s.mu[s.mask]).all() and torch.isfinite(s.v[s.mask]).all()
    L = int(result.mask.sum())
    assert (s.mu[s.mask] >= -0.5).all() and (s.mu[s.mask] <= L - 0.5).all()
    assert len(result.edit["pruned"]) >= 1


def test_a_deletion_that_prunes_below_the_budget_refills_it_where_the_field_is_worst(model, fitted):
    """A cut text keeps its budget (here one splat per token, set by spawn_density): the splats
    pruning leaves missing are spawned on tokens, and the warm start's field is closer to the new
    target than the transported splats' alone."""
    short = "Return a new iterable"
    result = splatopt.edit(fitted, short, steps=0, spawn_density=1.0, fresh_start=False, progress=False)
    L = int(result.mask.sum())
    warm, n_old = result.edit["start_splats"], fitted.splats.capacity
    refill = result.edit["spawned_for_density"]
    assert int(warm.mask.sum()) == L and refill == L - len(result.edit["transported"]) >= 1
    refilled = warm.mu[0, result.edit["spawned"][-refill:]]
    assert torch.equal(refilled, refilled.round()) and (refilled >= 0).all() and (refilled <= L - 1).all()
    assert len(set(refilled.tolist())) == refill  # one per token
    kept_only = type(warm)(warm.mu, warm.log_sigma, warm.weight_logit, warm.v, warm.mask & (torch.arange(warm.capacity) < n_old))
    target = model.encode(model.tokenize([short]))[0, :L]
    error = lambda s: (render(s, L)[0] - target).pow(2).sum()  # noqa: E731
    assert error(warm) < 0.9 * error(kept_only)  # least squares on the residual: the field can only get closer


def test_char_edits_equal_the_edited_text(fitted):
    start = TEXT.index("new")
    by_edits = splatopt.edit(fitted, edits=[(start, start + 3, "fresh")], steps=0, progress=False)
    by_text = splatopt.edit(fitted, TEXT.replace("new", "fresh"), steps=0, progress=False)
    assert by_edits.input_texts == by_text.input_texts
    torch.testing.assert_close(by_edits.splats.mu, by_text.splats.mu)


def test_char_edits_given_as_json_lists_are_one_prompts_edits_and_a_bare_edit_is_refused(fitted):
    start = TEXT.index("new")
    as_tuples = splatopt.edit(fitted, edits=[(start, start + 3, "fresh")], steps=0, progress=False)
    as_lists = splatopt.edit(fitted, edits=[[start, start + 3, "fresh"]], steps=0, progress=False)
    assert as_lists.input_texts == as_tuples.input_texts
    with pytest.raises(ValueError, match="is one edit; give a list of them"):
        splatopt.edit(fitted, edits=(start, start + 3, "fresh"), steps=0, progress=False)


@pytest.mark.parametrize("edits, error, message", [
    ([(10, 5, "x")], ValueError, r"edits\[0\]: edit \(10, 5\) has start > end"),
    ([(1.0, 2, "x")], TypeError, r"start and end must be int character offsets"),
    ([(True, 2, "x")], TypeError, r"start and end must be int character offsets"),
    ([(1, 2, None)], TypeError, r"replacement of type NoneType, not str"),
    ([(1, 2)], ValueError, r"edits\[0\]=\(1, 2\): an edit is \(start, end, replacement\)"),
    ([(5, 9, "X"), (0, 6, "Y")], ValueError, r"edits overlap: \(0, 6\) and \(5, 9\)"),
    ("abc", TypeError, r"edits='abc': give a list of \(start, end, replacement\) edits"),
    ([(0, len(TEXT), "   ")], ValueError, r"the edit leaves prompt 0's text empty \(whitespace only\)"),
])
def test_malformed_char_edits_name_the_edit_and_the_fix(fitted, monkeypatch, edits, error, message):
    """start > end and a float offset were reported as lying outside the text, True was read as 1, a
    None replacement or a two-field edit raised "'int' object is not subscriptable", a string was
    taken as three edit lists, and an edit leaving blank text failed in the tokenizer as 'texts[0]'."""
    import importlib

    edit_module = importlib.import_module("splatopt.edit")
    monkeypatch.setattr(edit_module, "fit", lambda *a, **k: pytest.fail("re-fitted a malformed edit"))
    with pytest.raises(error, match=message):
        splatopt.edit(fitted, edits=edits, steps=0, progress=False)


def test_char_edits_apply_in_any_order_and_an_insertion_may_open_a_replaced_span():
    assert apply_char_edits(TEXT, [(20, 21, "X"), (0, 1, "Y")]) == "Y" + TEXT[1:20] + "X" + TEXT[21:]
    # an insertion at 5 and a replacement of 5..7 touch but do not overlap, whichever comes first
    assert apply_char_edits(TEXT, [(5, 7, "Y"), (5, 5, "X")]) == TEXT[:5] + "XY" + TEXT[7:]
    assert apply_char_edits(TEXT, [(5, 5, "A"), (5, 5, "B")]) == TEXT[:5] + "AB" + TEXT[5:]


def test_a_bad_edit_of_one_prompt_in_a_batch_names_that_prompt(model, monkeypatch):
    import importlib

    two = splatopt.fit([TEXT, "Another text here."], model, n_splats=0.5, steps=0, device="cpu", progress=False)
    edit_module = importlib.import_module("splatopt.edit")
    monkeypatch.setattr(edit_module, "fit", lambda *a, **k: pytest.fail("re-fitted a malformed edit"))
    with pytest.raises(ValueError, match=r"prompt 1's edits\[0\]: edit \(3, 99\) lies outside the text's 18 characters"):
        splatopt.edit(two, edits=[[(0, 6, "Give")], [(3, 99, "x")]], steps=0, progress=False)


def test_edit_refuses_a_model_at_another_layer_and_a_fixed_basis_fit(model, fitted):
    import fixedpos

    with pytest.raises(ValueError, match="at layer 2, not minilm-l6 .* at layer 4"):
        splatopt.edit(fitted, TEXT.replace("new", "fresh"), model=fixedpos.load(layer=4), steps=0, progress=False)
    grid = splatopt.fit([TEXT], model, n_splats=0.5, steps=1, basis="fixed-grid", device="cpu", progress=False)
    with pytest.raises(ValueError, match="fixed 'fixed-grid' basis"):
        splatopt.edit(grid, TEXT.replace("new", "fresh"), steps=0, progress=False)


def test_local_refit_keeps_far_splats_fixed(fitted):
    result = splatopt.edit(fitted, TEXT.replace("ascending", "descending"), steps=10, local=True, progress=False)
    far = result.edit["far_from_edit"]
    assert far, "an edit near the end leaves splats far from it"
    warm = result.edit["start_splats"]
    torch.testing.assert_close(result.splats.v[0, far].cpu(), warm.v[0, far])
    torch.testing.assert_close(result.splats.mu[0, far].cpu(), warm.mu[0, far])


def test_edit_round_trips_through_a_saved_file(tmp_path, fitted):
    path = fitted.save(tmp_path / "run.safetensors")
    result = splatopt.edit(path, TEXT.replace("list", "tuple"), steps=3, progress=False)
    assert result.edit["script"][1][0] == "replace"


def test_a_saved_edit_result_keeps_its_edit_records_and_start_splats(tmp_path, fitted):
    from splatopt.plot import edit_trajectory_series

    one = splatopt.edit(fitted, TEXT.replace("list", "tuple"), steps=2, progress=False)
    back = splatopt.FitResult.load(one.save(tmp_path / "edited.safetensors"))
    assert isinstance(back.edit, dict) and back.edit["script"] == one.edit["script"]
    assert {k: v for k, v in back.edit.items() if k != "start_splats"} == one.config["edit"]
    for k, t in one.edit["start_splats"].params().items():
        assert torch.equal(back.edit["start_splats"].params()[k], t), k
    assert edit_trajectory_series(fitted, back) == edit_trajectory_series(fitted, one)  # a loaded edit plots
    two = splatopt.fit([TEXT, "Compute the mean of a list of numbers."], n_splats=0.5, steps=2, device="cpu", progress=False)
    many = splatopt.edit(two, [TEXT.replace("list", "tuple"), "Compute the mean of the numbers."], steps=2, progress=False)
    back = splatopt.FitResult.load(many.save(tmp_path / "many.safetensors"))
    assert isinstance(back.edit, list) and len(back.edit) == 2
    for b in range(2):  # each prompt's start keeps its own capacity, not the padded one
        assert back.edit[b]["start_splats"].capacity == many.edit[b]["start_splats"].capacity
        assert torch.equal(back.edit[b]["start_splats"].mu, many.edit[b]["start_splats"].mu)
        assert back.edit[b]["transported"] == many.edit[b]["transported"]


def test_a_saved_edit_joined_with_a_plain_fit_keeps_the_edit_start_splats(tmp_path, model):
    # FitResult.cat of an edit result and a fit that is no edit gives records [record, None]: the
    # edit's start splats must survive save/load, not be dropped because the other prompt has none
    plain = splatopt.fit([TEXT], model, n_splats=0.5, steps=2, device="cpu", progress=False)
    edited = splatopt.edit(plain, TEXT.replace("list", "tuple"), steps=2, progress=False)
    both = splatopt.FitResult.cat([edited, plain])
    back = splatopt.FitResult.load(both.save(tmp_path / "both.safetensors"))
    assert back.edit[1] is None and back.config["edit"][1] is None
    assert torch.equal(back.edit[0]["start_splats"].mu, edited.edit["start_splats"].mu)
    assert back.edit[0] is not back.config["edit"][0]  # the records are the result's own, not the config's
    again = splatopt.FitResult.load(splatopt.FitResult.cat([plain, edited]).save(tmp_path / "again.safetensors"))
    assert again.edit[0] is None and torch.equal(again.edit[1]["start_splats"].v, edited.edit["start_splats"].v)


def test_an_edit_file_saved_without_start_splats_loads_its_records_and_refuses_to_plot_clearly(tmp_path, fitted):
    # files written before the start splats were saved hold config["edit"] alone: the records load,
    # and edit_trajectory_series says what is missing instead of raising KeyError('start_splats')
    from fixedpos.cache import read_safetensors, write_safetensors
    from splatopt.plot import edit_trajectory_series

    one = splatopt.edit(fitted, TEXT.replace("list", "tuple"), steps=2, progress=False)
    path = one.save(tmp_path / "edited.safetensors")
    tensors, header = read_safetensors(path)
    write_safetensors(path, {k: t for k, t in tensors.items() if not k.startswith("extra.edit_start.")}, header)
    back = splatopt.FitResult.load(path)
    assert back.edit == one.config["edit"] and back.edit is not back.config["edit"]
    with pytest.raises(ValueError, match="no start splats"):
        edit_trajectory_series(fitted, back)


def test_bad_edit_requests_raise_clear_errors(model, fitted):
    two = splatopt.fit([TEXT, "Another text here."], model, n_splats=0.5, steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="one-prompt"):
        splatopt.edit(two, "x y z", progress=False)
    with pytest.raises(ValueError, match="either new_text or edits"):
        splatopt.edit(fitted, progress=False)
    with pytest.raises(ValueError, match="overlap"):
        apply_char_edits(TEXT, [(0, 5, "a"), (3, 8, "b")])
    with pytest.raises(ValueError, match="outside"):
        apply_char_edits(TEXT, [(0, 500, "a")])
    with pytest.raises(ValueError, match="empty"):
        splatopt.edit(fitted, "   ", progress=False)


ids = st.lists(st.integers(0, 6), min_size=1, max_size=24)


@settings(max_examples=60, deadline=None)
@given(old=ids, new=ids, data=st.data())
def test_transport_keeps_splats_inside_the_new_text(old, new, data):
    n = data.draw(st.integers(1, len(old)))
    mu = torch.tensor(data.draw(st.lists(st.floats(-0.5, len(old) - 0.5), min_size=n, max_size=n)))
    sigma = torch.tensor(data.draw(st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n)))
    new_mu, new_sigma, deleted = transport(mu, sigma, edit_script(old, new))
    assert torch.isfinite(new_mu).all() and torch.isfinite(new_sigma).all()
    kept = ~deleted
    assert (new_mu[kept] >= -0.5 - 1e-5).all() and (new_mu[kept] <= len(new) - 0.5 + 1e-5).all()
    assert (new_sigma > 0).all()


def _edge_or_anywhere(n_old):
    """A splat centre of an n_old-token text: anywhere from a token left of it to a token right of it,
    often exactly on a token edge (t - 1/2), where the script's spans meet."""
    return st.one_of(st.floats(-1.5, n_old + 0.5, width=32), st.integers(-1, n_old).map(lambda t: t - 0.5))


@settings(max_examples=80, deadline=None)
@given(old=ids, new=ids, data=st.data())
def test_transport_is_the_piecewise_linear_map_of_the_edit_script(old, new, data):
    """Token t covers [t - 1/2, t + 1/2]; the old span [i1, i2) maps linearly onto the new [j1, j2):
    equal spans shift, replaced ones stretch (and their widths with them), deleted ones delete. A centre
    left or right of the old text belongs to its first or last token. Written out per splat here."""
    script = edit_script(old, new)
    rebuilt = []
    for tag, i1, i2, j1, j2 in script:
        if tag == "equal":
            assert old[i1:i2] == new[j1:j2]
        rebuilt += old[i1:i2] if tag == "equal" else new[j1:j2]
    assert rebuilt == new  # the script turns the old ids into the new ones
    n = data.draw(st.integers(1, 8))
    mu = torch.tensor(data.draw(st.lists(_edge_or_anywhere(len(old)), min_size=n, max_size=n)))
    sigma = torch.tensor(data.draw(st.lists(st.floats(0.125, 5.0, width=32), min_size=n, max_size=n)))
    new_mu, new_sigma, deleted = transport(mu, sigma, script)
    for k in range(n):
        m = float(mu[k])
        token = min(max(math.floor(m + 0.5), 0), len(old) - 1)  # the old token whose box holds the centre
        tag, i1, i2, j1, j2 = next(op for op in script if op[1] <= token < op[2])
        scale = (j2 - j1) / (i2 - i1)
        assert float(new_mu[k]) == pytest.approx((j1 - 0.5) + (m - (i1 - 0.5)) * scale, abs=1e-4), (m, tag, i1, i2, j1, j2)
        assert bool(deleted[k]) == (tag == "delete"), (m, tag)
        assert float(new_sigma[k]) == pytest.approx(float(sigma[k]) * (scale if tag == "replace" else 1.0), rel=1e-5), (m, tag)
    kept = (~deleted).nonzero().flatten()
    order = kept[mu[kept].argsort()]
    assert (new_mu[order].diff() >= -1e-5).all()  # the map keeps the splats' order


words = TEXT.split()


@settings(max_examples=12, deadline=None)
@given(op=st.sampled_from(["insert", "delete", "replace"]), pos=st.integers(0, len(words) - 1), k=st.integers(1, 4),
       filler=st.lists(st.sampled_from(["value", "the", "sorted", "key", "##", "result", "42"]), min_size=1, max_size=4))
def test_random_word_edits_never_give_nan_or_empty_sets(fitted, op, pos, k, filler):
    w = list(words)
    if op == "insert":
        w[pos:pos] = filler
    elif op == "delete":
        del w[pos : pos + k]
    else:
        w[pos : pos + k] = filler
    if not w:
        return
    result = splatopt.edit(fitted, " ".join(w), steps=0, progress=False)
    s = result.splats
    assert s.mask.any()
    assert torch.isfinite(s.mu[s.mask]).all() and torch.isfinite(s.v[s.mask]).all()
    assert torch.isfinite(result.field_error).all()


def test_cli_edit_re_fits_a_saved_run(tmp_path, fitted, capsys):
    from splatopt.cli import main

    path = fitted.save(tmp_path / "run.safetensors")
    plot = tmp_path / "edit.png"
    code = main(["edit", str(path), TEXT.replace("new", "sorted"), "--steps", "5", "--device", "cpu",
                 "--out", str(tmp_path / "edited.safetensors"), "--plot", str(plot), "--quiet"])
    assert code == 0 and plot.is_file() and (tmp_path / "edited.safetensors").is_file()
    assert "transported" in capsys.readouterr().out
    code = main(["edit", str(path), "sorted", "--steps", "2", "--device", "cpu", "--no-fresh-start", "--objective", "ce",
                 "--optimizer", '{"beta2": 0.9}', "--out", str(tmp_path / "ce.safetensors"), "--quiet"])
    chosen = splatopt.FitResult.load(tmp_path / "ce.safetensors")
    assert code == 0 and "kept the warm start, the only one tried" in capsys.readouterr().out
    assert chosen.config["objective"] == "1*ce" and chosen.config["optimizer"]["beta2"] == 0.9
    assert chosen.config["optimizer"] == {**fitted.config["optimizer"], "schedule": "constant", "beta2": 0.9}
    code = main(["edit", str(path), TEXT.replace("ascending", "descending"), "--steps", "2", "--device", "cpu", "--fresh-init",
                 "grid", "--choose", "objective", "--far-tolerance", "0.02", "--out", str(tmp_path / "g.safetensors"), "--quiet"])
    record = splatopt.FitResult.load(tmp_path / "g.safetensors").config["edit"]
    assert code == 0 and record["starts_tried"] == 2 and record["start_initializer"] in (None, "grid")
    code = main(["edit", str(path), TEXT.replace("ascending", "descending"), "--steps", "2", "--device", "cpu",
                 "--no-fresh-near", "--free", "--freeze-steps", "1", "--quiet"])
    assert code == 0 and "frozen for 1 step(s); kept the warm start, the only one tried" in capsys.readouterr().out


def test_cli_edit_says_the_changes_in_words_with_the_texts_they_touch(tmp_path, fitted, capsys):
    """The edit script was printed as difflib's opcodes ([['insert', 3, 3, 3, 4]]), which said nothing of
    what changed without difflib's manual; and "of 4" after the kept start read as a count of splats."""
    from splatopt.cli import main

    path = fitted.save(tmp_path / "run.safetensors")
    new = TEXT.replace("new", "sorted")
    assert main(["edit", str(path), new, "--steps", "2", "--device", "cpu", "--no-fresh-start", "--no-fresh-near", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "edit script: replace 'new' with 'sorted' (token 2 -> token 2)" in printed and "['replace'" not in printed
    assert "splats: transported " in printed and "kept the warm start, the only one tried" in printed
    from splatopt.cli import _describe_script

    assert _describe_script([["equal", 0, 2, 0, 2], ["insert", 2, 2, 2, 4], ["delete", 5, 6, 7, 7]]) == \
        "insert tokens 2-3 of the new text; delete token 5 of the old text"



def test_transport_takes_splats_at_the_old_end_when_the_script_ends_with_an_insertion():
    # delete [1, 2], keep [3, 4], append [5]: a splat on the old text's right edge (3.5) follows
    # token 4 to the new right edge of the kept span (1.5), it is not left beyond the new text
    script = edit_script([1, 2, 3, 4], [3, 4, 5])
    assert script[-1][0] == "insert"
    new_mu, _, deleted = transport(torch.tensor([3.5, -0.7]), torch.tensor([1.0, 1.0]), script)
    assert new_mu[0].item() == pytest.approx(1.5) and not deleted[0]
    assert deleted[1]  # drifted left of the text, into the deleted span


def test_batched_edit_equals_editing_each_prompt_alone(model):
    texts = [TEXT, "Compute the mean of the given numbers and return it."]
    both = splatopt.fit(texts, model, n_splats=0.5, steps=20, device="cpu", progress=False)
    new_texts = [TEXT.replace("ascending", "descending"), "Please compute the mean of the given numbers."]
    batched = splatopt.edit(both, new_texts, steps=4, progress=False)
    assert isinstance(batched.edit, list) and len(batched.edit) == 2 and batched.input_texts == new_texts
    for b in range(2):
        alone_fit = splatopt.fit([texts[b]], model, n_splats=0.5, steps=20, device="cpu", progress=False)
        alone = splatopt.edit(alone_fit, new_texts[b], steps=4, progress=False)
        assert batched.edit[b]["script"] == alone.edit["script"] and len(batched.edit[b]["spawned"]) == len(alone.edit["spawned"])
        torch.testing.assert_close(batched.field_error[b], alone.field_error[0], rtol=1e-3, atol=1e-5)
    by_edits = splatopt.edit(both, edits=[[(0, 6, "Give")], []], steps=0, progress=False)
    assert by_edits.input_texts == ["Give" + TEXT[6:], texts[1]]
    with pytest.raises(ValueError, match="one new text per prompt"):
        splatopt.edit(both, new_texts[:1], progress=False)
    with pytest.raises(ValueError, match="select one first"):
        splatopt.edit(both, new_texts[0], progress=False)


@pytest.mark.cuda
def test_batched_edit_on_cuda_matches_cpu(model):
    texts = [TEXT, "Compute the mean of the given numbers and return it."]
    new_texts = [TEXT.replace("ascending", "descending"), "Please compute the mean of the given numbers."]
    results = {}
    # the reference cross-entropy on both devices: the CUDA default (chunked, bf16 products) is
    # another path with its own tests, and 60 steps of it drift by about a point from fp32
    for device in ("cpu", "cuda"):
        fitted = splatopt.fit(texts, model, n_splats=0.5, steps=40, device=device, progress=False, fused_ce=False)
        # the free re-fit (frozen for 5 steps) from the warm start alone: second starts are chosen by a
        # discrete rule, which may tip either way on a near tie between devices
        results[device] = splatopt.edit(fitted, new_texts, steps=20, freeze_steps=5, local=False, fresh_start=False,
                                        fresh_near=False, progress=False, fused_ce=False)
    assert results["cuda"].splats.mu.device.type == "cuda"
    torch.testing.assert_close(results["cuda"].field_error.cpu(), results["cpu"].field_error, rtol=2e-3, atol=1e-4)
    assert [r["script"] for r in results["cuda"].edit] == [r["script"] for r in results["cpu"].edit]


def test_the_re_fit_defaults_to_the_old_optimizer_with_a_constant_schedule(fitted):
    result = splatopt.edit(fitted, TEXT.replace("new", "fresh"), steps=0, progress=False)
    assert result.config["optimizer"] == {**fitted.config["optimizer"], "schedule": "constant"}
    chosen = splatopt.edit(fitted, TEXT.replace("new", "fresh"), steps=0, progress=False,
                           optimizer=splatopt.InnerOptimizer(lr_v=0.3))
    assert chosen.config["optimizer"]["schedule"] == "cosine" and chosen.config["optimizer"]["lr_v"] == 0.3


def test_a_text_the_edit_touches_everywhere_keeps_the_better_of_the_warm_and_a_fresh_start(model, fitted):
    """With no splat far from the edit, edit() also re-fits from the cold fit's grid start in the same
    batch and (choose="objective") keeps the start whose final objective is lower; without
    fresh_near, a prompt with far splats never restarts."""
    short, opt = "Return a new iterable", splatopt.InnerOptimizer(schedule="constant")
    grid_only = dict(fresh_init="grid", fresh_near=False, choose="objective", optimizer=opt, progress=False)
    warm = splatopt.edit(fitted, short, steps=6, fresh_start=False, progress=False, optimizer=opt)
    assert not warm.edit["far_from_edit"] and warm.edit["start"] == "warm" and warm.edit["starts_tried"] == 1
    cold = splatopt.fit([short], model, n_splats=int(warm.splats.counts[0]), steps=6, device="cpu", progress=False, optimizer=opt)
    both = splatopt.edit(fitted, short, steps=6, **grid_only)
    losses = {"warm": float(warm.history["loss"][-1, 0]), "fresh": float(cold.history["loss"][-1, 0])}
    assert both.edit["start"] == min(losses, key=losses.get) and both.edit["starts_tried"] == 2
    assert float(both.history["loss"][-1, 0]) == pytest.approx(min(losses.values()), rel=1e-4)
    assert both.splats.batch_size == 1 and both.input_texts == [short] and both.history["loss"].shape[1] == 1
    if both.edit["start"] == "fresh":
        assert both.edit["transported"] == [] and len(both.edit["spawned"]) == int(both.splats.counts[0])
        assert both.edit["start_initializer"] == "grid"
    far_edit = splatopt.edit(fitted, TEXT.replace("ascending", "descending"), steps=2, **grid_only)
    assert far_edit.edit["far_from_edit"] and far_edit.edit["start"] == "warm" and far_edit.edit["starts_tried"] == 1
    # the record said frozen_steps = 6 for a re-fit that held no far splat to freeze
    assert both.edit["frozen_steps"] == 0 and far_edit.edit["frozen_steps"] == 2


def test_the_kept_start_is_the_most_accurate_one_tried(model):
    """choose="accuracy": each prompt keeps the start with the highest final token accuracy (ties:
    the lower objective); every start is re-fitted as it would be alone, so the kept accuracy is
    the best of the warm start's and the second starts' (here: grid and learned)."""
    texts = [TEXT, "Compute the mean of the given numbers and return it as a float."]
    old = splatopt.fit(texts, model, n_splats=0.25, steps=30, device="cpu", progress=False)
    new_texts = [TEXT.replace("all items from the", "the"), "Compute the mean."]
    common = dict(steps=8, progress=False, fresh_init=["learned", "grid"], choose="accuracy")
    warm_only = splatopt.edit(old, new_texts, fresh_start=False, fresh_near=False, **common)
    best = splatopt.edit(old, new_texts, **common)
    for b in range(2):
        tried = best.edit[b]["starts_tried"]
        has_far = bool(best.edit[b]["far_from_edit"])
        assert tried == (4 if has_far else 3)  # warm, a fresh(-near) start per initializer, warm-learned with far splats
        assert float(best.token_accuracy[b]) >= float(warm_only.token_accuracy[b]) - 1e-6
        if best.edit[b]["start"] != "warm":
            assert best.edit[b]["start_initializer"] in ("learned", "grid")
        if has_far:  # whatever start won, the far splats kept their embeddings and places
            far = best.edit[b]["far_from_edit"]
            torch.testing.assert_close(best.splats.v[b, far], best.edit[b]["start_splats"].v[0, far])
            torch.testing.assert_close(best.splats.mu[b, far], best.edit[b]["start_splats"].mu[0, far])
    with pytest.raises(ValueError, match="choose="):
        splatopt.edit(old, new_texts, choose="loss", progress=False)


def test_a_fresh_near_start_keeps_the_far_splats_and_re_proposes_the_near_ones_between_them():
    """The far slots are untouched; the near ones form a grid between the far centres whose
    embeddings fit what the far splats leave; prompts batched together get what each gets alone."""
    from splatopt.edit import _fresh_near
    from splatopt.init import GridInit
    from splatopt.splats import SplatSet

    torch.manual_seed(0)
    L, d = 20, 6
    mu = torch.tensor([[1.0, 6.0, 9.0, 12.0, 18.0]])
    warm = SplatSet(mu, torch.zeros(1, 5), torch.zeros(1, 5), torch.randn(1, 5, d), torch.ones(1, 5, dtype=torch.bool))
    far = torch.tensor([True, False, False, False, True])
    other = SplatSet(torch.tensor([[0.5, 3.0, 7.0]]), torch.zeros(1, 3), torch.zeros(1, 3), torch.randn(1, 3, d),
                     torch.ones(1, 3, dtype=torch.bool))
    other_far = torch.tensor([False, False, True])
    target, mask = torch.randn(2, L, d), torch.ones(2, L, dtype=torch.bool)
    mask[1, 9:] = False
    start, other_start = _fresh_near([warm, other], [far, other_far], target, mask, "gaussian", "additive", GridInit())
    for name, t in warm.params().items():  # far slots: untouched
        torch.testing.assert_close(start.params()[name][0, far], t[0, far])
    near_mu = start.mu[0, ~far]
    assert (near_mu > 1.0).all() and (near_mu < 18.0).all()  # between the far centres
    assert torch.allclose(near_mu.diff(), near_mu.diff()[0].expand(2))  # a grid: evenly spaced
    # the near embeddings fit what the far splats leave: the error is below the far splats' alone
    far_only = SplatSet(warm.mu, warm.log_sigma, warm.weight_logit, warm.v, far[None])
    assert (target[:1] - render(start, L)).square().sum() < (target[:1] - render(far_only, L)).square().sum()
    assert (other_start.mu[0, ~other_far] < 7.0).all()  # left of the far splat, inside the 9-token text
    (alone,) = _fresh_near([other], [other_far], target[1:, :9], mask[1:, :9], "gaussian", "additive", GridInit())
    for name, t in alone.params().items():
        torch.testing.assert_close(other_start.params()[name], t, rtol=1e-3, atol=1e-3)  # batched float32 solves


def test_random_second_starts_come_from_the_edits_seed_not_the_global_random_state(model, fitted):
    """A jittered grid's second starts are drawn from a generator seeded by the fit's seed: an edit
    repeats exactly, and leaves the caller's random state alone (it used to draw from it)."""
    from splatopt.edit import _fresh_near
    from splatopt.init import GridInit
    from splatopt.splats import SplatSet

    warm = SplatSet(torch.tensor([[1.0, 6.0, 9.0, 12.0, 18.0]]), torch.zeros(1, 5), torch.zeros(1, 5), torch.randn(1, 5, 4),
                    torch.ones(1, 5, dtype=torch.bool))
    far, target, mask = torch.tensor([True, False, False, False, True]), torch.randn(1, 20, 4), torch.ones(1, 20, dtype=torch.bool)
    starts = [_fresh_near([warm], [far], target, mask, "gaussian", "additive", GridInit(jitter=0.9), torch.Generator().manual_seed(s))[0]
              for s in (0, 0, 1)]
    assert torch.equal(starts[0].mu, starts[1].mu) and not torch.equal(starts[0].mu, starts[2].mu)
    options = dict(model=model, steps=2, progress=False, fresh_init={"name": "grid", "jitter": 0.9})
    state = torch.get_rng_state()
    once = splatopt.edit(fitted, "Return the mean of all the numbers.", **options)
    assert torch.equal(torch.get_rng_state(), state)
    again = splatopt.edit(fitted, "Return the mean of all the numbers.", **options)
    assert torch.equal(once.splats.mu, again.splats.mu) and once.edit["start"] == again.edit["start"]


def test_selecting_prompts_of_a_result_takes_every_per_prompt_field_along(model):
    texts = ["Compute the mean of the numbers.", "Return a new list containing all items from the iterable."]
    result = splatopt.fit(texts, model, n_splats=0.5, steps=3, device="cpu", progress=False)
    swapped = result.select([1, 0])
    assert swapped.input_texts == texts[::-1] and swapped.texts == result.texts[::-1]
    torch.testing.assert_close(swapped.token_accuracy, result.token_accuracy.flip(0))
    torch.testing.assert_close(swapped.splats.v, result.splats.v.flip(0))
    torch.testing.assert_close(swapped.history["loss"], result.history["loss"].flip(1))
    torch.testing.assert_close(swapped.trajectory["mu"], result.trajectory["mu"].flip(1), equal_nan=True)
    assert torch.equal(swapped.history["step"], result.history["step"]) and torch.equal(swapped.ids, result.ids.flip(0))
    with pytest.raises(IndexError, match="prompts 0..1"):
        result.select([2])


def test_far_splats_within_a_tolerance_keep_their_embeddings_to_that_fraction(fitted):
    """far_tolerance: the far splats' embeddings re-fit, each within that fraction of its norm, and
    they neither move nor resize; the warm and fresh-near starts both honour it."""
    result = splatopt.edit(fitted, TEXT.replace("ascending", "descending"), steps=10, far_tolerance=0.04,
                           fresh_init="grid", progress=False)
    far = result.edit["far_from_edit"]
    assert far and result.edit["start"] in ("warm", "fresh-near")
    warm = result.edit["start_splats"]
    change = (result.splats.v[0, far] - warm.v[0, far]).norm(dim=-1) / warm.v[0, far].norm(dim=-1)
    assert (change <= 0.04 + 1e-5).all() and (change > 0).any()
    torch.testing.assert_close(result.splats.mu[0, far], warm.mu[0, far])
    torch.testing.assert_close(result.splats.log_sigma[0, far], warm.log_sigma[0, far])


def test_choose_starts_keeps_the_most_accurate_start_and_never_a_non_finite_objective():
    from splatopt.edit import choose_starts

    rows = [0, 1, 0, 1, 0]  # warm starts of prompts 0 and 1, then second starts
    loss = torch.tensor([1.0, 2.0, 0.5, 1.5, float("nan")])
    accuracy = torch.tensor([0.9, 0.8, 0.8, 0.8, 1.0])
    assert choose_starts(rows, loss, accuracy) == [0, 3]  # prompt 0: accuracy first; prompt 1: tie -> lower objective
    assert choose_starts(rows, loss, None) == [2, 3]  # by the objective alone
    assert choose_starts([0, 0], torch.tensor([float("inf"), 3.0]), torch.tensor([1.0, 0.0])) == [1]
    assert choose_starts([0, 1], loss[:2], accuracy[:2]) == [0, 1]


def test_second_starts_are_tried_only_where_they_can_differ_and_records_match_the_kept_start(model, fitted):
    """An unchanged text (far splats, no near one) keeps its warm start alone; for every prompt the
    record's transported and spawned slots are exactly the kept start's active ones."""
    texts = [TEXT, TEXT]
    both = splatopt.fit(texts, model, n_splats=0.5, steps=20, device="cpu", progress=False)
    result = splatopt.edit(both, [TEXT, TEXT.replace("ascending", "descending")], steps=3, fresh_init="grid", progress=False)
    unchanged, edited = result.edit
    assert unchanged["starts_tried"] == 1 and unchanged["start"] == "warm"
    assert edited["starts_tried"] == 2 and edited["refit_optimizer"]["schedule"] == "constant"
    for record in result.edit:
        active = set(torch.nonzero(record["start_splats"].mask[0]).flatten().tolist())
        assert set(record["transported"]) | set(record["spawned"]) == active
        assert not set(record["transported"]) & set(record["spawned"])


def test_auto_second_starts_fall_back_to_the_grid_without_a_matching_learned_initializer(model):
    from types import SimpleNamespace

    from splatopt.edit import _second_start_initializers

    names = lambda m: [name for name, _ in _second_start_initializers("auto", m, "cpu")]  # noqa: E731
    assert names(model) == ["learned", "grid"]
    assert names(SimpleNamespace(name=model.name, layer=model.layer, model_hash="0" * 64)) == ["grid"]  # other weights
    assert names(SimpleNamespace(name=model.name, layer=5, model_hash=model.model_hash)) == ["grid"]  # none shipped


def test_far_splats_that_may_move_only_translate(fitted):
    result = splatopt.edit(fitted, TEXT.replace("ascending", "descending"), steps=6, far_moves=True,
                           fresh_start=False, fresh_near=False, progress=False)
    far, start = result.edit["far_from_edit"], result.edit["start_splats"]
    assert far and not torch.equal(result.splats.mu[0, far], start.mu[0, far])
    for name in ("v", "log_sigma", "weight_logit"):
        torch.testing.assert_close(getattr(result.splats, name)[0, far], getattr(start, name)[0, far])


def test_freeze_steps_with_the_default_local_re_fit_is_refused(fitted):
    with pytest.raises(ValueError, match="local=False"):
        splatopt.edit(fitted, TEXT.replace("new", "fresh"), freeze_steps=5, progress=False)


def test_one_prompt_edits_concatenate_into_one_record_per_prompt(fitted):
    a = splatopt.edit(fitted, TEXT.replace("new", "fresh"), steps=0, progress=False)
    b = splatopt.edit(fitted, TEXT.replace("list", "tuple"), steps=0, progress=False)
    both = splatopt.FitResult.cat([a, b])
    assert [r["script"] for r in both.edit] == [a.edit["script"], b.edit["script"]]
    assert both.select([1]).edit[0]["script"] == b.edit["script"]
    assert [r["script"] for r in both.config["edit"]] == [a.edit["script"], b.edit["script"]]


@pytest.mark.cuda
def test_default_edit_with_second_starts_runs_on_cuda(model):
    """The default path on CUDA: the learned initializer's own fit, fresh-near starts, FitResult.cat
    of CUDA results; far splats keep their embeddings and places, and the records match the kept starts."""
    texts = [TEXT, "Compute the mean of the given numbers and return it as a float."]
    old = splatopt.fit(texts, model, n_splats=0.25, steps=20, device="cuda", progress=False)
    result = splatopt.edit(old, [TEXT.replace("all items from the", "the"), "Compute the mean."], steps=6, progress=False)
    assert result.splats.mu.device.type == "cuda" and torch.isfinite(result.field_error).all()
    for b, record in enumerate(result.edit):
        assert record["starts_tried"] >= 2
        far, start = record["far_from_edit"], record["start_splats"]
        torch.testing.assert_close(result.splats.v[b, far].cpu(), start.v[0, far])
        torch.testing.assert_close(result.splats.mu[b, far].cpu(), start.mu[0, far])
        active = set(torch.nonzero(start.mask[0]).flatten().tolist())
        assert set(record["transported"]) | set(record["spawned"]) == active


def test_learned_starts_re_fit_with_the_picked_optimizer_unless_told_otherwise(model, fitted, monkeypatch):
    """learned_optimizer: "picked" (default) re-fits the learned initializer's starts with the
    optimizer that ships beside it; "meta-trained" with the one it was meta-trained with; a dict
    overrides fields of that one; the warm starts keep the old fit's optimizer whatever it says."""
    import sys

    from splatopt.learned import load_learned

    edit_module = sys.modules["splatopt.edit"]  # the module; splatopt.edit is the function
    learned = load_learned(model)
    assert learned.picked_optimizer is not None and learned.picked_optimizer.metric == "fisher"
    seen = []
    real_fit = edit_module.fit
    monkeypatch.setattr(edit_module, "fit", lambda *a, **k: seen.append(k["optimizer"]) or real_fit(*a, **k))
    new_text = TEXT.replace("ascending", "descending")
    expected = {
        "picked": learned.picked_optimizer,
        "meta-trained": learned.inner_optimizer(),
        "override": splatopt.InnerOptimizer(**{**learned.inner_optimizer().to_dict(), "beta1": 0.5}),
    }
    for name, want in expected.items():
        seen.clear()
        option = {"beta1": 0.5} if name == "override" else name
        splatopt.edit(fitted, new_text, steps=1, fresh_init="learned", learned_optimizer=option, progress=False)
        assert len(seen) == 2, "one re-fit for the warm start, one for the learned initializer's starts"
        assert seen[0].metric == "identity" and seen[0].schedule == "constant"  # the old fit's, constant
        assert seen[1] == want, name


def test_a_bad_learned_optimizer_is_refused_before_any_work(fitted):
    for bad, match in [("fisher", "learned_optimizer=.fisher."), ({"lr": 1.0}, "unknown InnerOptimizer fields"), ({"beta1": 1.5}, "beta1=1.5"),
                       (3, "learned_optimizer=3")]:
        with pytest.raises(ValueError, match=match):
            splatopt.edit(fitted, TEXT + " Now.", steps=1, fresh_init="grid", learned_optimizer=bad, progress=False)


def test_the_shipped_picked_optimizer_is_the_one_the_selection_picked():
    """The JSON beside the initializer and the test studies that measured the pick agree field by field."""
    import tomllib
    from pathlib import Path

    from splatopt.learned import load_picked_optimizer, picked_optimizer_path

    picked = load_picked_optimizer(picked_optimizer_path("minilm-l6", 2))
    study = tomllib.loads((Path(__file__).parents[1] / "figures/studies/learned_metric_test.toml").read_text())
    (method,) = study["factors"]["method"].values()
    assert method["init"] == "learned"
    assert picked == splatopt.InnerOptimizer(**method["optimizer"])


def test_a_corrupt_picked_optimizer_file_gives_an_error_naming_it(tmp_path):
    from splatopt.learned import load_picked_optimizer

    cases = {"garbled.json": ("{not json", "not a readable"), "format.json": ('{"format": 2, "optimizer": {}}', "format 1"),
             "field.json": ('{"format": 1, "optimizer": {"lr": 1}}', "unknown InnerOptimizer fields"),
             "value.json": ('{"format": 1, "optimizer": {"beta1": 1.5}}', "beta1=1.5")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match) as err:
            load_picked_optimizer(tmp_path / name)
        assert name in str(err.value)


@pytest.mark.parametrize("new_text", [
    "Return a new list containing all of the many items from the iterable in ascending order.",  # insertion
    "Return a fresh sorted copy containing all items from the iterable in ascending order.",  # replacement
    "Return a new list containing all items in ascending order.",  # deletion
])
def test_the_re_fit_holds_as_many_splats_as_a_cold_fit_of_the_new_text(model, fitted, new_text):
    """hold_budget (default): round(density * L_new) splats, a cold fit's count at the old fit's
    fraction; the splats pruned to get there are the least weighted near the edit, never a far one
    while a near one is left, and the far splats keep their embeddings. hold_budget=False may
    keep more (an insertion keeps every old splat and spawns one)."""
    held = splatopt.edit(fitted, new_text, steps=0, fresh_start=False, fresh_near=False, progress=False)
    L_new = int(held.mask.sum())
    budget = round(fitted.config["n_splats"] * L_new)
    assert held.edit["budget"] == budget and held.edit["splats"] == budget == int(held.splats.counts[0])
    cold = splatopt.fit([new_text], model, n_splats=fitted.config["n_splats"], steps=0, device="cpu", progress=False)
    assert int(cold.splats.counts[0]) == budget
    assert held.edit["far_pruned_for_budget"] == 0
    loose = splatopt.edit(fitted, new_text, steps=0, fresh_start=False, fresh_near=False, hold_budget=False, progress=False)
    assert loose.edit["splats"] >= budget
    extra = set(held.edit["pruned"]) - set(loose.edit["pruned"])  # pruned only to hold the budget
    assert len(extra) == loose.edit["splats"] - budget
    if extra:
        w = fitted.splats.weight_logit[0]
        near_kept = [i for i in held.edit["transported"] if i not in held.edit["far_from_edit"]]
        assert not extra & set(loose.edit["far_from_edit"])
        assert not near_kept or max(w[list(extra)]) <= min(w[near_kept])
    far = held.edit["far_from_edit"]
    torch.testing.assert_close(held.edit["start_splats"].v[0, far], fitted.splats.v[0, far])


def test_spawned_splats_give_way_before_a_far_splat_is_pruned_for_the_budget():
    """Six one-token insertions at a low density: each span would spawn a splat, more than the
    budget leaves beside the far splats; the spawned ones give way (the near splats then cover
    the inserted tokens), no far splat is pruned, and the count is the cold fit's."""
    from splatopt.edit import _warm_start
    from splatopt.splats import SplatSet

    torch.manual_seed(0)
    L, d = 40, 4
    mu = torch.arange(2.0, 40.0, 4.0)[None]  # 10 narrow splats
    old = SplatSet(mu, torch.full_like(mu, math.log(0.4)), torch.zeros_like(mu), torch.randn(1, 10, d), torch.ones(1, 10, dtype=torch.bool))
    old_ids = list(range(100, 100 + L))
    new_ids = list(old_ids)
    for at in (22, 18, 14, 10, 6, 2):  # beside the first six splats, right to left so the positions hold
        new_ids.insert(at, 7)
    target = torch.randn(1, len(new_ids), d)
    warm, far, record = _warm_start(old, old_ids, new_ids, target, "gaussian", "additive", 3.0, 0.1)
    assert record["budget"] == 5 == record["splats"] == int(warm.counts[0])  # round(0.1 * 46)
    assert record["far_pruned_for_budget"] == 0 and int(far.sum()) == 4  # the four splats past the insertions
    kept_far = torch.nonzero(far[0] if far.dim() == 2 else far).flatten()
    torch.testing.assert_close(warm.v[0, kept_far], old.v[0, kept_far])
    loose_warm, _, loose = _warm_start(old, old_ids, new_ids, target, "gaussian", "additive", 3.0, 0.1, hold_budget=False)
    assert loose["splats"] == 16 and loose["budget"] == 5  # every old splat and one per inserted span


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_splats=4), r"edit sets \['n_splats'\] itself"),
    (dict(init="grid"), r"edit sets \['init'\] itself"),
    (dict(spawn_density=0.0), "spawn_density=0.0"),
    (dict(spawn_density=math.inf), "spawn_density=inf"),
    (dict(freeze_sigma=-1.0), "freeze_sigma=-1.0"),
    (dict(varpro=True), "pass fresh_start=False and fresh_near=False"),
    (dict(density="budget"), "pass fresh_start=False and fresh_near=False"),
])
def test_bad_edit_options_are_refused_before_any_refit(fitted, monkeypatch, kwargs, message):
    import importlib

    edit_module = importlib.import_module("splatopt.edit")  # splatopt.edit is also the function's name
    monkeypatch.setattr(edit_module, "fit", lambda *a, **k: pytest.fail("re-fitted before checking the options"))
    with pytest.raises(ValueError, match=message):
        splatopt.edit(fitted, TEXT.replace("new", "fresh"), steps=2, progress=False, **kwargs)


def test_an_edit_of_splats_of_another_width_and_a_bad_fresh_init_name_their_argument(fitted, monkeypatch):
    """A fit file whose embeddings are not the model's width (damaged, or another model's without a hash)
    failed at the warm start with torch's "The size of tensor a (384) must match ...", and an unknown
    fresh_init was reported as init='nope', an argument edit does not have."""
    from dataclasses import replace

    import importlib

    edit_module = importlib.import_module("splatopt.edit")
    monkeypatch.setattr(edit_module, "fit", lambda *a, **k: pytest.fail("re-fitted before checking the input"))
    narrow = replace(fitted, splats=fitted.splats.with_params({"v": fitted.splats.v[..., :10]}))
    with pytest.raises(ValueError, match=r"embeddings of width d=10, but minilm-l6 has d=384"):
        splatopt.edit(narrow, TEXT.replace("new", "fresh"), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"fresh_init='nope': init='nope': choose one of"):
        splatopt.edit(fitted, TEXT.replace("new", "fresh"), steps=2, fresh_init="nope", progress=False)


@pytest.fixture(scope="module")
def fitted_two(model):
    return splatopt.fit([TEXT, "Sort the list in place."], model, n_splats=0.5, steps=10, device="cpu", progress=False)


def test_cli_edit_of_a_fit_of_several_prompts_takes_prompt_or_a_file_of_texts(tmp_path, fitted_two, capsys, monkeypatch):
    """The CLI answered "select one first, or give one new text per prompt as a list", which only Python can do."""
    from splatopt.cli import main

    path = fitted_two.save(tmp_path / "two.safetensors")
    fast = ["--steps", "2", "--device", "cpu", "--quiet", "--no-fresh-start", "--no-fresh-near"]
    texts = tmp_path / "new.txt"
    with monkeypatch.context() as patch:  # every refusal comes before any re-fit
        patch.setattr(splatopt, "edit", lambda *a, **k: pytest.fail("re-fitted before checking the texts"))
        for argv, message in [
            ([str(path), "Sort the list."], f"{path} holds 2 prompts: give --prompt K (0..1) to edit prompt K alone with TEXT"),
            ([str(path), "Sort the list.", "--prompt", "2"], f"--prompt 2: {path} holds prompts 0..1"),
            ([str(path), "--file", str(texts)], f"--file {texts} holds 1 texts, but {path} holds 2 prompts"),
            ([str(path), "Sort the list.", "--file", str(texts)], "leave out TEXT and --prompt"),
            ([str(path)], "give the edited text (TEXT), or --file"),
        ]:
            texts.write_text("Sort the list.\n")
            assert main(["edit", *argv, *fast]) == 2
            assert message in capsys.readouterr().err
    # --prompt K: that prompt alone, its text replaced
    assert main(["edit", str(path), "Sort the list.", "--prompt", "1", *fast, "--out", str(tmp_path / "one.safetensors")]) == 0
    assert capsys.readouterr().out.count("edit script:") == 1
    one = splatopt.FitResult.load(tmp_path / "one.safetensors")
    assert one.input_texts == ["Sort the list."] and one.config["edit"]["old_text"] == "Sort the list in place."
    # --file: one new text per prompt, in one batch
    texts.write_text(TEXT.replace("new", "sorted") + "\nSort the list.\n")
    assert main(["edit", str(path), "--file", str(texts), *fast, "--out", str(tmp_path / "both.safetensors")]) == 0
    assert capsys.readouterr().out.count("edit script:") == 2
    both = splatopt.FitResult.load(tmp_path / "both.safetensors")
    assert both.input_texts == [TEXT.replace("new", "sorted"), "Sort the list."]
    assert [r["old_text"] for r in both.config["edit"]] == [TEXT, "Sort the list in place."]


def test_edit_of_a_local_encoder_fit_without_its_model_names_the_option(tmp_path, fitted, capsys, monkeypatch):
    """A fit keeps only a local encoder folder's name: edit without --model said "model 'myenc' is neither
    'minilm-l6' nor a local Hugging Face folder", not that the fit used that encoder nor how to pass it."""
    from dataclasses import replace

    from splatopt.cli import main

    local = replace(fitted, config={**fitted.config, "model": "myenc"})
    path = local.save(tmp_path / "run.safetensors")
    monkeypatch.chdir(tmp_path)  # no folder myenc/ here
    assert main(["edit", str(path), "New text.", "--steps", "1", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was fitted with the local encoder named 'myenc'" in err and "pass --model PATH, the encoder folder" in err
    with pytest.raises(ValueError, match=r"local encoder named 'myenc'.*pass model=fixedpos.load\(PATH, layer=2\)"):
        splatopt.edit(local, "New text.", steps=1, progress=False)


def test_cli_edit_names_fresh_init_for_an_unknown_initializer(tmp_path, fitted, capsys, monkeypatch):
    """It answered "init='gird': choose one of ...", naming no option of the command."""
    from splatopt.cli import main

    monkeypatch.setattr(splatopt, "edit", lambda *a, **k: pytest.fail("re-fitted before checking --fresh-init"))
    path = fitted.save(tmp_path / "run.safetensors")
    for value in ("gird", "learned,gird", "grid,"):
        assert main(["edit", str(path), "New text.", "--fresh-init", value, "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"splatopt: error: --fresh-init {value}: " in err and "grid, tokens, learned" in err


def test_a_float64_fit_is_re_fitted_in_float64_unless_told(model):
    """edit takes the old fit's device, objective, kernel and mode: its precision too (it re-fitted in float32)."""
    old = splatopt.fit(["Return the sum of a and b."], model, n_splats=0.5, steps=2, dtype=torch.float64, device="cpu",
                       progress=False)
    new = splatopt.edit(old, "Return the sum of a and c.", steps=2, fresh_init="grid", progress=False)
    assert new.splats.mu.dtype == new.splats.v.dtype == torch.float64 and new.config["dtype"] == "float64"
    told = splatopt.edit(old, "Return the sum of a and c.", steps=2, fresh_init="grid", progress=False, dtype=torch.float32)
    assert told.splats.mu.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        splatopt.edit(old, "Return the sum of a and c.", steps=2, progress=False, dtype=torch.float16)


def test_normalized_edits_solve_spawned_and_learned_embeddings_for_the_normalized_render(model):
    """Spawned splats' embeddings were solved for the additive sum whatever the fit rendered with, so
    in normalized mode the warm start rendered the inserted span worse than a zero field (per-token
    relative error up to 1.4); the learned second start's did the same (field error 4-6)."""
    text = ("Return a new list containing all items from the iterable in ascending order. A custom key "
            "function can be supplied to customize the sort order.")
    new = text.replace("ascending order.", "ascending order, ignoring case and accents entirely.")
    old = splatopt.fit([text], model, n_splats=0.25, mode="normalized", steps=30, device="cpu", progress=False)
    warm = splatopt.edit(old, new, steps=0, fresh_start=False, fresh_near=False, device="cpu", progress=False)
    target = model.encode(model.tokenize([new]))
    field = render(warm.splats, target.shape[1], mode="normalized")
    spawned = warm.splats.mu[0, warm.edit["spawned"]]
    span = slice(int(spawned.min().floor()), int(spawned.max().ceil()) + 1)
    error = (field[0, span] - target[0, span]).pow(2).sum(-1) / target[0, span].pow(2).sum(-1)
    assert float(error.max()) < 0.8, error
    learned = splatopt.edit(old, new, steps=0, fresh_init=["learned"], choose="objective", device="cpu", progress=False)
    assert float(learned.field_error.max()) < 1.5


def test_chained_edits_hold_the_original_fits_budget(model):
    """An edit re-fits with per-prompt counts; the next edit recomputed the density from them and
    drifted (15 splats where a cold fit of the text has 16)."""
    text = ("Return a new list containing all items from the iterable in ascending order. A custom key "
            "function can be supplied to customize the sort order.")
    opts = dict(steps=1, device="cpu", progress=False)
    result = splatopt.fit([text], model, n_splats=0.25, steps=2, device="cpu", progress=False)
    for extra in (" It is stable.", " Use key=len to sort by length.", " Done now ok."):
        result = splatopt.edit(result, result.input_texts[0] + extra, **opts)
        L = int(result.mask.sum())
        assert result.edit["budget"] == int(torch.tensor(L * 0.25).round().clamp(min=1))
        assert result.config["budget_fraction"] == 0.25


def test_edit_of_something_other_than_a_fit_result_is_a_type_error_naming_it(fitted):
    """Passing result.splats (or anything not a FitResult) failed as "'SplatSet' object has no attribute 'splats'"."""
    with pytest.raises(TypeError, match="edit takes a FitResult or the path of a saved one, not SplatSet: a SplatSet holds no text"):
        splatopt.edit(fitted.splats, "x", progress=False)
    with pytest.raises(TypeError, match="not NoneType"):
        splatopt.edit(None, "x", progress=False)


def test_an_edit_result_times_every_start_it_re_fitted(fitted, monkeypatch):
    """The re-fit keeps one start per prompt (FitResult.select), and select gives a part its share of the
    time: the edit's seconds must still be those of every start re-fitted (the docstring's promise), not
    the kept start's share."""
    import sys
    from dataclasses import replace

    edit_module = sys.modules["splatopt.edit"]
    real_fit, timed = edit_module.fit, []
    monkeypatch.setattr(edit_module, "fit", lambda *a, **k: timed.append(replace(real_fit(*a, **k), seconds=10.0)) or timed[-1])
    result = splatopt.edit(fitted, TEXT.replace("ascending", "descending"), steps=1, fresh_init="learned", progress=False)
    assert len(timed) == 2 and result.edit["starts_tried"] > 1
    assert result.seconds == pytest.approx(20.0)


def test_an_edits_progress_bars_say_which_re_fit_runs(fitted, monkeypatch):
    """The re-fits' bars were labelled "fit", as any fit's: a user watching an edit could not tell that an
    edit ran, nor the warm starts' re-fit from the learned starts' one after it."""
    import tqdm.auto

    from splatopt.fit import check_options

    real_tqdm, bars = tqdm.auto.tqdm, []
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: bars.append(k.get("desc")) or real_tqdm(*a, **k))
    new_text = TEXT.replace("ascending", "descending")
    splatopt.edit(fitted, new_text, steps=1, fresh_init="learned")
    fits = [b for b in bars if b and "fit" in b]
    assert fits == ["edit: re-fit 1/2 (warm starts)", "edit: re-fit 2/2 (learned starts)"]
    bars.clear()
    splatopt.edit(fitted, new_text, steps=1, fresh_init="grid")
    assert [b for b in bars if b and "fit" in b] == ["edit: re-fit (warm + grid starts)"]
    with pytest.raises(ValueError, match="progress='': give True"):
        check_options(progress="")


def test_a_prompts_random_second_starts_do_not_depend_on_the_prompts_edited_beside_it(model, monkeypatch):
    """A jittered grid's second starts came from one generator for the whole batch (on the device): a
    prompt edited beside another got other starts, so another result, than the same prompt edited alone."""
    import sys

    edit_module = sys.modules["splatopt.edit"]
    # prompt 0 keeps its far splats (its near ones get fresh-near starts); prompt 1 is rewritten whole (a
    # fresh start), and a batch's generator drew for it first
    old = splatopt.fit(["Open a file and return a stream object for it, or raise an error.", "Return the sum of a and b."],
                       model, n_splats=0.5, steps=3, device="cpu", progress=False)
    new = ["Open a file and return a stream object for it, or raise a warning.", "Close every open handle first."]
    starts: list[list] = []
    real_fit = edit_module.fit

    def spy(texts, *args, init=None, **kwargs):  # the starts each re-fit gets, row by row
        starts.append([(text, init.splats.select([i])) for i, text in enumerate(texts)])
        return real_fit(texts, *args, init=init, **kwargs)

    monkeypatch.setattr(edit_module, "fit", spy)
    options = dict(model=model, steps=0, progress=False, fresh_init={"name": "grid", "jitter": 0.9})
    splatopt.edit(old, new, **options)
    splatopt.edit(old.select([0]), new[:1], **options)
    assert len(starts) == 2, [[t for t, _ in g] for g in starts]
    batched, alone = starts
    fresh_batched = [s for text, s in batched[2:] if text == new[0]]  # rows: the warm starts, then the second starts
    fresh_alone = [s for text, s in alone[1:]]
    assert len(fresh_batched) == len(fresh_alone) == 1
    (one,), (other,) = fresh_batched, fresh_alone  # the batch pads its starts to its widest: compare active splats
    assert torch.equal(one.mu[one.mask], other.mu[other.mask])
