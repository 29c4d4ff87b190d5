"""fixedpos.corpus: stdlib docstring splits, licence prose, .txt/.jsonl files, prompt sampling."""

from __future__ import annotations

import json

import pytest

import fixedpos
from fixedpos.corpus import SPLITS


@pytest.fixture(scope="module")
def minilm():
    return fixedpos.load()


@pytest.fixture(scope="module")
def stdlib_splits():
    return {split: fixedpos.load_corpus("stdlib", split) for split in SPLITS}


def test_stdlib_splits_are_disjoint(stdlib_splits):
    sets = {k: set(v) for k, v in stdlib_splits.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    for v in stdlib_splits.values():
        assert len(v) == len(set(v))  # passages are de-duplicated


def test_stdlib_splits_are_deterministic(stdlib_splits):
    for split, passages in stdlib_splits.items():
        assert fixedpos.load_corpus("stdlib", split) == passages


def test_stdlib_splits_are_roughly_80_10_10(stdlib_splits):
    n = {k: len(v) for k, v in stdlib_splits.items()}
    total = sum(n.values())
    assert total > 2000
    assert abs(n["train"] / total - 0.8) < 0.03
    assert abs(n["validation"] / total - 0.1) < 0.02
    assert abs(n["test"] / total - 0.1) < 0.02


def test_stdlib_passages_are_prose_paragraphs(stdlib_splits):
    for p in stdlib_splits["validation"][:200]:
        assert len(p.split()) >= 6
        assert "\n" not in p and p == " ".join(p.split())
        assert not p.startswith(">>>")
        assert fixedpos.split_of(p) == "validation"


def test_split_of_is_a_stable_function_of_the_text():
    # SHA-1 buckets: these must never change across machines or versions (they decide the held-out set)
    assert fixedpos.split_of("Return the sum of a and b.") == "train"
    assert fixedpos.split_of("b") == "test"
    assert fixedpos.split_of("ae") == "validation"
    assert fixedpos.split_of("d") == "test"
    assert fixedpos.split_of("hello world") == "train"


def test_unknown_corpus_or_split_raises_value_error():
    with pytest.raises(ValueError, match="unknown corpus 'wikipedia'"):
        fixedpos.load_corpus("wikipedia")
    with pytest.raises(ValueError, match="split='dev'"):
        fixedpos.load_corpus("stdlib", "dev")


def test_missing_corpus_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fixedpos.load_corpus(str(tmp_path / "nope.txt"))


def test_licenses_corpus_is_held_out_prose():
    try:
        texts = fixedpos.load_corpus("licenses")
    except FileNotFoundError:
        pytest.skip("/usr/share/common-licenses is missing")
    assert len(texts) > 50 and len(texts) == len(set(texts))
    assert fixedpos.load_corpus("licenses", "test") == texts  # every split is the same held-out text


def test_licenses_corpus_missing_folder_is_explained(tmp_path, monkeypatch):
    from fixedpos import corpus

    monkeypatch.setattr(corpus, "LICENSES_DIR", tmp_path / "absent")
    corpus.license_passages.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="absent is missing"):
            fixedpos.load_corpus("licenses")
    finally:
        corpus.license_passages.cache_clear()


def test_txt_file_with_blank_lines_gives_one_passage_per_paragraph(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First paragraph,\nstill the first.\n\n  \nSecond   one.\n\n\nThird.\n", encoding="utf-8")
    assert fixedpos.load_corpus(str(path)) == ["First paragraph, still the first.", "Second one.", "Third."]


def test_txt_file_without_blank_lines_gives_one_passage_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("line one\nline  two\nline three", encoding="utf-8")
    assert fixedpos.load_text_file(path) == ["line one", "line two", "line three"]


def test_jsonl_file_reads_text_fields_and_skips_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "one passage", "id": 1}, {"text": "Grüße 東京"}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert fixedpos.load_corpus(str(path)) == ["one passage", "Grüße 東京"]


def test_jsonl_malformed_line_error_names_the_line_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:3 is not valid JSON"):
        fixedpos.load_text_file(path)


@pytest.mark.parametrize("row", ['["a list"]', '{"content": "x"}', '{"text": 5}'])
def test_jsonl_line_without_string_text_field_names_the_line(tmp_path, row):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + row + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r'c\.jsonl:2 has no string "text" field'):
        fixedpos.load_text_file(path)


