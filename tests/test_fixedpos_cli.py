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
def test_cuda_device_without_cuda_is_an_error_like_any_other(capsys):
    """It raised SystemExit: rc 1 and no "fixedpos: error:" prefix, unlike every other error (rc 2)."""
    assert cli.main(["roundtrip", "--n", "2", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "fixedpos: error: --device cuda: CUDA is not available on this machine; use --device cpu\n"


def test_a_device_torch_does_not_know_is_named_with_the_option(capsys):
    assert cli.main(["info", "--device", "gpu"]) == 2
    assert "fixedpos: error: --device gpu is not a device; give auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


def _no_evaluation(*args, **kwargs):
    raise AssertionError("the evaluation ran before the input was checked")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_roundtrip_refuses_fewer_than_one_prompt(n, monkeypatch, capsys):
    monkeypatch.setattr(cli, "roundtrip_report", _no_evaluation)
    assert cli.main(["roundtrip", "--n", n, "--device", "cpu", "--corpus", "stdlib:validation"]) == 2
    assert capsys.readouterr().err.startswith(f"fixedpos: error: --n {n}: give at least 1 prompt")


def test_roundtrip_refuses_a_corpus_without_usable_prompts_before_encoding(tmp_path, capsys):
    corpus = tmp_path / "short.jsonl"
    corpus.write_text('{"text": "   "}\n{"text": "Too short."}\n')
    out_json = tmp_path / "rows.json"
    # the usable corpus comes first: the unusable one must fail before it is evaluated
    rc = cli.main(["roundtrip", "--n", "2", "--device", "cpu", "--corpus", "stdlib:validation", str(corpus), "--json", str(out_json)])
    assert rc == 2
    captured = capsys.readouterr()
    assert f"corpus {corpus} has no passage of at least 8 tokens" in captured.err
    assert captured.out == "" and not out_json.exists()


def test_roundtrip_refuses_a_folder_as_json_path_before_the_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "roundtrip_report", _no_evaluation)
    assert cli.main(["roundtrip", "--n", "2", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder: give a file path" in capsys.readouterr().err


def test_roundtrip_all_layers_covers_every_layer_of_the_model(tmp_path, monkeypatch, capsys):
    from test_fixedpos_hf import build_tiny_encoder

    folder = build_tiny_encoder("bert", tmp_path / "bert")  # 2 blocks: layers 0, 1, 2
    layers = []

    def record_layer(model, *args, **kwargs):  # no decoder head to train: only the layers matter here
        layers.append(model.layer)
        return []

    monkeypatch.setattr(cli, "roundtrip_report", record_layer)
    assert cli.main(["roundtrip", "--model", str(folder), "--all-layers", "--n", "2", "--device", "cpu"]) == 0
    assert layers == [0, 1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_info_honours_device(capsys):
    assert cli.main(["info", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("fixedpos: error: --device cuda: CUDA is not available")


def test_info_refuses_an_unknown_recipe(capsys):
    assert cli.main(["info", "--recipe", "bogus"]) == 2
    assert "unknown head recipe 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "  \n"])
def test_info_refuses_empty_text(text, capsys):
    assert cli.main(["info", "--text", text]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fixedpos: error: --text is empty") and captured.out == ""


def test_load_names_an_unknown_head_recipe_at_once():
    import fixedpos

    with pytest.raises(ValueError, match="unknown head recipe 'bogus'"):
        fixedpos.load(head="bogus")


def test_version_names_the_distribution_fixedpos_ships_in(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fixedpos (splatopt {importlib.metadata.version('splatopt')})"


def test_every_option_of_both_commands_says_what_it_does_in_its_help():
    """fixedpos info --text, roundtrip --all-layers and --seed showed a bare name in --help; roundtrip --n
    did not say that passages under 8 tokens are skipped (a file of 3 texts reported 2 prompts)."""
    import argparse

    from fixedpos.cli import build_parser as fixedpos_parser
    from splatopt.cli import build_parser as splatopt_parser

    bare = []
    for name, parser in (("fixedpos", fixedpos_parser()), ("splatopt", splatopt_parser())):
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        for command, sub in commands.items():
            bare += [f"{name} {command} {a.option_strings[-1]}" for a in sub._actions
                     if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction)]
    assert bare == []
    roundtrip = next(a for a in fixedpos_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["roundtrip"]
    n_help = next(a.help for a in roundtrip._actions if "--n" in a.option_strings)
    assert "under 8 tokens are skipped" in n_help and "cut to at most 64 tokens" in n_help  # as sample_prompts does


def test_ctrl_c_or_sigterm_ends_a_command_with_one_line_and_the_shells_code(monkeypatch, capsys):
    """A Ctrl-C in a fixedpos command printed a Python traceback (splatopt's commands print one line and exit
    130), and SIGTERM ended it silently. Both command lines now run their commands the same way."""
    import os
    import signal

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "roundtrip_report", ctrl_c)
    try:
        assert cli.main(["roundtrip", "--n", "2", "--device", "cpu"]) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line: the user saw a traceback")
    assert capsys.readouterr().err == "fixedpos: interrupted (Ctrl-C)\n"
    monkeypatch.setattr(cli, "roundtrip_report", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    assert cli.main(["roundtrip", "--n", "2", "--device", "cpu"]) == 143
    assert capsys.readouterr().err == "fixedpos: interrupted (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
