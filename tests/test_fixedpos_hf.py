"""fixedpos with local Hugging Face encoders (tiny random BERT / DistilBERT / RoBERTa, built offline),
decoder-head training, saving and loading, and window stitching on a small window."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import pytest
import torch

import fixedpos
from fixedpos.head import HeadRecipe, find_or_train_head, head_filename, load_head, save_head
from fixedpos.model import TokenBatch

WORDS = "the a of to and is in it for on with as by be this that from or not an are return value list string".split()
PUNCT = list(".,;:!?()'\"-")
TINY_RECIPE = HeadRecipe(
    name="tiny", steps=30, batch_tokens=256, max_corpus_tokens=2000, random_sequences=20, random_length=16, negatives=None
)
TEXTS = [
    "the value of a list is returned.",
    "return a string from the list, or not.",
    "this is an example: it returns the value of x and y.",
    "sort the list in place; return none.",
] * 5


def _wordpiece(specials: list[str], unk: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = specials + list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    tokens += list(string.digits) + PUNCT + WORDS
    tokens = list(dict.fromkeys(tokens))  # ids 0..V-1 without gaps ("a" is a letter and a word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def build_tiny_encoder(kind: str, out: Path, positions: int = 64) -> Path:
    """A randomly initialised 2-layer encoder (d = 32) and its fast tokenizer, written without network.
    positions: the BERT's max_position_embeddings."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if kind in ("bert", "distilbert"):
        tok = _wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]")
        hf_tok = tf.BertTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
        V = tok.get_vocab_size()
        if kind == "bert":
            cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=positions, pad_token_id=0)
            model = tf.BertModel(cfg, add_pooling_layer=False)
        else:
            cfg = tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                      max_position_embeddings=64, pad_token_id=0)
            model = tf.DistilBertModel(cfg)
    elif kind == "roberta":
        tok = _wordpiece(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>")
        hf_tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
            pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        )
        # like roberta-base (514 = 512 + padding_idx + 1): positions start at padding_idx + 1
        cfg = tf.RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2, type_vocab_size=1)
        model = tf.RobertaModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_encoders")
    return {kind: build_tiny_encoder(kind, root / kind) for kind in ("bert", "distilbert", "roberta")}


def _load(folder: Path, layer: int) -> fixedpos.FieldModel:
    return fixedpos.load(str(folder), layer=layer, head="quick", train_head_if_missing=False)


@pytest.fixture(scope="module")
def tiny_bert(tiny_dirs):
    model = _load(tiny_dirs["bert"], 2)
    head, _ = fixedpos.train_head(model, TEXTS, TINY_RECIPE, device="cpu", progress=False, log=lambda s: None)
    model.set_head(head)
    return model