def test_sample_prompts_are_bounded_real_text_and_deterministic(minilm, stdlib_splits):
    texts = stdlib_splits["validation"]
    prompts = fixedpos.sample_prompts(minilm, texts, 100, seed=3)
    assert len(prompts) == 100 and len(set(prompts)) == 100
    assert fixedpos.sample_prompts(minilm, texts, 100, seed=3) == prompts
    assert fixedpos.sample_prompts(minilm, texts, 100, seed=4) != prompts
    batch = minilm.tokenize(prompts)
    assert int(batch.lengths.max()) <= 64 and int(batch.lengths.min()) >= 8
    for p in prompts:
        # a prompt is a passage or its prefix cut at a word boundary
        src = next(t for t in texts if t.startswith(p))
        assert len(p) == len(src) or src[len(p)] == " "


def test_sample_prompts_respects_small_token_budgets(minilm, stdlib_splits):
    texts = stdlib_splits["test"]
    prompts = fixedpos.sample_prompts(minilm, texts, 200, max_tokens=12, min_tokens=5, seed=0)
    assert len(prompts) == 200
    lengths = minilm.tokenize(prompts).lengths
    assert int(lengths.max()) <= 12 and int(lengths.min()) >= 5


def test_sample_prompts_returns_fewer_when_texts_run_out(minilm):
    texts = ["too short", "this passage is long enough to be a prompt of eight tokens or more"]
    assert fixedpos.sample_prompts(minilm, texts, 5) == [texts[1]]


def test_load_corpus_spec_reads_the_command_line_names(tmp_path):
    assert fixedpos.load_corpus_spec("stdlib:test") == fixedpos.load_corpus("stdlib", "test")
    assert fixedpos.load_corpus_spec("stdlib") == fixedpos.load_corpus("stdlib", "validation")
    path = tmp_path / "notes.txt"
    path.write_text("one line\nanother line\n")
    assert fixedpos.load_corpus_spec(str(path)) == ["one line", "another line"]


def test_the_stdlib_snapshot_is_checked_and_the_same_on_every_machine():
    """The shipped snapshot (Python 3.12.3's docstrings) passes its checksum; under that interpreter
    it is exactly the live corpus, so recorded prompt samples reproduce anywhere."""
    import platform

    from fixedpos.corpus import stdlib_passages

    snapshot = stdlib_passages()
    assert len(snapshot) == 9672 and all(len(p.split()) >= 6 and "\n" not in p for p in snapshot)
    if platform.python_version() == "3.12.3":
        assert stdlib_passages(source="live") == snapshot


def test_the_live_stdlib_corpus_reads_this_interpreter_with_the_same_split_rule():
    from fixedpos.corpus import split_of, stdlib_passages

    live = fixedpos.load_corpus("stdlib-live", "test")
    assert len(live) > 200 and all(split_of(p) == "test" for p in live)
    # most docstrings survive a version change, and a surviving passage keeps its split in both corpora
    shared = set(stdlib_passages(source="live")) & set(stdlib_passages())
    assert len(shared) > 1000
    for split in SPLITS:
        assert set(fixedpos.load_corpus("stdlib", split)) & shared == set(fixedpos.load_corpus("stdlib-live", split)) & shared
    assert fixedpos.load_corpus_spec("stdlib-live:validation") == fixedpos.load_corpus("stdlib-live", "validation")


def test_a_corrupt_or_missing_snapshot_says_how_to_recover(tmp_path, monkeypatch):
    import fixedpos.corpus as corpus

    bad = tmp_path / "stdlib.txt.gz"
    bad.write_bytes(b"not gzip")
    monkeypatch.setattr(corpus, "STDLIB_SNAPSHOT", bad)
    corpus.stdlib_passages.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="reinstall splatopt, or use corpus 'stdlib-live'"):
            corpus.stdlib_passages()
        import gzip

        bad.write_bytes(gzip.compress(b"an edited passage of more than six words here\n"))
        with pytest.raises(RuntimeError, match="checksum"):
            corpus.stdlib_passages()
        with pytest.raises(ValueError, match="source='live'"):
            corpus.stdlib_passages(min_words=3)
    finally:
        corpus.stdlib_passages.cache_clear()


def test_a_corpus_file_that_is_not_utf8_is_named_and_a_byte_order_mark_is_dropped(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 \(byte 3 is 0xe9\)"):
        fixedpos.load_text_file(latin)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfFirst line.\nSecond line.\n")
    assert fixedpos.load_text_file(bom) == ["First line.", "Second line."]


@pytest.mark.parametrize("n", [0, -1])
def test_sample_prompts_refuses_fewer_than_one_prompt_instead_of_taking_all(minilm, n):
    with pytest.raises(ValueError, match=f"n={n} must be an int >= 1"):
        fixedpos.sample_prompts(minilm, ["a passage of quite a few words to sample from here."], n)
