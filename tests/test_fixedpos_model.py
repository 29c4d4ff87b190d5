"""fixedpos: the default field model (MiniLM layer 2) — interface, round trip, bad input, long texts."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fixedpos
from fixedpos.cache import MINILM_SAFETENSORS_SHA256
from fixedpos.model import FieldModel, TokenBatch

PLAIN = ["the quick brown fox jumps over the lazy dog.", "return a new list.", "sort items in ascending order, please!"]


@pytest.fixture(scope="module")
def minilm():
    return fixedpos.load()


@pytest.fixture(scope="module")
def long_text(minilm):
    """Real prose of about 1,500 wordpieces (stdlib docstrings, joined)."""
    parts, n = [], 0
    for p in fixedpos.load_corpus("stdlib", "test"):
        parts.append(p)
        n += len(minilm.tokenizer(p, add_special_tokens=False)["input_ids"])
        if n >= 1500:
            break
    return " ".join(parts)


# ---------------------------------------------------------------- interface


def test_load_returns_cached_object(minilm):
    assert fixedpos.load() is minilm
    assert fixedpos.load("minilm-l6", layer=2) is minilm


def test_default_model_attributes(minilm):
    assert minilm.dim == 384
    assert minilm.vocab_size == 30522
    assert minilm.name == "minilm-l6"
    assert minilm.layer == fixedpos.DEFAULT_LAYER == 2
    assert minilm.model_hash == MINILM_SAFETENSORS_SHA256
    assert minilm.window == 510
    assert "minilm-l6" in repr(minilm) and "layer=2" in repr(minilm)


def test_tokenize_shapes_dtypes_and_padding(minilm):
    batch = minilm.tokenize(PLAIN)
    B, L = batch.ids.shape
    assert B == len(PLAIN) == len(batch)
    assert batch.ids.dtype == torch.long and batch.mask.dtype == torch.bool
    assert batch.offsets.shape == (B, L, 2) and batch.offsets.dtype == torch.long
    assert batch.texts == PLAIN
    assert int(batch.lengths.max()) == L
    # right padding: the mask is a prefix; pads hold the pad id and zero offsets
    for b, n in enumerate(batch.lengths.tolist()):
        assert batch.mask[b, :n].all() and not batch.mask[b, n:].any()
        assert (batch.ids[b, n:] == minilm.pad_id).all()
        assert (batch.offsets[b, n:] == 0).all()


def test_tokenize_single_string_is_a_batch_of_one(minilm):
    batch = minilm.tokenize("hello world")
    assert batch.ids.shape[0] == 1 and batch.texts == ["hello world"]


def test_tokenize_offsets_map_back_to_text_characters(minilm):
    texts = PLAIN + ["hello 😀 world", "Grüße, 東京"]
    batch = minilm.tokenize(texts)
    for b, text in enumerate(texts):
        n = int(batch.lengths[b])
        toks = minilm.tokenizer.convert_ids_to_tokens(batch.ids[b, :n].tolist())
        prev_end = 0
        for tok, (s, e) in zip(toks, batch.offsets[b, :n].tolist()):
            assert 0 <= prev_end <= s < e <= len(text)
            prev_end = e
            span = text[s:e]
            if tok == "[UNK]":
                assert span == "😀"
            elif text.isascii():
                assert span.lower() == tok.removeprefix("##")
        # every non-space character of the text is covered by some token
        covered = set()
        for s, e in batch.offsets[b, :n].tolist():
            covered.update(range(s, e))
        assert {i for i, ch in enumerate(text) if not ch.isspace()} <= covered


def test_a_special_tokens_spelling_in_text_is_text_not_a_control_token(minilm):
    """"[PAD] [CLS]" was tokenized as the pad and start ids, and fitted as padding."""
    batch = minilm.tokenize("[PAD] [CLS] hello [MASK]")
    special = {minilm.pad_id, minilm.cls_id, minilm.sep_id, minilm.tokenizer.mask_token_id}
    assert not special & set(batch.ids[0].tolist())
    assert minilm.detokenize(batch.ids)[0].replace(" ", "") == "[pad][cls]hello[mask]"


def test_detokenize_round_trips_lowercase_text(minilm):
    batch = minilm.tokenize(PLAIN)
    assert minilm.detokenize(batch.ids, batch.mask) == [t.lower() for t in PLAIN]
    # one-dimensional ids are one text
    n = int(batch.lengths[1])
    assert minilm.detokenize(batch.ids[1, :n]) == [PLAIN[1]]


def test_encode_shape_dtype_device_and_zero_pads(minilm):
    batch = minilm.tokenize(PLAIN)
    field = minilm.encode(batch)
    B, L = batch.ids.shape
    assert field.shape == (B, L, 384)
    assert field.dtype == torch.float32
    assert field.device == batch.ids.device
    assert (field[~batch.mask] == 0).all()
    assert (field[batch.mask].abs().sum(-1) > 0).all()
    assert torch.isfinite(field).all()
    assert minilm.encode(batch, dtype=torch.float64).dtype == torch.float64


def test_encode_has_no_grad_even_under_enable_grad(minilm):
    batch = minilm.tokenize(PLAIN[:1])
    with torch.enable_grad():
        field = minilm.encode(batch)
    assert not field.requires_grad and field.grad_fn is None
    assert not any(p.requires_grad for p in minilm.encoder.parameters())
    assert not minilm.encoder.training


def test_encode_is_deterministic(minilm):
    batch = minilm.tokenize(PLAIN)
    assert torch.equal(minilm.encode(batch), minilm.encode(batch))


def test_encode_of_a_text_does_not_depend_on_its_batch(minilm):
    batch = minilm.tokenize(PLAIN)
    for b, text in enumerate(PLAIN):
        alone = minilm.encode(minilm.tokenize(text))[0]
        n = alone.shape[0]
        torch.testing.assert_close(minilm.encode(batch)[b, :n], alone, atol=1e-5, rtol=1e-5)


def test_encode_matches_transformers_hidden_state_at_layer_2(minilm):
    from transformers import BertModel

    full = BertModel.from_pretrained(str(fixedpos.minilm_dir()), local_files_only=True).eval()
    batch = minilm.tokenize(PLAIN[0])
    ids = torch.cat([torch.tensor([minilm.cls_id]), batch.ids[0], torch.tensor([minilm.sep_id])])[None]
    with torch.no_grad():
        ref = full(input_ids=ids, output_hidden_states=True).hidden_states[2][0, 1:-1]
    torch.testing.assert_close(minilm.encode(batch)[0], ref, atol=1e-5, rtol=1e-5)


def test_decode_shape_and_gradient_flows_to_field_only(minilm):
    batch = minilm.tokenize(PLAIN)
    field = minilm.encode(batch).requires_grad_(True)
    logits = minilm.decode(field)
    assert logits.shape == (*batch.ids.shape, 30522)
    assert logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits[batch.mask], batch.ids[batch.mask])
    loss.backward()
    assert field.grad is not None and torch.isfinite(field.grad).all()
    assert field.grad[batch.mask].abs().sum() > 0
    for p in minilm.head.parameters():
        assert not p.requires_grad and p.grad is None


def test_decode_accepts_unbatched_field_and_rejects_non_tensors(minilm):
    field = minilm.encode(minilm.tokenize("hello world"))[0]
    assert minilm.decode(field).shape == (field.shape[0], 30522)
    with pytest.raises(TypeError, match="field must be a torch.Tensor, not list"):
        minilm.decode(field.tolist())


def test_decode_of_encode_reads_back_the_tokens(minilm):
    batch = minilm.tokenize(PLAIN)
    pred = minilm.decode(minilm.encode(batch)).argmax(-1)
    assert torch.equal(pred[batch.mask], batch.ids[batch.mask])
    assert minilm.detokenize(pred, batch.mask) == [t.lower() for t in PLAIN]


def test_text_token_ids_exclude_special_and_unused_tokens(minilm):
    keep = set(minilm.text_token_ids.tolist())
    assert not keep & set(minilm.tokenizer.all_special_ids)
    assert minilm.tokenizer.convert_tokens_to_ids("[unused0]") not in keep
    assert minilm.tokenizer.convert_tokens_to_ids("the") in keep
    assert 29000 < len(keep) < 30522


# ---------------------------------------------------------------- round-trip accuracy


def test_round_trip_accuracy_on_stdlib_validation_prompts(minilm):
    prompts = fixedpos.sample_prompts(minilm, fixedpos.load_corpus("stdlib", "validation"), 40)
    assert len(prompts) == 40
    acc = fixedpos.token_accuracy(minilm, prompts)
    assert acc["texts"] == 40 and acc["tokens"] >= 40 * 8
    assert acc["accuracy"] >= 0.995


def test_round_trip_accuracy_on_out_of_domain_license_prose(minilm):
    try:
        texts = fixedpos.load_corpus("licenses")
    except FileNotFoundError:
        pytest.skip("/usr/share/common-licenses is missing")
    prompts = fixedpos.sample_prompts(minilm, texts, 40)
    assert len(prompts) == 40
    acc = fixedpos.token_accuracy(minilm, prompts)
    assert acc["accuracy"] >= 0.995


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("text", ["", " ", "\n\t  \n"])
def test_tokenize_rejects_empty_or_whitespace_text(minilm, text):
    with pytest.raises(ValueError, match=r"texts\[1\] is empty or whitespace"):
        minilm.tokenize(["fine", text])


@pytest.mark.parametrize("item", [None, 3, b"bytes", ["nested"]])
def test_tokenize_rejects_non_string_items_with_type_error(minilm, item):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        minilm.tokenize(["fine", item])


def test_tokenize_rejects_empty_list(minilm):
    with pytest.raises(ValueError, match="empty"):
        minilm.tokenize([])


def test_tokenize_rejects_nul_byte_naming_the_index(minilm):
    with pytest.raises(ValueError, match=r"texts\[2\] contains a NUL byte at character 1"):
        minilm.tokenize(["ok", "fine", "a\x00b"])


def test_tokenize_names_a_lone_surrogate_and_its_position(minilm):
    """A lone surrogate (a JSON "\\ud800" escape, a file read with surrogateescape) reached the tokenizer, which
    failed with "TextEncodeInput must be Union[TextInputSequence, ...]", naming neither the text nor the character."""
    with pytest.raises(ValueError, match=r"texts\[1\] holds the lone surrogate '\\ud800' at character 3"):
        minilm.tokenize(["fine", "hi \ud800 there"])


def test_tokenize_onto_a_device_the_machine_lacks_names_the_device(minilm):
    """tokenize(device="cuda") on a machine without CUDA raised torch's bare AssertionError ("Torch not compiled
    with CUDA enabled"); "gpu" raised a RuntimeError listing torch's device types."""
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available on this machine"):
            minilm.tokenize("hi", device="cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        minilm.tokenize("hi", device="gpu")


def test_decoding_a_field_on_the_meta_device_is_refused_and_keeps_the_shared_head(minilm):
    """The head follows the field's device: decode (or decode_parts) of a meta field moved the cached model's
    head to the meta device, erasing its weights, and every later decode in the process failed ("Cannot copy
    out of meta tensor")."""
    with pytest.raises(ValueError, match="decode: the field lies on meta"):
        minilm.decode(torch.zeros(1, 2, minilm.dim, device="meta"))
    with pytest.raises(ValueError, match=r"decode_parts\('meta'\) lies on meta"):
        minilm.decode_parts("meta")
    batch = minilm.tokenize("Return the sum.")
    assert torch.equal(minilm.decode(minilm.encode(batch)).argmax(-1), batch.ids)


def test_tokenize_rejects_text_of_only_unknown_characters(minilm):
    with pytest.raises(ValueError, match=r"texts\[0\] has only characters unknown"):
        minilm.tokenize(["😀😀"])


def test_tokenize_rejects_text_the_tokenizer_discards_entirely(minilm):
    with pytest.raises(ValueError, match="produced no tokens"):
        minilm.tokenize(["\u200b\u200b"])


def test_emoji_inside_text_becomes_unk_token(minilm):
    batch = minilm.tokenize("hello 😀 world")
    assert batch.ids[0].tolist()[1] == minilm.unk_id
    assert minilm.detokenize(batch.ids, batch.mask) == ["hello [UNK] world"]
    assert minilm.encode(batch).shape == (1, 3, 384)


@pytest.mark.parametrize("text", ["Grüße, 東京", "Привет мир", "naïve café"])
def test_non_ascii_scripts_tokenize_encode_and_decode(minilm, text):
    batch = minilm.tokenize(text)
    assert (batch.ids[batch.mask] != minilm.unk_id).all()
    pred = minilm.decode(minilm.encode(batch)).argmax(-1)
    assert torch.equal(pred[batch.mask], batch.ids[batch.mask])


@pytest.mark.parametrize("layer", [7, -1])
def test_load_rejects_layer_out_of_range(layer):
    with pytest.raises(ValueError, match=r"layer=.* out of range.*0\.\.6"):
        fixedpos.load(layer=layer)


@pytest.mark.parametrize("layer", [True, 2.0, "2"])
def test_load_rejects_non_int_layer(layer):
    with pytest.raises(TypeError, match="layer must be an int"):
        fixedpos.load(layer=layer)


def test_load_rejects_unknown_model_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        fixedpos.load(str(tmp_path / "no-such-model"))


def test_decode_rejects_field_of_wrong_width_naming_d(minilm):
    with pytest.raises(ValueError, match="d=384"):
        minilm.decode(torch.zeros(1, 4, 32))


def test_set_head_rejects_head_of_other_shape(minilm):
    other = fixedpos.DecoderHead(torch.randn(50, 16))
    with pytest.raises(ValueError, match="d=16"):
        minilm.set_head(other)


# ---------------------------------------------------------------- long texts


def test_default_model_encodes_a_1500_token_text(minilm, long_text):
    batch = minilm.tokenize(long_text)
    L = batch.ids.shape[1]
    assert 1500 <= L <= 1700
    field = minilm.encode(batch)
    assert field.shape == (1, L, 384)
    assert (field[0].abs().sum(-1) > 0).all()  # every position covered
    # the stitched field still reads back
    pred = minilm.decode(field).argmax(-1)
    assert (pred == batch.ids).float().mean() >= 0.99


def _check_stitching(model: FieldModel, batch: TokenBatch, atol: float = 1e-5) -> None:
    """Every position of every text comes from exactly one window, equal to that window encoded alone."""
    field = model.encode(batch)
    lengths = batch.lengths.tolist()
    plan = model._window_plan(lengths)
    for b, L in enumerate(lengths):
        owned = sorted((lo, hi) for bb, _, _, lo, hi in plan if bb == b)
        assert owned[0][0] == 0 and owned[-1][1] == L
        assert all(a[1] == c[0] for a, c in zip(owned, owned[1:]))  # contiguous, no overlap, no gap
        assert (field[b, :L].abs().sum(-1) > 0).all()
        assert (field[b, L:] == 0).all()
    for b, start, stop, lo, hi in plan:
        assert stop - start <= model.window
        if lengths[b] > model.window:  # an interior seam leaves `overlap` tokens of context on its sides
            assert start == 0 or lo - start >= model.overlap
            assert stop == lengths[b] or stop - hi >= model.overlap
        ids = batch.ids[b, start:stop][None]
        alone = model.encode(TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(*ids.shape, 2, dtype=torch.long), [""]))
        torch.testing.assert_close(field[b, lo:hi], alone[0, lo - start : hi - start], atol=atol, rtol=1e-5)