def _hidden_states_reference(folder: Path, model: fixedpos.FieldModel, batch: TokenBatch, layer: int) -> torch.Tensor:
    """hidden_states[layer] of the full (un-truncated) transformers model, text wrapped in CLS ... SEP."""
    from transformers import AutoModel

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler is reported as missing
    try:
        full = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    n = int(batch.lengths[0])
    ids = torch.cat([torch.tensor([model.cls_id]), batch.ids[0, :n], torch.tensor([model.sep_id])])[None]
    with torch.no_grad():
        return full(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[layer][0, 1:-1]


# ---------------------------------------------------------------- loading local encoders


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_local_encoder_field_shapes_and_layer_selection(tiny_dirs, kind):
    m0, m2 = _load(tiny_dirs[kind], 0), _load(tiny_dirs[kind], 2)
    assert m0 is not m2 and _load(tiny_dirs[kind], 2) is m2
    assert (m2.dim, m2.layer, m2.n_layers, m2.name) == (32, 2, 2, kind)
    assert m2.vocab_size == m2.tokenizer.backend_tokenizer.get_vocab_size()
    assert m2.window == 62  # 64 usable positions less CLS/SEP (RoBERTa: 66 table entries less padding_idx + 1)
    texts = ["the value of a list is returned.", "hello world"]
    batch = m2.tokenize(texts)
    assert m2.detokenize(batch.ids, batch.mask) == texts
    f0, f2 = m0.encode(batch), m2.encode(batch)
    assert f0.shape == f2.shape == (2, batch.ids.shape[1], 32)
    assert (f2[~batch.mask] == 0).all()
    assert not torch.allclose(f0[batch.mask], f2[batch.mask])
    for layer, f in ((0, f0), (2, f2)):
        single = m2.tokenize(texts[0])
        ref = _hidden_states_reference(tiny_dirs[kind], m2, single, layer)
        torch.testing.assert_close(f[0, : ref.shape[0]], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_local_encoder_intermediate_layer_matches_transformers(tiny_dirs, kind):
    m1 = _load(tiny_dirs[kind], 1)
    batch = m1.tokenize("return a string from the list, or not.")
    ref = _hidden_states_reference(tiny_dirs[kind], m1, batch, 1)
    torch.testing.assert_close(m1.encode(batch)[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_local_encoder_text_longer_than_its_positions_is_windowed(tiny_dirs, kind):
    model = _load(tiny_dirs[kind], 2)
    text = " ".join(["the value of a list is returned"] * 20)
    batch = model.tokenize(text)
    assert batch.ids.shape[1] > 2 * model.window
    field = model.encode(batch)  # RoBERTa would index past its position table without the padding offset
    assert field.shape == (1, batch.ids.shape[1], 32)
    assert (field[0].abs().sum(-1) > 0).all()


def test_local_encoder_layer_out_of_range(tiny_dirs):
    with pytest.raises(ValueError, match=r"layer=3 is out of range.*0\.\.2"):
        _load(tiny_dirs["bert"], 3)
    with pytest.raises(ValueError, match="out of range"):
        _load(tiny_dirs["distilbert"], -1)


def test_an_encoder_with_too_few_positions_for_a_prompt_is_refused_saying_so(tmp_path):
    folder = build_tiny_encoder("bert", tmp_path / "short", positions=8)
    with pytest.raises(ValueError, match="takes 8 positions, 6 tokens besides its two special ones"):
        fixedpos.load(str(folder), layer=1, train_head_if_missing=False)


def test_local_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        fixedpos.load(str(tmp_path))


def test_local_folder_with_unreadable_weights_is_refused(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dirs["bert"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(RuntimeError, match="could not load"):
        fixedpos.load(str(broken), train_head_if_missing=False)


def test_model_without_head_raises_on_decode(tiny_dirs):
    from fixedpos.model import load_hf_encoder

    enc, tok = load_hf_encoder(tiny_dirs["bert"])
    model = fixedpos.FieldModel(enc, tok, layer=1, name="bare", model_hash="f" * 64)
    with pytest.raises(RuntimeError, match="no decoder head"):
        model.decode(torch.zeros(3, 32))


def test_missing_head_without_training_raises_file_not_found(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    model = _load(tiny_dirs["distilbert"], 1)
    with pytest.raises(FileNotFoundError, match="train-head"):
        model.head


# ---------------------------------------------------------------- window stitching (window 62)


def test_tiny_bert_long_text_stitched_from_windows(tiny_bert):
    model = tiny_bert
    assert model.window == 62 and 0 < model.overlap < 31
    long = " ".join(["the value of a list is returned, or this string is not."] * 20)
    batch = model.tokenize([long, "a list."])
    L = int(batch.lengths[0])
    assert L > 3 * model.window
    field = model.encode(batch)
    assert field.shape == (2, L, 32)
    plan = [w for w in model._window_plan(batch.lengths.tolist()) if w[0] == 0]
    assert len(plan) >= 4
    owned = [t for _, _, _, lo, hi in plan for t in range(lo, hi)]
    assert owned == list(range(L))  # every position covered exactly once
    assert (field[0].abs().sum(-1) > 0).all() and (field[1, 3:] == 0).all()
    for _, start, stop, lo, hi in plan:
        ids = batch.ids[0, start:stop][None]
        alone = model.encode(TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(*ids.shape, 2, dtype=torch.long), [""]))
        torch.testing.assert_close(field[0, lo:hi], alone[0, lo - start : hi - start], atol=1e-5, rtol=1e-5)
    # a short text in the same batch is unaffected by its long neighbour
    torch.testing.assert_close(field[1, :3], model.encode(model.tokenize("a list."))[0], atol=1e-5, rtol=1e-5)
    assert model.decode(field).shape == (2, L, model.vocab_size)


# ---------------------------------------------------------------- head training / files


def test_train_head_is_reproducible_with_the_same_seed(tiny_bert):
    quiet = dict(device="cpu", progress=False, log=lambda s: None)
    h1, meta1 = fixedpos.train_head(tiny_bert, TEXTS, TINY_RECIPE, **quiet)
    h2, meta2 = fixedpos.train_head(tiny_bert, TEXTS, TINY_RECIPE, **quiet)
    s1, s2 = h1.trainable_state(), h2.trainable_state()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert meta1["train_accuracy"] == meta2["train_accuracy"] and meta1["train_tokens"] == meta2["train_tokens"]
    h3, _ = fixedpos.train_head(tiny_bert, TEXTS, dataclasses.replace(TINY_RECIPE, seed=1), **quiet)
    assert not torch.equal(h3.trainable_state()["up.weight"], s1["up.weight"])


def test_train_head_shows_progress_while_it_encodes_its_training_tokens(tiny_bert, capsys):
    """Only the optimizer steps had a bar: encoding the standard recipe's ~900k tokens (minutes on a
    CPU) came before it without a word, so a long train-head looked hung."""
    fixedpos.train_head(tiny_bert, TEXTS, dataclasses.replace(TINY_RECIPE, steps=1), device="cpu", progress=True,
                        log=lambda s: None)
    err = capsys.readouterr().err
    assert f"encode {tiny_bert.name} L2" in err and "token" in err
    fixedpos.train_head(tiny_bert, TEXTS, dataclasses.replace(TINY_RECIPE, steps=1), device="cpu", progress=False,
                        log=lambda s: None)
    assert capsys.readouterr().err == ""


def test_a_head_trained_on_first_use_inside_a_fits_no_grad_is_the_same_head(tiny_bert, tiny_dirs):
    """fit decodes under no_grad, and a local encoder's head is trained at its first decode."""
    model = _load(tiny_dirs["bert"], 2)
    with torch.no_grad():
        head, _ = fixedpos.train_head(model, TEXTS, TINY_RECIPE, device="cpu", progress=False, log=lambda s: None)
    field = torch.randn(5, 32)
    assert torch.equal(head(field), tiny_bert.head(field))


def test_train_head_returns_a_frozen_head_and_describes_it(tiny_bert):
    head, meta = fixedpos.train_head(
        tiny_bert, TEXTS, dataclasses.replace(TINY_RECIPE, negatives=16), device="cpu", progress=False, log=lambda s: None
    )
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    assert (head.dim, head.vocab_size) == (32, tiny_bert.vocab_size)
    assert meta["model_hash"] == tiny_bert.model_hash and meta["layer"] == 2
    assert meta["recipe"]["negatives"] == 16 and meta["recipe_key"] == dataclasses.replace(TINY_RECIPE, negatives=16).key()
    assert 0 <= meta["train_accuracy"] <= 1 and meta["train_tokens"] > 20 * 16
    json.dumps(meta)  # metadata is JSON


def test_head_save_load_round_trip_preserves_logits_exactly(tiny_bert, tmp_path):
    head = tiny_bert.head
    path = tmp_path / "sub" / "head.safetensors"
    save_head(head, path, {"model_hash": tiny_bert.model_hash, "layer": 2, "note": "x"})
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded, meta = load_head(path, tiny_bert.word_embeddings, tiny_bert.model_hash, 2)
    assert meta["note"] == "x"
    field = torch.randn(3, 7, 32)
    assert torch.equal(loaded(field), head(field))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_head_refuses_other_layer_or_model(tiny_bert, tmp_path):
    path = tmp_path / "head.safetensors"
    save_head(tiny_bert.head, path, {"model_hash": tiny_bert.model_hash, "layer": 2})
    with pytest.raises(ValueError, match="layer 2, not model .* layer 1"):
        load_head(path, tiny_bert.word_embeddings, tiny_bert.model_hash, 1)
    with pytest.raises(ValueError, match="trained for model"):
        load_head(path, tiny_bert.word_embeddings, "0" * 64, 2)


def test_shipped_head_for_another_layer_is_refused():
    minilm = fixedpos.load()
    layer1 = fixedpos.head.SHIPPED_DIR / head_filename(minilm.model_hash, 1, fixedpos.RECIPES["standard"])
    assert layer1.is_file()
    with pytest.raises(ValueError, match="layer 1, not model .* layer 2"):
        load_head(layer1, minilm.word_embeddings, minilm.model_hash, 2)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: b"garbage, not a safetensors file",
        lambda raw: raw[: len(raw) // 2],  # truncated
        lambda raw: b"",
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_corrupted_head_file_raises_value_error(tiny_bert, tmp_path, corrupt):
    good = tmp_path / "good.safetensors"
    save_head(tiny_bert.head, good, {"model_hash": tiny_bert.model_hash, "layer": 2})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(ValueError, match="corrupt"):
        load_head(bad, tiny_bert.word_embeddings, tiny_bert.model_hash, 2)


def test_a_cached_head_of_wrong_shapes_or_nan_weights_names_the_file_and_the_fix(tiny_bert, tmp_path, monkeypatch):
    """A readable head file with tensors of the wrong shape raised torch's RuntimeError ("size mismatch for bias"),
    one without up.weight a KeyError, both past find_or_train_head's fix (delete the cached file); NaN weights
    loaded and decoded every token alike."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    path = tmp_path / "heads" / head_filename(tiny_bert.model_hash, 2, TINY_RECIPE)
    save_head(tiny_bert.head, path, {"model_hash": tiny_bert.model_hash, "layer": 2})
    good = load_file(path)
    header = {"format": "1", "meta": json.dumps({"model_hash": tiny_bert.model_hash, "layer": 2})}
    damaged = [({**good, "bias": good["bias"][:10]}, r"bias \(10,\) \(expected \(\d+,\)\)"),
               ({k: t for k, t in good.items() if k != "up.weight"}, "lacks a 2-d up.weight"),
               ({**good, "linear.weight": good["linear.weight"] * float("nan")}, "linear.weight holds NaN or inf")]
    for tensors, message in damaged:
        save_file(tensors, path, metadata=header)
        with pytest.raises(ValueError, match=message) as err:
            find_or_train_head(tiny_bert, TINY_RECIPE, train_if_missing=False)
        assert str(path) in str(err.value) and f"delete {path}" in str(err.value)


def test_corrupted_cached_head_is_reported_not_silently_retrained(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    path = tmp_path / "heads" / head_filename(tiny_bert.model_hash, 2, TINY_RECIPE)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupt") as err:
        find_or_train_head(tiny_bert, TINY_RECIPE, train_if_missing=False)
    # the file and the fix: deleting it is safe, the head is trained again
    assert f"{path} is corrupt" in str(err.value) and f"delete {path}: the head is trained again on first use" in str(err.value)
    assert "fixedpos train-head" in str(err.value)


def test_a_damaged_shipped_head_says_to_reinstall(monkeypatch, tmp_path):
    minilm = fixedpos.load()
    name = head_filename(minilm.model_hash, 2, fixedpos.RECIPES["standard"])
    (tmp_path / name).write_bytes((fixedpos.head.SHIPPED_DIR / name).read_bytes()[:1000])  # a copy, truncated
    monkeypatch.setattr(fixedpos.head, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"is corrupt .*the installed package is damaged: reinstall it") as err:
        find_or_train_head(minilm, "standard", train_if_missing=False)
    assert f"git checkout -- fixedpos/heads/{name}" in str(err.value)


def test_cached_head_is_found_in_the_user_cache(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    path = fixedpos.cache_dir() / "heads" / head_filename(tiny_bert.model_hash, 2, TINY_RECIPE)
    save_head(tiny_bert.head, path, {"model_hash": tiny_bert.model_hash, "layer": 2})
    found = find_or_train_head(tiny_bert, TINY_RECIPE, train_if_missing=False)
    field = torch.randn(5, 32)
    assert torch.equal(found(field), tiny_bert.head(field))


def test_head_cache_key_changes_with_every_recipe_field():
    base = TINY_RECIPE
    assert base.key() == HeadRecipe(**dataclasses.asdict(base)).key()  # a pure function of the fields
    keys = {base.key()}
    for f in dataclasses.fields(HeadRecipe):
        value = getattr(base, f.name)
        if isinstance(value, str):
            changed = value + "x"
        elif isinstance(value, float):
            changed = value * 2 if value else 0.5
        elif value is None:
            changed = 7
        else:
            changed = value + 1
        other = dataclasses.replace(base, **{f.name: changed})
        keys.add(other.key())
        assert head_filename("a" * 64, 2, other) != head_filename("a" * 64, 2, base)
    assert len(keys) == len(dataclasses.fields(HeadRecipe)) + 1


def test_unknown_recipe_name_is_refused(tiny_bert):
    with pytest.raises(ValueError, match="unknown head recipe"):
        find_or_train_head(tiny_bert, "nonsense", train_if_missing=False)


# ---------------------------------------------------------------- CLI train-head on a local encoder


def test_cli_train_head_writes_a_head_that_load_then_finds(tiny_dirs, tmp_path, monkeypatch, capsys):
    from fixedpos import cli

    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path / "cache"))
    # a small recipe registered under a name, so the CLI and load() resolve it
    monkeypatch.setitem(fixedpos.RECIPES, "tiny", TINY_RECIPE)
    folder = tiny_dirs["distilbert"]
    rc = cli.main(["train-head", "--model", str(folder), "--layer", "2", "--recipe", "tiny", "--n", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "wrote" in out and "stdlib:validation" in out
    written = list((tmp_path / "cache" / "heads").glob("head-*-layer2-tiny-*.safetensors"))
    assert len(written) == 1
    model = fixedpos.load(str(folder), layer=2, head="tiny", train_head_if_missing=False)
    _, meta = load_head(written[0], model.word_embeddings, model.model_hash, 2)
    assert meta["roundtrip"] and {"accuracy", "tokens"} <= meta["roundtrip"][0].keys()
    field = model.encode(model.tokenize("the value of a list."))
    assert model.decode(field).shape == (1, field.shape[1], model.vocab_size)


def test_cli_train_head_all_layers_keeps_the_heads_written_before_an_interruption(tiny_dirs, tmp_path, monkeypatch, capsys):
    """`train-head --all-layers` stopped by Ctrl-C printed a traceback, and the re-run trained every layer
    again from scratch, those whose heads were already written too. Ctrl-C now says which heads are kept
    and exits 130; the re-run keeps (skips) them, saying so; a head file that does not read back is trained
    again, never taken for a finished one; --force trains a kept head again."""
    from fixedpos import cli

    monkeypatch.setitem(fixedpos.RECIPES, "tiny", TINY_RECIPE)
    real_train, trained, interrupt_at = fixedpos.train_head, [], [1]

    def train(model, *args, **kwargs):
        trained.append(model.layer)
        if model.layer in interrupt_at:
            raise KeyboardInterrupt
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(fixedpos, "train_head", train)
    out = tmp_path / "heads"
    argv = ["train-head", "--model", str(tiny_dirs["distilbert"]), "--recipe", "tiny", "--n", "2", "--device", "cpu",
            "--out", str(out)]
    try:
        assert cli.main([*argv, "--all-layers"]) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line: the user saw a traceback")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("fixedpos: interrupted (Ctrl-C)\n")
    assert f"the heads of layer(s) 0 are kept in {out}" in err and "run the same command again" in err
    (head0,) = out.glob("*.safetensors")
    assert "layer0" in head0.name and trained == [0, 1]
    trained.clear(), interrupt_at.clear()
    assert cli.main([*argv, "--all-layers"]) == 0
    assert trained == [1, 2] and f"kept {head0} (layer 0: written before; --force trains it again)" in capsys.readouterr().out
    trained.clear()
    head0.write_bytes(b"torn")  # damaged since it was written: not a finished head
    assert cli.main([*argv, "--layer", "0"]) == 0
    assert trained == [0] and "does not read back" in capsys.readouterr().out
    trained.clear()
    assert cli.main([*argv, "--layer", "0", "--force"]) == 0 and trained == [0]
    assert len(list(out.glob("*.safetensors"))) == 3


def test_cli_edit_refits_a_local_encoders_fit_given_its_folder(tiny_bert, tiny_dirs, tmp_path, monkeypatch):
    """A fit file names a local encoder by its folder's base name only: --model points edit at it."""
    import splatopt
    from fixedpos.head import RECIPES
    from splatopt.cli import main

    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path / "cache"))
    head_path = fixedpos.cache_dir() / "heads" / head_filename(tiny_bert.model_hash, 2, RECIPES["standard"])
    save_head(tiny_bert.head, head_path, {"model_hash": tiny_bert.model_hash, "layer": 2})
    model = fixedpos.load(str(tiny_dirs["bert"]), layer=2)
    fitted = splatopt.fit([TEXTS[0]], model, n_splats=2, steps=2, device="cpu", progress=False)
    path = fitted.save(tmp_path / "fit.safetensors")
    monkeypatch.chdir(tmp_path)  # not the encoder's parent folder
    args = ["edit", str(path), "the value of a string is returned.", "--steps", "2", "--device", "cpu", "--quiet"]
    assert main(args) == 2, "without --model the base name alone does not find the encoder"
    assert main(args + ["--model", str(tiny_dirs["bert"]), "--out", str(tmp_path / "edited.safetensors")]) == 0
    assert splatopt.FitResult.load(tmp_path / "edited.safetensors").input_texts == ["the value of a string is returned."]


def test_training_and_loading_a_head_leave_the_callers_random_state(tiny_bert, tmp_path):
    """train_head reseeded the global generator, and a head trained or loaded on first use (inside a
    fit's first decode) drew from it: a researcher's own seeded stream depended on which heads were loaded."""
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    head, meta = fixedpos.train_head(tiny_bert, TEXTS, TINY_RECIPE, device="cpu", progress=False, log=lambda s: None)
    from fixedpos.head import load_head, save_head

    save_head(head, tmp_path / "head.safetensors", meta)
    load_head(tmp_path / "head.safetensors", tiny_bert.word_embeddings, tiny_bert.model_hash, tiny_bert.layer)
    assert torch.equal(torch.rand(4), expected)
