"""The ``fixedpos`` command line (info, roundtrip); train-head is covered in test_fixedpos_hf.py."""

from __future__ import annotations

import json

import pytest
import torch

from fixedpos import cli
from fixedpos.corpus import LICENSES_DIR


def test_info_prints_model_and_round_trip_line(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "FieldModel('minilm-l6', layer=2, d=384, V=30522" in out
    assert "sample round trip: 100.00% of" in out
    assert "return a new list containing all items" in out  # the decoded sample text


def test_info_with_custom_text(capsys):
    assert cli.main(["info", "--text", "Hello there, general Kenobi."]) == 0
    assert "hello there, general kenobi." in capsys.readouterr().out


def test_roundtrip_prints_a_table_and_writes_json(tmp_path, capsys):
    corpora = ["stdlib:validation", "stdlib:test"] + (["licenses"] if LICENSES_DIR.is_dir() else [])
    out_json = tmp_path / "out" / "rows.json"
    rc = cli.main(["roundtrip", "--n", "8", "--device", "cpu", "--corpus", *corpora, "--json", str(out_json)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "layer", "corpus", "prompts", "tokens", "accuracy"]
    assert len(lines) == 1 + len(corpora)
    for line, corpus in zip(lines[1:], corpora):
        cells = line.split()
        assert cells[:4] == ["minilm-l6", "2", corpus, "8"]
        assert float(cells[-1].rstrip("%")) >= 99.0
    rows = json.loads(out_json.read_text())
    assert [r["corpus"] for r in rows] == corpora and all(r["texts"] == 8 for r in rows)


def test_roundtrip_default_corpora_include_licenses(capsys):
    if not LICENSES_DIR.is_dir():
        pytest.skip("/usr/share/common-licenses is missing")
    assert cli.main(["roundtrip", "--n", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "stdlib:validation" in out and "licenses" in out


def test_info_with_layer_out_of_range_returns_2_with_error_on_stderr(capsys):
    assert cli.main(["info", "--layer", "9"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fixedpos: error: layer=9 is out of range")
    assert "Traceback" not in captured.err


def test_roundtrip_with_unknown_corpus_returns_2(capsys):
    assert cli.main(["roundtrip", "--n", "2", "--device", "cpu", "--corpus", "wikipedia"]) == 2
    assert "unknown corpus 'wikipedia'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_device_without_cuda_exits_with_a_hint():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        cli.main(["roundtrip", "--n", "2", "--device", "cuda"])


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
