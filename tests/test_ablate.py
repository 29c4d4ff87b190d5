"""Ablation runner: study files and their errors, the grid, kill-and-resume, and the summary's numbers."""

import csv
import json
import os
import platform
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import fixedpos
from splatopt import ablate
from splatopt.cli import main

ROOT = Path(__file__).resolve().parents[1]

# the issue's acceptance study: 2 factors x 2 levels x 2 seeds on 16 prompts, small enough for a CPU
STUDY = """
corpus = "{corpus}"
prompts = 16
max_tokens = 16
seeds = [0, 1]
resample_prompts = true

[base]
n_splats = 0.25
steps = 5
objective = "mse"
record_every = 0

[factors]
kernel = ["gaussian", "erf"]
mode = ["additive", "normalized"]
"""

T_975_1 = 12.706204736174707  # Student t, 97.5 % quantile, 1 degree of freedom (two replicates)


@pytest.fixture(scope="module")
def corpus_file(model, tmp_path_factory):
    """40 short test-split prompts as a .txt corpus (a subprocess then need not parse the stdlib)."""
    prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "test"), 40, max_tokens=16, seed=3)
    path = tmp_path_factory.mktemp("corpus") / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def write_study(folder: Path, text: str) -> Path:
    path = folder / "study.toml"
    path.write_text(text)
    return path


# `splatopt ablate` as the command line runs it, but the process stops itself (SIGSTOP) as its second cell's
# fit begins: a signal sent then lands mid-study at a known point, whatever the machine's speed or load
STOPPED_AT_THE_SECOND_CELL = """
import os, signal, sys
from splatopt import ablate
from splatopt.cli import main
fit_cell, started = ablate._fit_cell, []
def stop_as_the_second_cell_begins(*args, **kwargs):
    started.append(1)
    if len(started) == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    return fit_cell(*args, **kwargs)
ablate._fit_cell = stop_as_the_second_cell_begins
sys.exit(main(sys.argv[1:]))
"""


def start_stopped_at_the_second_cell(study_path: Path, out: Path, stderr: Path) -> tuple[subprocess.Popen, Path]:
    """``splatopt ablate`` started in a subprocess (stderr to the file ``stderr``), returned once it has
    stopped itself as the second cell's fit begins, the first cell's row saved: (the process, its results.jsonl).
    (Polling the file for the first row and then signalling raced the study: on a loaded machine more
    cells, or all, could finish before the signal.)"""
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_AT_THE_SECOND_CELL, "ablate", str(study_path), "--out", str(out),
                             "--device", "cpu", "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr.open("w"))
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # blocks until it stops (or ends)
    assert os.WIFSTOPPED(status), f"ablate ended before its second cell: {stderr.read_text()}"
    return proc, out / "results.jsonl"


def test_killed_study_resumes_without_lost_or_duplicated_rows(tmp_path, corpus_file):
    study_path = write_study(tmp_path, STUDY.format(corpus=corpus_file))
    out = tmp_path / "out"
    proc, results = start_stopped_at_the_second_cell(study_path, out, tmp_path / "stderr.txt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = results.read_bytes()
    whole = before[: before.rfind(b"\n") + 1]
    assert whole == before and whole.count(b"\n") == 1, "killed mid-way: the first cell's row, whole"
    with results.open("ab") as handle:  # what a kill during a write leaves
        handle.write(b'{"cell": "0123", "levels": {"ker')

    with pytest.warns(UserWarning, match="truncated last line"):
        rows = ablate.run(study_path, out, progress=False, device="cpu")
    after = results.read_bytes()
    assert after.startswith(whole), "rows finished before the kill changed"
    study = ablate.Study.load(study_path)
    grid = [cell.key for cell in study.cells()]
    in_file = [json.loads(line)["cell"] for line in after.splitlines()]
    assert len(grid) == 8 and sorted(in_file) == sorted(grid), "every cell exactly once"
    assert [row["cell"] for row in rows] == grid
    assert {(row["seed"], json.dumps(row["levels"])) for row in rows} == {
        (seed, json.dumps({"kernel": k, "mode": m})) for seed in (0, 1) for k in ("gaussian", "erf")
        for m in ("additive", "normalized")}
    assert all(row["prompts"] == 16 and row["corpus"] == str(corpus_file) and row["torch"] and row["splatopt"]
               and row["python"] == platform.python_version() and row["config"]["steps"] == 5 for row in rows)

    rerun = ablate.run(study_path, out, progress=False, device="cpu")  # finished: nothing to fit
    assert [row["cell"] for row in rerun] == grid and results.read_bytes() == after

    # the summary, against a hand computation from the rows
    summary = ablate.summarize(rows)
    metrics = [m for m in ablate.DEFAULT_METRICS if m in rows[0]]
    assert {"token_accuracy", "field_error", "cosine", "seconds"} <= set(metrics)
    assert [(e["kernel"], e["mode"]) for e in summary] == [("gaussian", "additive"), ("gaussian", "normalized"),
                                                          ("erf", "additive"), ("erf", "normalized")]
    for entry in summary:
        a, b = (row for row in rows if row["levels"] == {"kernel": entry["kernel"], "mode": entry["mode"]})
        assert entry["n"] == 2
        for m in metrics:
            assert entry[f"{m}_mean"] == pytest.approx((a[m] + b[m]) / 2)
            # sd of two values is |a - b| / sqrt(2); the interval is t * sd / sqrt(2)
            assert entry[f"{m}_ci95"] == pytest.approx(T_975_1 * abs(a[m] - b[m]) / 2)
    assert any(e["token_accuracy_ci95"] > 0 for e in summary), "seeds resample the prompts: replicates differ"
    markdown = (out / "summary.md").read_text()
    assert markdown == ablate.markdown_table(summary) + "\n" + ablate.SUMMARY_KEY
    first = summary[0]
    assert (f"| gaussian | additive | 2 | {first['token_accuracy_mean']:.4g} ± {first['token_accuracy_ci95']:.2g} |"
            in markdown)
    with (out / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["kernel"], r["mode"], int(r["n"])) for r in table] == [(e["kernel"], e["mode"], 2) for e in summary]
    assert [float(r["cosine_ci95"]) for r in table] == pytest.approx([e["cosine_ci95"] for e in summary])
    assert (out / "study.toml").read_text() == study_path.read_text()