def test_default_model_with_small_window_stitches_long_text(long_text):
    model = fixedpos.load(window=64)
    assert model.window == 64 and 0 < model.overlap < 32
    text = " ".join(long_text.split()[:150])
    batch = model.tokenize([text, "a short text."])
    assert batch.lengths[0] > 2 * model.window
    _check_stitching(model, batch)
    # the same object is served again for the same arguments, a different one for the default window
    assert fixedpos.load(window=64) is model and fixedpos.load() is not model


def test_encode_in_small_chunks_equals_encode_in_one(long_text):
    model = fixedpos.load(window=64)
    batch = model.tokenize([" ".join(long_text.split()[:120]), "another short text here."])
    torch.testing.assert_close(model.encode(batch, max_tokens=64), model.encode(batch), atol=1e-5, rtol=1e-5)


@settings(max_examples=300, deadline=None)
@given(
    L=st.integers(1, 3000),
    window=st.integers(8, 600),
    frac=st.floats(0, 1),
)
def test_window_plan_covers_every_position_exactly_once(L, window, frac):
    overlap = int(frac * (window - 1) // 2)
    fake = types.SimpleNamespace(window=window, overlap=overlap)
    plan = FieldModel._window_plan(fake, [L])
    counts = [0] * L
    for _, start, stop, lo, hi in plan:
        assert 0 <= start <= lo < hi <= stop <= L
        assert stop - start == min(window, L)
        for t in range(lo, hi):
            counts[t] += 1
        if L > window:
            assert start == 0 or lo - start >= overlap
            assert stop == L or stop - hi >= overlap
    assert counts == [1] * L


def test_field_model_rejects_bad_window_and_overlap(minilm):
    enc, tok = minilm.encoder, minilm.tokenizer
    with pytest.raises(ValueError, match="window=4"):
        FieldModel(enc, tok, layer=2, name="x", model_hash="0" * 64, window=4)
    with pytest.raises(ValueError, match="window=600"):
        FieldModel(enc, tok, layer=2, name="x", model_hash="0" * 64, window=600)
    with pytest.raises(ValueError, match="overlap=32"):  # half the window: windows would not advance
        FieldModel(enc, tok, layer=2, name="x", model_hash="0" * 64, window=64, overlap=32)
    with pytest.raises(TypeError, match="window must be an int number of tokens, not float"):  # failed at the first long text
        FieldModel(enc, tok, layer=2, name="x", model_hash="0" * 64, window=64.0)


def test_tokenize_encode_and_detokenize_name_inputs_of_the_wrong_kind(minilm):
    with pytest.raises(TypeError, match="not bytes"):
        minilm.tokenize(b"abc")
    with pytest.raises(TypeError, match="encode takes a TokenBatch"):
        minilm.encode(["hi"])
    batch = minilm.tokenize(["hello world", "a"])
    with pytest.raises(ValueError, match="the mask the same shape"):
        minilm.detokenize(batch.ids, batch.mask[:, :1])
    assert minilm.detokenize(batch.ids, batch.mask) == ["hello world", "a"]
    assert minilm.detokenize(batch.ids[0], batch.mask[0]) == ["hello world"]


def test_encode_refuses_a_dtype_that_is_not_floating_point(model):
    with pytest.raises(TypeError, match=r"encode\(dtype=torch.int64\): a field is floating point"):
        model.encode(model.tokenize(["some text"]), dtype=torch.int64)