def test_study_files_name_settings_by_fit_keywords_layer_and_optimizer_fields():
    text = """
corpus = "stdlib:test"
prompts = 4
seeds = [0, 1]
[base]
steps = 3
optimizer.lr_mu = 0.2
[factors]
"optimizer.lr_v" = [0.05, 0.1]
[factors.mobility]
fixed = { optimizer.lr_mu = 0.0, optimizer.lr_log_sigma = 0.0 }
mobile = {}
"""
    study = ablate.Study.parse(text)
    assert study.base == {"steps": 3, "optimizer.lr_mu": 0.2}
    nested = ablate.Study.parse(text.replace('"optimizer.lr_v"', "optimizer.lr_v"))
    assert [c.key for c in nested.cells()] == [c.key for c in study.cells()]
    cells = study.cells()
    assert len(cells) == 2 * 2 * 2 and len({c.key for c in cells}) == 8
    fixed = next(c for c in cells if c.levels == {"optimizer.lr_v": 0.1, "mobility": "fixed"})
    assert fixed.settings == {"steps": 3, "optimizer.lr_mu": 0.0, "optimizer.lr_v": 0.1, "optimizer.lr_log_sigma": 0.0}
    mobile = next(c for c in cells if c.levels == {"optimizer.lr_v": 0.1, "mobility": "mobile"})
    assert mobile.settings["optimizer.lr_mu"] == 0.2
    assert {c.prompt_seed for c in cells} == {0}, "without resample_prompts every seed fits the same prompts"
    changed = ablate.Study.parse(text.replace("steps = 3", "steps = 4"))
    assert not {c.key for c in changed.cells()} & {c.key for c in cells}, "a changed base is a new cell"
    assert "layer" in ablate.setting_names() and "optimizer.warmup" in ablate.setting_names()
    assert "seed" not in ablate.setting_names(), "seeds come from the study's seeds list"


@pytest.mark.parametrize("text, message", [
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nkernal = ["erf"]', r"unknown setting 'kernal' \(did you mean 'kernel'\?\).*valid settings are: .*kernel"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\noptimizer.lr_muu = [0.1]', r"unknown setting 'optimizer.lr_muu' \(did you mean 'optimizer.lr_mu'\?\).*optimizer.lr_mu"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nkernel = []', r"factor 'kernel' has no levels"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nkernel = ["erf", "erf"]', r"repeats a level"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors\nkernel = ["erf"]', r"malformed TOML"),
    ('prompts = 4', r"missing 'corpus'"),
    ('corpus = "stdlib:test"\nprompts = 0', r"prompts = 0 must be an integer >= 1"),
    ('corpus = "stdlib:test"\nprompts = 4\nseeds = []', r"seeds = \[\] must be a non-empty list"),
    ('corpus = "stdlib:test"\nprompts = 4\nsteps = 3', r"unknown top-level key\(s\) \['steps'\]"),
    ('corpus = "stdlib:test"\nprompts = 4\n[base]\noptimizer.lr_mu = -1.0', r"lr_mu=-1.0 must be a finite number >= 0"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nsteps = [1, 2]\n[factors.budget]\nsmall = { steps = 1 }',
     r"'budget' and 'steps' both set 'steps'|'steps' and 'budget' both set 'steps'"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors.method]\nx = { density = { name = "budget", relocate_fracton = 0.1 } }',
     r"configuration .*relocate_fracton"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors.method]\nx = { init = { name = "grid", sigma = 1.0 } }', r"init=.*sigma"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors.method]\nx = { density = "adaptve" }', r"density='adaptve'"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors.method]\nx = { basis = "fft" }', r"basis='fft'"),
    ('corpus = "stdlib:valid"\nprompts = 4', r"corpus = 'stdlib:valid'.*stdlib:validation"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nkernel = ["gaussian", "box"]', r"kernel='box'"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nsteps = [2, -1]', r"steps=-1"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nn_splats = [0.25, 0]', r"n_splats=0"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nlayer = [2, "3"]', r"layer='3'"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nmode = ["additiv"]', r"mode='additiv'"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\nobjective = ["mse+cee"]', r"cee"),
    ('corpus = "stdlib:test"\nprompts = 4\n[factors]\noptimizer.schedule = ["cosin"]', r"cosin"),
])
def test_bad_studies_are_refused_with_the_key_and_the_fix(text, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ablate.Study.parse(text, source="bad.toml")


@pytest.mark.parametrize("setting, message", [
    ('dtype = "float17"', r"dtype = 'float17' is not a torch dtype"),
    ('dtype = "float16"', r"dtype=torch.float16: fit runs in torch.float32"),
    ('record_every = "5"', r"record_every='5' must be an int >= 0"),
    ("batch_size = 0", r"batch_size=0"),
    ("truncate = -1.0", r"truncate=-1.0"),
    ('varpro = "yes"', r"varpro='yes': give True or False"),
    ('fused_ce = "no"', r"fused_ce='no'"),
    ("init = 3", r"init must be a name"),
    ("density = 3", r"density must be a name"),
    ("model = 3", r"model=3: give a model name"),
    ("optimizer = 3", r"optimizer = 3: set the inner optimizer's fields one by one"),
])
def test_a_bad_value_in_any_level_is_refused_when_the_study_is_read_not_at_its_cell(setting, message):
    """These passed Study.parse and failed at their cell's fit (dtype) or silently ran (varpro = "yes"
    is truthy), after every earlier cell of the grid had been fitted."""
    text = f'corpus = "stdlib:test"\nprompts = 4\n[factors.variant]\nplain = {{}}\nbad = {{ {setting} }}\n'
    with pytest.raises((ValueError, TypeError), match=message):
        ablate.Study.parse(text, source="bad.toml")


@pytest.mark.parametrize("text, message", [
    ("[base]\nseed = 1", r"\[base\]: 'seed' cannot be set here: seeds come from the study's top-level seeds = \[0, 1, 2\]"),
    ("[factors]\nseed = [0, 1]", r"'seed' cannot be set here: seeds come from .*seeds = \["),
    ('[base]\ndevice = "cuda"', r"'device' cannot be set here: .*--device cuda"),
    ("[base]\nseeds = [0, 1]", r"'seeds' is a top-level key of the study: write seeds = \.\.\. above \[base\]"),
    ("[base]\nprogress = false", r"'progress' cannot be set here: .*--quiet"),
    ("[base]\nfrozen_steps = 3", r"'frozen_steps' cannot be set here: .*splatopt.edit"),
])
def test_settings_the_runner_sets_are_refused_with_where_they_come_from(text, message):
    """seed is one of fit's keywords, so "unknown setting 'seed'" (with a list of valid settings that lacked
    it) sent the user looking for a typo; the message now says seeds = [...] sets it, and --device the device."""
    with pytest.raises(ValueError, match=message):
        ablate.Study.parse(f'corpus = "stdlib:test"\nprompts = 4\n{text}\n', source="bad.toml")
    assert set(ablate.RUNNER_SET) == set(ablate.RUNNER_ARGS), "every runner argument says what sets it"


def test_a_results_file_that_is_not_utf8_or_a_study_copy_that_is_not_toml_is_named(tmp_path, corpus_file):
    """A results.jsonl row of non-UTF-8 bytes raised a bare UnicodeDecodeError; an unreadable study.toml
    beside results was reported as a different study differing in every key."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'\xff\xfe{"cell": "a"}\n{"cell": "b"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:1 is not a result row"):
        ablate.read_rows(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.toml").write_text("garbage [[[")
    (out / "results.jsonl").write_text(json.dumps({"cell": "feedfacefeedface", "levels": {}}) + "\n")
    study = write_study(tmp_path, STUDY.format(corpus=corpus_file))
    with pytest.raises(ValueError, match=r"study.toml is not valid TOML, so the study whose results .* is unknown"):
        ablate.run(study, out, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"--out .*study.toml: is a file; give a folder"):
        ablate.run(study, study, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"rows\[0\] has no 'levels'"):
        ablate.summarize([{"cell": "x", "token_accuracy": 1.0}])


def test_levels_may_set_init_and_density_as_tables():
    text = """
corpus = "stdlib:validation"
prompts = 4
[factors.method]
splats = {}
wide = { init = { name = "grid", sigma_scale = 1.0 } }
budget = { density = { name = "budget", relocate_fraction = 0.05, start = 50 } }
grid = { basis = "fixed-grid", optimizer.lr_v = 0.2 }
"""
    study = ablate.Study.parse(text)
    settings = {c.levels["method"]: c.settings for c in study.cells()}
    assert settings["wide"]["init"] == {"name": "grid", "sigma_scale": 1.0}
    assert settings["budget"]["density"] == {"name": "budget", "relocate_fraction": 0.05, "start": 50}
    assert settings["grid"] == {"basis": "fixed-grid", "optimizer.lr_v": 0.2}
    assert len({c.key for c in study.cells()}) == 4


def test_a_dry_run_checks_what_a_run_would_check_first(tmp_path, capsys, corpus_file):
    """A dry run passed layer = 99 and a missing corpus, which the run then refused."""
    base = f'corpus = "{corpus_file}"\nprompts = 2\nmax_tokens = 16\n[base]\nsteps = 0\nrecord_every = 0\n[factors]\n'
    for factor, message in (("layer = [2, 99]", "layer = 99"), ("n_splats = [2, 40]", "n_splats=40 exceeds prompt")):
        assert main(["ablate", str(write_study(tmp_path, base + factor + "\n")), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    assert main(["ablate", str(write_study(tmp_path, base + "n_splats = [2, 3]\n")), "--dry-run"]) == 0
    assert "checked: every cell's model" in capsys.readouterr().out


def test_the_cli_reports_a_bad_study_without_a_traceback(tmp_path, capsys):
    path = write_study(tmp_path, 'corpus = "stdlib:test"\nprompts = 4\n[factors]\nkernal = ["erf"]\n')
    assert main(["ablate", str(path), "--dry-run"]) == 2
    assert "unknown setting 'kernal'" in capsys.readouterr().err
    assert main(["ablate", str(tmp_path / "missing.toml"), "--dry-run"]) == 2


def test_a_dry_run_into_a_folder_not_started_yet_reports_no_cells_done(tmp_path, capsys):
    # it used to fail with "no results file ...: run the study with --out <the parent folder>"
    path = write_study(tmp_path, 'corpus = "stdlib:test"\nprompts = 4\n[factors]\nkernel = ["gaussian", "erf"]\n')
    for out in (tmp_path / "not-yet", tmp_path):  # a folder that does not exist, and one with no results.jsonl
        assert main(["ablate", str(path), "--dry-run", "--out", str(out)]) == 0
        assert f"{out}: 0 of these cells are done" in capsys.readouterr().out


def test_resuming_into_another_studys_folder_is_refused_unless_forced(tmp_path, corpus_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.toml").write_text(STUDY.format(corpus=corpus_file))
    (out / "results.jsonl").write_text(json.dumps({"cell": "feedfacefeedface", "levels": {}}) + "\n")
    other = write_study(tmp_path, f'corpus = "{corpus_file}"\nprompts = 2\n[base]\nsteps = 0\nrecord_every = 0\n')
    with pytest.raises(ValueError, match=r"different study .*differs in \['base', 'factors', 'max_tokens', 'prompts', .*--force"):
        ablate.run(other, out, progress=False, device="cpu")
    assert main(["ablate", str(other), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    with pytest.warns(UserWarning, match="1 row\\(s\\) belong to no cell"):
        rows = ablate.run(other, out, progress=False, device="cpu", force=True)
    assert len(rows) == 1 and rows[0]["prompts"] == 2
    assert (out / "study.toml").read_text() == other.read_text()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2, "the old row is kept in the file"
    assert ablate.read_rows(out) == rows, "but read_rows leaves it out, as run does"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="no study.toml"):
        ablate.run(other, fresh, progress=False, device="cpu")


def test_a_damaged_row_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell": "a"}\nnot json\n{"cell": "b"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2 is not a result row"):
        ablate.read_rows(path)
    path.write_text('{"cell": "a"}\n{"cell": "b"}')  # whole last row without its newline: kept
    assert [r["cell"] for r in ablate.read_rows(tmp_path)] == ["a", "b"]


@pytest.mark.parametrize("text", ["garbage with no newline", '{"name": "someone else\'s file"}', "[1, 2", '{"cel}'])
def test_a_last_line_that_is_not_the_start_of_a_row_is_refused_not_truncated(tmp_path, text):
    """A results.jsonl whose unterminated last line was not a row cut short (plain text, a whole JSON
    value of another kind) was taken for a killed write and truncated away on resume: someone else's
    file destroyed. Now it is refused, naming the file, and left as it was."""
    study_path = write_study(tmp_path, 'corpus = "stdlib:test"\nprompts = 2\n[base]\nsteps = 0\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.toml").write_bytes(study_path.read_bytes())  # the same study: a resume
    results = out / "results.jsonl"
    for before in ("", '{"cell": "a"}\n'):
        results.write_text(before + text)
        with pytest.raises(ValueError, match=r"results.jsonl: its last line is neither a result row nor the start of one"):
            ablate.run(study_path, out, progress=False, device="cpu")
        assert results.read_text() == before + text
    for cut in ('{"cell": "0123", "lev', '{"ce'):  # a killed write: dropped with a warning, as before
        (tmp_path / "cut").mkdir(exist_ok=True)  # no study.toml beside it: all rows are read
        (tmp_path / "cut" / "results.jsonl").write_text('{"cell": "a"}\n' + cut)
        with pytest.warns(UserWarning, match="dropping a truncated last line"):
            assert [r["cell"] for r in ablate.read_rows(tmp_path / "cut")] == ["a"]


def test_prompt_sets_are_disjoint_and_a_short_corpus_is_refused(model, corpus_file):
    study = ablate.Study.parse(f'corpus = "{corpus_file}"\nprompts = 5\nprompt_sets = 3\nmax_tokens = 16\n')
    sets = ablate._prompt_sets(study, model, 0)
    assert [len(s) for s in sets] == [5, 5, 5] and len({p for s in sets for p in s}) == 15
    assert {(c.seed, c.prompt_set) for c in study.cells()} == {(0, 0), (0, 1), (0, 2)}
    too_many = ablate.Study.parse(f'corpus = "{corpus_file}"\nprompts = 30\nprompt_sets = 2\nmax_tokens = 16\n')
    with pytest.raises(ValueError, match=r"gives only 40 prompts .* prompts x prompt_sets = 60"):
        ablate._prompt_sets(too_many, model, 0)


def test_summary_of_one_replicate_has_no_interval(tmp_path):
    rows = [{"levels": {"kernel": "erf"}, "token_accuracy": 0.5, "cosine": 0.9},
            {"levels": {"kernel": "gaussian"}, "token_accuracy": 0.25, "cosine": 0.8}]
    summary = ablate.summarize(rows)
    assert summary[0] == {"kernel": "erf", "n": 1, "token_accuracy_mean": 0.5, "token_accuracy_ci95": None,
                          "cosine_mean": 0.9, "cosine_ci95": None}
    assert "| erf | 1 | 0.5 ± n/a | 0.9 ± n/a |" in ablate.markdown_table(summary)
    # summary.md says what its numbers are: "0.5476 ± 1.2" said neither what ± is nor that accuracies are fractions
    ablate.write_summary(rows, tmp_path)
    written = (tmp_path / "summary.md").read_text()
    assert written.startswith(ablate.markdown_table(summary))
    assert "mean ± half-width of its 95 % Student-t interval over the n replicates" in written
    assert "token_accuracy and field_error (squared error over the target's squared norm) are fractions" in written
    with pytest.raises(ValueError, match=r"metrics \['tokn_accuracy'\] are in no row.*'token_accuracy'"):
        ablate.summarize(rows, metrics=("tokn_accuracy",))
    with pytest.raises(TypeError, match=r"give a tuple"):
        ablate.summarize(rows, metrics="token_accuracy")
    mixed = summary + ablate.summarize([{"levels": {"mode": "normalized"}, "cosine": 0.7}])  # two studies' factors
    table = ablate.markdown_table(mixed)
    assert "| kernel | mode | n |" in table and "| – | normalized | 1 | n/a | 0.7 ± n/a |" in table


def test_identical_replicates_are_flagged_in_the_summary_not_shown_as_certainty(tmp_path):
    """The default grid start is deterministic: seeds [0, 1, 2] on one prompt set repeat one fit, and the
    summary printed "0.5733 ± 0", which reads as certainty. The numbers stay; the table says why."""
    same = {"token_accuracy": 0.5733, "field_error": 0.1, "cosine": 0.9}
    rows = [{"levels": {"kernel": "gaussian"}, "seed": s, **same, "seconds": 1.0 + s} for s in range(3)]  # timings differ
    rows += [{"levels": {"kernel": "erf"}, "seed": s, **same, "token_accuracy": 0.5 + 0.01 * s, "seconds": 1.0} for s in range(3)]
    rows += [{"levels": {"kernel": "box"}, **same}]
    summary = ablate.summarize(rows)
    assert [e.get("identical_replicates") for e in summary] == [True, False, None], "n = 1 has no replicates to compare"
    assert summary[0]["token_accuracy_mean"] == pytest.approx(0.5733) and summary[0]["token_accuracy_ci95"] == pytest.approx(0)
    assert ablate.identical_configurations(summary) == ["kernel=gaussian"]
    table = ablate.markdown_table(summary)
    assert "| gaussian | 3 | 0.5733 ± 0 (identical replicates) | 0.1 ± 0 (identical replicates) |" in table
    assert "| erf | 3 | 0.51 ± " in table and "(identical replicates) |" not in table.split("| erf |")[1].split("\n")[0]
    assert "prompt_sets" in table and "resample_prompts = true" in table and "jitter = 0.5" in table
    ablate.write_summary(rows, tmp_path)
    with (tmp_path / "summary.csv").open() as handle:
        table_rows = list(csv.DictReader(handle))
    assert [r["identical_replicates"] for r in table_rows] == ["True", "False", ""]
    assert float(table_rows[0]["token_accuracy_mean"]) == pytest.approx(0.5733)
    assert ablate.markdown_table(ablate.summarize(rows[3:])).count("identical replicates") == 0


def test_a_study_whose_seeds_repeat_one_fit_warns_once_naming_the_fix(tmp_path, corpus_file):
    text = (f'corpus = "{corpus_file}"\nprompts = 2\nmax_tokens = 16\nseeds = [0, 1]\n'
            '[base]\nn_splats = 0.25\nsteps = 1\nobjective = "mse"\nrecord_every = 0\n[factors]\nmode = ["additive", "normalized"]\n')
    study = write_study(tmp_path, text)
    with pytest.warns(UserWarning) as caught:
        rows = ablate.run(study, tmp_path / "out", progress=False, device="cpu")
    warned = [str(w.message) for w in caught if "identical" in str(w.message)]
    assert len(warned) == 1, "one warning per study"
    assert "all 2 configurations gave identical metrics" in warned[0] and "seeds [0, 1]" in warned[0]
    assert "prompt_sets = 3" in warned[0] and "resample_prompts = true" in warned[0] and 'jitter = 0.5' in warned[0]
    assert rows[0]["token_accuracy"] == rows[1]["token_accuracy"]
    assert "(identical replicates)" in (tmp_path / "out" / "summary.md").read_text()

    (tmp_path / "sets").mkdir()
    sets = write_study(tmp_path / "sets", text.replace("seeds = [0, 1]", "seeds = [0]\nprompt_sets = 2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disjoint prompt sets: the replicates differ, no warning
        ablate.run(sets, tmp_path / "sets_out", progress=False, device="cpu")
    assert "identical" not in (tmp_path / "sets_out" / "summary.md").read_text()


def test_results_rows_are_strict_json_and_a_diverged_replicate_shows_in_the_mean(tmp_path):
    path = tmp_path / "results.jsonl"
    for seed, error in ((0, 0.25), (1, float("nan")), (2, float("inf"))):
        ablate._append_row(path, {"cell": str(seed), "levels": {"kernel": "erf"}, "seed": seed, "field_error": error,
                                  "settings": {"optimizer.clip": float("inf")}, "cosine": 0.5})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    rows = [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]  # what jq or R would read
    assert [r["field_error"] for r in rows] == [0.25, None, None] and rows[0]["settings"] == {"optimizer.clip": None}
    entry = ablate.summarize(ablate.read_rows(path), metrics=("field_error", "cosine"))[0]
    assert entry["n"] == 3 and entry["cosine_mean"] == 0.5
    assert entry["field_error_mean"] != entry["field_error_mean"], "a NaN replicate must not vanish from the mean"


def test_an_infinite_level_keeps_its_label_in_run_and_read_rows_though_results_jsonl_writes_null(tmp_path, corpus_file):
    # optimizer.clip = inf (no clipping) is a valid level; strict JSON writes it as null, but the
    # returned rows and summary.md must still name the configuration inf, not None, fresh and resumed
    study_path = write_study(tmp_path, f'corpus = "{corpus_file}"\nprompts = 2\nmax_tokens = 16\n'
                             '[base]\nn_splats = 0.25\nsteps = 1\nobjective = "mse"\nrecord_every = 0\n'
                             '[factors]\noptimizer.clip = [1.0, inf]\n')
    out = tmp_path / "out"
    for _ in range(2):  # the run, then a resume that reads every row back from results.jsonl
        rows = ablate.run(study_path, out, progress=False, device="cpu")
        assert [row["levels"]["optimizer.clip"] for row in rows] == [1.0, float("inf")]
        assert "| inf |" in (out / "summary.md").read_text() and "None" not in (out / "summary.md").read_text()
    assert sorted(row["levels"]["optimizer.clip"] for row in ablate.read_rows(out)) == [1.0, float("inf")]


def test_summary_files_take_rows_whose_factors_differ(tmp_path):
    rows = [{"levels": {"kernel": "erf"}, "cosine": 0.9}, {"levels": {"mode": "normalized"}, "cosine": 0.7}]
    ablate.write_summary(rows, tmp_path, metrics=("cosine",))
    with (tmp_path / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["kernel"], r["mode"], r["cosine_mean"]) for r in table] == [("erf", "", "0.9"), ("", "normalized", "0.7")]


def test_a_folder_given_as_the_study_points_at_its_study_file(tmp_path):
    (tmp_path / "study.toml").write_text('corpus = "stdlib:test"\nprompts = 4\n')
    with pytest.raises(ValueError, match=r"is a folder: give a study file .*study.toml is the copy"):
        ablate.Study.load(tmp_path)


def test_to_dataframe_needs_pandas_only_when_called():
    rows = [{"cell": "a", "levels": {"kernel": "erf"}, "token_accuracy": 0.5}]
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            ablate.to_dataframe(rows)
    else:
        frame = ablate.to_dataframe(rows)
        assert list(frame["kernel"]) == ["erf"] and list(frame["token_accuracy"]) == [0.5]


ISSUE_STUDIES = {"kernel_mode", "objective_weights", "layer", "mobility", "init_steps"}


@pytest.mark.parametrize("path", sorted((ROOT / "figures" / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_studies_parse_and_dry_run(path, capsys, monkeypatch):
    # the pre-flight samples every prompt set (seconds a study); its own tests cover it
    monkeypatch.setattr(ablate, "preflight", lambda study, todo=None: {})
    study = ablate.Study.load(path)
    assert study.factors and len(study.seeds) * study.prompt_sets >= 1
    if study.corpus.startswith("figures/corpora/"):  # a small text shipped in the repo: as many prompts as it holds
        assert (ROOT / study.corpus).is_file()
    else:
        assert study.corpus in ("stdlib:test", "stdlib:validation", "licenses") and study.prompts >= 256
    if path.stem in ISSUE_STUDIES:  # the issue's studies: test split, 2-3 replicates, around N = L/4
        assert study.corpus == "stdlib:test" and 2 <= len(study.seeds) * study.prompt_sets <= 3
        assert study.base.get("n_splats") == 0.25
        # their starts are deterministic (grid or tokens, no jitter, no density): seeds would repeat one fit, so
        # the replicates are disjoint prompt sets, and 3 sets of 256 prompts fit in stdlib:test's 965 passages
        assert all("jitter" not in str(s.get("init", "")) and "density" not in s for s in study.configurations().values())
        assert study.seeds == [0] and study.prompt_sets == 3 and study.prompts == 256
    if path.stem.endswith("_selection"):  # settings are selected on the validation split, never on the test split
        assert study.corpus == "stdlib:validation"
    assert main(["ablate", str(path), "--dry-run"]) == 0
    assert f"{len(study.cells())} cells = " in capsys.readouterr().out


def test_the_issue_asks_for_these_studies():
    names = {p.stem for p in (ROOT / "figures" / "studies").glob("*.toml")}
    assert {"kernel_mode", "objective_weights", "layer", "mobility", "init_steps"} <= names


def test_the_readme_example_study_parses():
    section = (ROOT / "README.md").read_text().split("## Ablation studies", 1)[1]
    study = ablate.Study.parse(section.split("```toml\n", 1)[1].split("```", 1)[0], source="README.md")
    assert len(study.cells()) == 2 * 2 * 2 * 3


def test_a_layer_the_model_lacks_fails_before_the_first_cell(tmp_path, corpus_file):
    study = write_study(tmp_path, f'corpus = "{corpus_file}"\nprompts = 2\n[base]\nsteps = 0\nrecord_every = 0\n'
                                  '[factors]\nlayer = [2, 7]\n')
    with pytest.raises(ValueError, match=r"layer = 7: layer=7 is out of range"):
        ablate.run(study, tmp_path / "out", progress=False, device="cpu")
    assert not (tmp_path / "out" / "results.jsonl").exists() or not (tmp_path / "out" / "results.jsonl").read_text()


def test_a_study_that_failed_before_its_first_cell_can_be_corrected_in_place(tmp_path, corpus_file):
    out = tmp_path / "out"
    broken = write_study(tmp_path, 'corpus = "missing.txt"\nprompts = 2\n[base]\nsteps = 0\nrecord_every = 0\n')
    with pytest.raises(FileNotFoundError):
        ablate.run(broken, out, progress=False, device="cpu")
    fixed = write_study(tmp_path, f'corpus = "{corpus_file}"\nprompts = 2\n[base]\nsteps = 0\nrecord_every = 0\n')
    assert len(ablate.run(fixed, out, progress=False, device="cpu")) == 1, "no --force needed: there were no results"


@pytest.mark.parametrize("factor, message", [
    ('n_splats = [2, 40]', r"configuration \{'n_splats': 40\}.*n_splats=40 exceeds prompt"),
    ('init = ["grid", "learned"]\nlayer = [2, 3]', r"configuration \{'init': 'learned', 'layer': 3\}.*layer 3"),
])
def test_a_setting_that_would_fail_midway_is_refused_before_the_first_cell(factor, message, tmp_path, corpus_file):
    """The n_splats = 2 cells ran, then n_splats = 40 failed on a short prompt; the grid cells of both
    layers ran, then the learned start of layer 3 (none ships) failed."""
    text = STUDY.format(corpus=corpus_file).split("[factors]")[0].replace("n_splats = 0.25\n", "") + "[factors]\n" + factor + "\n"
    study = write_study(tmp_path, text.replace("seeds = [0, 1]", "seeds = [0]"))
    with pytest.raises(ValueError, match=message + ".*nothing was run"):
        ablate.run(study, tmp_path / "out", progress=False, device="cpu")
    assert not (tmp_path / "out" / "results.jsonl").exists() or not (tmp_path / "out" / "results.jsonl").read_text()


def test_ctrl_c_says_which_cells_are_kept_exits_130_and_the_rerun_redoes_only_the_cut_cell(tmp_path, corpus_file, capsys,
                                                                                           monkeypatch):
    """Ctrl-C printed a traceback into fit's autograd and nothing of what was kept or how to go on."""
    study_path = write_study(tmp_path, STUDY.format(corpus=corpus_file))
    out = tmp_path / "out"
    fit_cell, fitted = ablate._fit_cell, []

    def ctrl_c_in_cell_3(*args, **kwargs):
        fitted.append(args[1].key)
        if len(fitted) == 3:
            raise KeyboardInterrupt
        return fit_cell(*args, **kwargs)

    monkeypatch.setattr(ablate, "_fit_cell", ctrl_c_in_cell_3)
    try:
        code = main(["ablate", str(study_path), "--out", str(out), "--device", "cpu", "--quiet"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command: a traceback, and nothing said of the cells kept")
    assert code == 130
    err = capsys.readouterr().err
    assert f"ablate: interrupted; 2 of 8 cells are saved in {out / 'results.jsonl'}" in err and "run the same command" in err
    assert "Traceback" not in err and err.rstrip().endswith("splatopt: interrupted (Ctrl-C)")
    monkeypatch.setattr(ablate, "_fit_cell", fit_cell)
    fitted_again = []
    monkeypatch.setattr(ablate, "_fit_cell", lambda *a, **k: fitted_again.append(a[1].key) or fit_cell(*a, **k))
    assert main(["ablate", str(study_path), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert fitted_again[0] == fitted[2] and len(fitted_again) == 6, "the two saved cells are skipped, the cut one redone"
    assert sorted(json.loads(line)["cell"] for line in (out / "results.jsonl").read_text().splitlines()) == sorted(
        c.key for c in ablate.Study.load(study_path).cells())


def test_sigterm_mid_cell_ends_the_study_as_ctrl_c_does(tmp_path, corpus_file):
    """A batch scheduler's SIGTERM killed the study silently (no word of what was saved); it must end it
    as Ctrl-C does: the finished cells kept, a line saying so, exit status 143 (128 + SIGTERM)."""
    study_path = write_study(tmp_path, STUDY.format(corpus=corpus_file))
    out = tmp_path / "out"
    proc, results = start_stopped_at_the_second_cell(study_path, out, tmp_path / "stderr.txt")
    proc.send_signal(signal.SIGTERM)  # pending while stopped: delivered in the second cell once it continues
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_bytes()
    rows = results.read_text().splitlines()
    assert proc.returncode == 143, err.decode()
    assert "ablate: interrupted; 1 of 8 cells are saved" in err.decode() and b"Traceback" not in err
    assert len(rows) == 1 and json.loads(rows[0])["cell"]


def test_an_interrupt_right_after_a_row_is_written_counts_that_row_as_saved(tmp_path, corpus_file, monkeypatch, capsys):
    """CI caught SIGTERM landing between the row's write and its bookkeeping: the message said 0 cells were
    saved while results.jsonl held one, so a user would re-run a cell that was already kept."""
    study_path = write_study(tmp_path, STUDY.format(corpus=corpus_file))
    out = tmp_path / "out"
    written = ablate._append_row

    def write_then_interrupt(path, row):
        written(path, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "_append_row", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ablate.run(study_path, out, progress=False, device="cpu")
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert "ablate: interrupted; 1 of 8 cells are saved" in capsys.readouterr().err


def test_a_forced_study_cut_short_leaves_no_summary_of_the_study_before_it(tmp_path, corpus_file, monkeypatch):
    """After --force, summary.md and summary.csv still held the previous study's table until the new study
    finished, and for good if it was interrupted: beside the new study.toml they read as its results."""
    out = tmp_path / "out"
    first = write_study(tmp_path, f'corpus = "{corpus_file}"\nprompts = 2\nmax_tokens = 16\n[base]\nsteps = 2\n'
                                  'record_every = 0\nobjective = "mse"\n')
    ablate.run(first, out, progress=False, device="cpu")
    assert (out / "summary.md").is_file()
    second = tmp_path / "second.toml"
    second.write_text(first.read_text() + '[factors]\nkernel = ["gaussian", "erf"]\n')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "_fit_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablate.run(second, out, progress=False, device="cpu", force=True)
    assert not (out / "summary.md").exists() and not (out / "summary.csv").exists()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ablate.run(second, out, progress=False, device="cpu", force=True)
    assert "| gaussian |" in (out / "summary.md").read_text()


def test_a_study_shows_each_cells_fit_progress_under_its_own_bar(tmp_path, corpus_file, capsys):
    """The runner turned the fit's bar off, so a long cell (many prompts, or on a CPU) showed only the
    study's bar, moving once per cell, and looked stalled; --quiet (progress=False) still hides both."""
    one_cell = STUDY.format(corpus=corpus_file).replace('seeds = [0, 1]', 'seeds = [0]').replace(
        'kernel = ["gaussian", "erf"]\nmode = ["additive", "normalized"]', 'kernel = ["gaussian"]')
    ablate.run(write_study(tmp_path, one_cell), tmp_path / "shown", progress=True, device="cpu")
    err = capsys.readouterr().err
    assert "ablate" in err and "fit:" in err and "0/5" in err
    ablate.run(write_study(tmp_path, one_cell), tmp_path / "quiet", progress=False, device="cpu")
    assert "fit:" not in capsys.readouterr().err
