"""Scripted ablation studies: a grid of fit configurations x seeds x prompt sets, resumable.

A study is a TOML file:

    corpus = "stdlib:test"   # fixedpos.load_corpus_spec: stdlib:SPLIT, licenses, or a .txt / .jsonl path
    prompts = 512            # prompts per prompt set, min_tokens..max_tokens tokens each (default 8..64)
    seeds = [0, 1, 2]        # the fit's seed; prompts are drawn with seed 0 for every seed,
                             # or with the fit's seed if resample_prompts = true
    prompt_sets = 1          # disjoint prompt sets; each (configuration, seed, set) is one row
                             # (the default grid start is deterministic: seeds alone repeat one fit,
                             # so replicate with prompt_sets > 1 or resample_prompts = true)

    [base]                   # any keyword of splatopt.fit, plus layer, model (fixedpos.load)
    n_splats = 0.25          # and optimizer.* (InnerOptimizer fields)
    optimizer.lr_mu = 0.2

    [factors]                # the grid is the Cartesian product of the factors' levels
    kernel = ["gaussian", "erf"]
    optimizer.lr_v = [0.05, 0.1]

    [factors.mobility]       # named levels: each level sets several settings at once
    fixed = { optimizer.lr_mu = 0.0, optimizer.lr_log_sigma = 0.0 }
    mobile = {}

``run(study, out_dir)`` fits each cell (all prompts of a set in one batched ``splatopt.fit``) and
appends its row to ``out_dir/results.jsonl``, flushed and fsynced, so a killed run loses at most
the cell it was fitting; running it again resumes. ``summarize(rows)`` gives each configuration's
mean and 95 % Student-t interval over its replicates (seeds x prompt sets).
"""

from __future__ import annotations

import csv
import difflib
import fcntl
import hashlib
import inspect
import io
import itertools
import json
import math
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pandas

from fixedpos.cache import check_output_folder
from fixedpos.corpus import check_corpus_spec

from .bench import device_label
from .fit import fit, versions
from .optim import InnerOptimizer

# fit's arguments that the runner itself sets (seed from `seeds`, device from the caller, optimizer
# from the optimizer.* settings) or that a TOML file cannot hold (frozen is a tensor, for editing)
RUNNER_ARGS = ("texts_or_fields", "seed", "device", "progress", "optimizer", "frozen", "frozen_steps")
STUDY_KEYS = ("description", "corpus", "prompts", "max_tokens", "min_tokens", "prompt_sets", "seeds",
              "resample_prompts", "base", "factors")
ROW_START = b'{"cell": '  # how every results.jsonl row begins (_fit_cell puts the key first, json.dumps' separators)
DEFAULT_METRICS = ("token_accuracy", "field_error", "cosine", "seconds", "floats_per_token")
# metrics that measure the run, not the fit: repeats of one fit differ in them, so they do not tell replicates apart
TIMING_METRICS = ("seconds", "encode_seconds")
# how to replicate a deterministic fit (the default grid start): what the identical-replicates warning and table say
REPLICATE_FIX = ('replicate with disjoint prompt sets (prompt_sets = 3, with seeds = [0]), resampled prompts '
                 '(resample_prompts = true) or a random start (init = { name = "grid", jitter = 0.5 })')
# fit options whose values splatopt.fit.check_options checks: a study checks them all before its first cell
CHECKED_OPTIONS = ("steps", "kernel", "mode", "record_every", "truncate", "basis", "varpro", "frozen_moves",
                   "frozen_v_tolerance", "fused_ce", "fused", "cuda_graphs", "batch_size", "dtype")


def setting_names() -> list[str]:
    """Names a study may set: splatopt.fit's keywords (but RUNNER_ARGS), layer, optimizer.<field>.

    ``model`` and ``layer`` name the field model, ``fixedpos.load(model, layer=layer)``.
    """
    fit_args = [name for name in inspect.signature(fit).parameters if name not in RUNNER_ARGS]
    return fit_args + ["layer"] + [f"optimizer.{f.name}" for f in fields(InnerOptimizer)]


def _flatten(table: dict, where: str) -> dict:
    """Settings table -> flat dict ({"optimizer": {"lr_mu": 0.2}} -> {"optimizer.lr_mu": 0.2}), names checked."""
    flat = {}
    for key, value in table.items():
        if key == "optimizer" and isinstance(value, dict):
            flat.update({f"optimizer.{k}": v for k, v in value.items()})
        elif key == "optimizer":
            raise ValueError(f"{where}: optimizer = {value!r}: set the inner optimizer's fields one by one, e.g. "
                             "optimizer.lr_mu = 0.2 (the fields are InnerOptimizer's)")
        else:
            flat[key] = value
    for key in flat:
        _check_name(key, where)
    return flat


# why a study cannot set fit's RUNNER_ARGS, and what sets them instead
RUNNER_SET = {
    "seed": "seeds come from the study's top-level seeds = [0, 1, 2] (a row per seed), not from [base] or a factor",
    "device": "the device comes from the command line, splatopt ablate STUDY --device cuda (ablate.run(device=...))",
    "texts_or_fields": "the prompts come from the study's top-level corpus, prompts, prompt_sets, min_tokens and max_tokens",
    "progress": "the runner sets it (splatopt ablate --quiet hides the progress bar)",
    "optimizer": "set the inner optimizer's fields one by one, e.g. optimizer.lr_mu = 0.2",
    "frozen": "freezing splats is for editing (splatopt.edit), which a study does not run",
    "frozen_steps": "freezing splats is for editing (splatopt.edit), which a study does not run",
}


def _check_name(key: str, where: str) -> None:
    if key in RUNNER_SET:
        raise ValueError(f"{where}: {key!r} cannot be set here: {RUNNER_SET[key]}")
    if key in STUDY_KEYS:
        raise ValueError(f"{where}: {key!r} is a top-level key of the study: write {key} = ... above [base]")
    valid = setting_names()
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown setting {key!r}{hint}; valid settings are: {', '.join(valid)}")


def _check_values(settings: dict) -> None:
    """Check the values fit resolves by name before it fits: ``init`` and ``density`` (a name, or a
    table such as ``{ name = "budget", relocate_fraction = 0.05 }`` whose fields must be the
    strategy's), ``objective``, ``model`` and the ``optimizer.*`` fields; and fit's plain options
    (``steps``, ``kernel``, ``mode``, ``basis``, ``dtype``, ``record_every``, ...) with fit's own checks.
    Raises what fit would raise, at parse time, so a study never fails in its middle on a typo."""
    from .density import resolve_density
    from .init import resolve_initializer
    from .fit import check_options
    from .objectives import Objective

    # fit's own checks of its plain options (types and ranges; a TOML dtype read as _fit_cell reads it)
    check_options(**{k: (_dtype(v) if k == "dtype" else v) for k, v in settings.items() if k in CHECKED_OPTIONS})
    if "objective" in settings:
        Objective.parse(settings["objective"])
    n = settings.get("n_splats", 1)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not (n >= 1 if isinstance(n, int) else 0 < n <= 1):
        raise ValueError(f"n_splats={n!r}: give a count >= 1 or a fraction of L in (0, 1]")
    if "layer" in settings and (isinstance(settings["layer"], bool) or not isinstance(settings["layer"], int) or settings["layer"] < 0):
        raise ValueError(f"layer={settings['layer']!r}: give an int >= 0 (0 = embeddings)")
    _optimizer(settings)
    if "init" in settings and settings["init"] != "learned":
        resolve_initializer(settings["init"])  # "learned" is chosen by the study's model, in fit
    if "density" in settings:
        resolve_density(settings["density"])
    if "model" in settings and not isinstance(settings["model"], str):
        raise ValueError(f"model={settings['model']!r}: give a model name (\"minilm-l6\") or a local encoder folder as a string")


def _dtype(value) -> torch.dtype:
    """A study's dtype setting (TOML names it: "float64") as the torch dtype fit takes."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype = {value!r} is not a torch dtype; write \"float32\" or \"float64\"")
    return dtype


def _optimizer(settings: dict) -> InnerOptimizer:
    return InnerOptimizer(**{k.removeprefix("optimizer."): v for k, v in settings.items() if k.startswith("optimizer.")})


@dataclass(frozen=True)
class Cell:
    """One fit of the grid. levels: factor -> level (value, or level name for named levels);
    settings: the base overridden by the levels, flat; key: hash of everything that defines the fit."""

    levels: dict
    settings: dict
    seed: int
    prompt_set: int
    prompt_seed: int
    key: str


@dataclass(frozen=True)
class Study:
    """A parsed study file. base: flat settings; factors: name -> [(level, settings it sets)].

    spec is the parsed TOML (what a resume compares); text is the source, copied to the output folder.
    """

    base: dict
    factors: dict[str, list[tuple[Any, dict]]]
    seeds: list[int]
    corpus: str
    prompts: int
    max_tokens: int
    min_tokens: int
    prompt_sets: int
    resample_prompts: bool
    spec: dict
    text: str
    source: str

    @classmethod
    def load(cls, path: str | Path) -> Study:
        """Read and check a study file (see :meth:`parse`); FileNotFoundError if it does not exist."""
        path = Path(path)
        if path.is_dir():
            hint = f"; {path / 'study.toml'} is the copy a run keeps there" if (path / "study.toml").is_file() else ""
            raise ValueError(f"{path} is a folder: give a study file (.toml){hint}")
        if not path.is_file():
            raise FileNotFoundError(f"study file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"study file {path} is not a text file: give a TOML study file") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<study>") -> Study:
        """Read and check a study's TOML text; errors name ``source``, the key and the fix."""
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{source}: malformed TOML ({err}); see the example studies in figures/studies/") from None
        unknown = sorted(set(spec) - set(STUDY_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown top-level key(s) {unknown}; a study has {', '.join(STUDY_KEYS)}")
        for key in ("corpus", "prompts"):
            if key not in spec:
                raise ValueError(f'{source}: missing {key!r}; e.g. corpus = "stdlib:test" and prompts = 512')

        def count(key: str, default: int, least: int) -> int:
            value = spec.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{source}: {key} = {value!r} must be an integer >= {least}")
            return value

        seeds = spec.get("seeds", [0])
        if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise ValueError(f"{source}: seeds = {seeds!r} must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{source}: seeds = {seeds} repeats a seed; each seed must appear once")
        if not isinstance(spec["corpus"], str):
            raise TypeError(f"{source}: corpus = {spec['corpus']!r} must be a string such as \"stdlib:test\"")
        if not isinstance(spec.get("resample_prompts", False), bool):
            raise TypeError(f"{source}: resample_prompts must be true or false")
        base = _flatten(_table(spec, "base", source), f"{source} [base]")
        factors = {}
        for name, levels in _factor_tables(_table(spec, "factors", source)):
            factors[name] = _levels(name, levels, f"{source} [factors]")
        claimed: dict[str, str] = {}
        for name, levels in factors.items():
            for key in {k for _, settings in levels for k in settings}:
                if key in claimed:
                    raise ValueError(f"{source} [factors]: {name!r} and {claimed[key]!r} both set {key!r}; merge them into one factor")
                claimed[key] = name
        study = cls(
            base=base, factors=factors, seeds=seeds, corpus=spec["corpus"], prompts=count("prompts", 0, 1),
            max_tokens=count("max_tokens", 64, 2), min_tokens=count("min_tokens", 8, 1), prompt_sets=count("prompt_sets", 1, 1),
            resample_prompts=spec.get("resample_prompts", False), spec=spec, text=text, source=source,
        )
        if study.min_tokens > study.max_tokens:
            raise ValueError(f"{source}: min_tokens = {study.min_tokens} exceeds max_tokens = {study.max_tokens}")
        try:
            check_corpus_spec(study.corpus)
        except ValueError as err:
            raise ValueError(f"{source}: corpus = {err}") from None
        for levels, settings in study.configurations().items():
            try:
                _optimizer(settings)  # optimizer values are checked now, not after hours of fitting
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: optimizer settings {settings}: {err}") from None
            try:
                _check_values(settings)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: configuration {levels}: {err}") from None
        return study

    def configurations(self) -> dict[str, dict]:
        """Every configuration of the grid: JSON of its levels -> flat settings, in grid order."""
        out = {}
        for combo in itertools.product(*self.factors.values()):
            levels = dict(zip(self.factors, (label for label, _ in combo)))
            settings = dict(self.base)
            for _, level_settings in combo:
                settings.update(level_settings)
            out[json.dumps(levels)] = settings
        return out

    def cells(self) -> list[Cell]:
        """Every (configuration, seed, prompt set), in grid order."""
        out = []
        for levels_json, settings in self.configurations().items():
            for seed, prompt_set in itertools.product(self.seeds, range(self.prompt_sets)):
                prompt_seed = seed if self.resample_prompts else 0
                identity = {"levels": json.loads(levels_json), "settings": settings, "seed": seed, "prompt_set": prompt_set,
                            "prompt_seed": prompt_seed, "corpus": self.corpus, "prompts": self.prompts,
                            "max_tokens": self.max_tokens, "min_tokens": self.min_tokens}
                key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
                out.append(Cell(json.loads(levels_json), settings, seed, prompt_set, prompt_seed, key))
        return out

    def describe(self) -> str:
        """The grid in words: factors, configurations and the number of cells (what --dry-run prints)."""
        configs = self.configurations()
        lines = [f"study {self.source}: corpus {self.corpus}, {self.prompts} prompts of "
                 f"{self.min_tokens}..{self.max_tokens} tokens x {self.prompt_sets} prompt set(s), seeds {self.seeds}"
                 + (" (prompts resampled per seed)" if self.resample_prompts else "")]
        if self.spec.get("description"):
            lines.append(str(self.spec["description"]))
        lines.append("base: " + (", ".join(f"{k}={v!r}" for k, v in self.base.items()) or "fit's defaults"))
        for name, levels in self.factors.items():
            lines.append(f"factor {name}: " + ", ".join(str(label) for label, _ in levels))
        for i, levels_json in enumerate(configs):
            lines.append(f"  [{i}] " + (", ".join(f"{k}={v}" for k, v in json.loads(levels_json).items()) or "base"))
        n_cells = len(configs) * len(self.seeds) * self.prompt_sets
        lines.append(f"{n_cells} cells = {len(configs)} configurations x {len(self.seeds)} seeds x {self.prompt_sets} prompt set(s)")
        return "\n".join(lines)


def _table(spec: dict, key: str, source: str) -> dict:
    value = spec.get(key, {})
    if not isinstance(value, dict):
        raise TypeError(f"{source}: {key} must be a table ([{key}]), not {type(value).__name__}")
    return value


def _factor_tables(factors: dict):
    """(name, levels) pairs; `optimizer.lr_mu = [...]` (parsed as a nested table) becomes 'optimizer.lr_mu'."""
    for name, levels in factors.items():
        if name == "optimizer" and isinstance(levels, dict):
            yield from ((f"optimizer.{k}", v) for k, v in levels.items())
        else:
            yield name, levels


def _levels(name: str, levels, where: str) -> list[tuple[Any, dict]]:
    """[(level, settings)]: a list of values of setting ``name``, or a table of named levels."""
    if isinstance(levels, list):
        _check_name(name, where)
        out = [(value, {name: value}) for value in levels]
    elif isinstance(levels, dict):
        out = []
        for label, settings in levels.items():
            if not isinstance(settings, dict):
                raise TypeError(f"{where}: level {label!r} of {name!r} must be a table of settings, e.g. {label} = {{ kernel = \"erf\" }}")
            out.append((label, _flatten(settings, f"{where} {name}.{label}")))
    else:
        raise TypeError(f"{where}: {name} = {levels!r} must be a list of levels or a table of named levels")
    if not out:
        raise ValueError(f"{where}: factor {name!r} has no levels; give at least one, e.g. {name} = [...]")
    labels = [json.dumps(label) for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: factor {name!r} repeats a level ({[label for label, _ in out]}); each level must appear once")
    return out


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results.jsonl (or of the results.jsonl in a folder); a truncated last line is dropped with a warning.

    Only the rows of the study beside it (``study.toml``, as :func:`run` writes it) are returned: after
    ``--force`` the file still holds an earlier study's rows, which :func:`run` leaves out too.
    """
    path = Path(path)
    results = path / "results.jsonl" if path.is_dir() else path
    if not results.is_file():
        raise FileNotFoundError(f"no results file {results}: run the study with splatopt ablate STUDY --out {results.parent}")
    rows = _read_results(results)[0]
    study_file = results.parent / "study.toml"
    if study_file.is_file():
        # the cells' own levels too: strict JSON writes an infinite level (optimizer.clip = inf) as null
        levels = {c.key: c.levels for c in Study.load(study_file).cells()}
        rows = [{**r, "levels": levels[r["cell"]]} for r in rows if r["cell"] in levels]
    return rows


def _read_results(path: Path) -> tuple[list[dict], int]:
    """(rows, bytes of the file that hold whole rows). Only the last line may be cut short (a killed write),
    and only a line that begins as a row does (``ROW_START``) is taken for one; other text is refused."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    body, newline, tail = data.rpartition(b"\n")  # tail: what follows the last newline
    rows = []
    for n, line in enumerate(body.split(b"\n") if newline else [], 1):
        if line.strip():
            rows.append(_parse_row(line, f"{path}:{n}"))
    if not tail.strip():
        return rows, len(data)
    try:
        rows.append(_parse_row(tail, f"{path}: last line"))
        return rows, len(data)  # a whole row whose newline was not written: kept, run() adds the newline
    except ValueError:
        # only a write cut short is dropped: the start of a row as _append_row writes it. Anything else
        # (other text, or a whole JSON value that is not a row) says the file is not this study's results,
        # and truncating it would destroy someone else's data
        if not _is_json(tail) and (tail.startswith(ROW_START) or ROW_START.startswith(tail)):
            warnings.warn(f"{path}: dropping a truncated last line ({len(tail)} bytes); its cell runs again")
            return rows, len(body) + len(newline)
        raise ValueError(f"{path}: its last line is neither a result row nor the start of one (a row cut short by a "
                         f"killed write begins {ROW_START.decode()}); it is not an ablation's results file, or it is "
                         "damaged: use another --out, or move the file away") from None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _parse_row(line: bytes, where: str) -> dict:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):  # bytes that are not UTF-8 JSON (json guesses UTF-16 from some)
        row = None
    if not isinstance(row, dict) or "cell" not in row:
        raise ValueError(f"{where} is not a result row; the file is damaged: move it away or delete that line")
    return row


def _append_row(path: Path, row: dict) -> dict:
    """Append ``row`` as one strict-JSON line (NaN and inf as null), fsynced; return it as a resume would read it back."""
    from fixedpos.cache import append_json_line

    return json.loads(append_json_line(path, row, default=str))


def _claim(out: Path, study: Study, force: bool) -> None:
    """Copy the study to out/study.toml; refuse a folder holding another study's results unless ``force``."""
    from fixedpos.cache import atomic_write_bytes

    path = out / "study.toml"
    if path.exists():
        try:
            previous = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError:
            previous = None
        if previous == study.spec:
            return
        results = out / "results.jsonl"
        has_results = results.exists() and results.stat().st_size > 0  # a study that failed before its first cell has none
        if not force and has_results and previous is None:
            raise ValueError(f"{path} is not valid TOML, so the study whose results {out} holds is unknown; restore it, "
                             "use another --out, or pass --force (force=True) to run this study there")
        if not force and has_results:
            changed = sorted(k for k in set(study.spec) | set(previous or {}) if (previous or {}).get(k) != study.spec.get(k))
            raise ValueError(
                f"{out} holds results of a different study ({path} differs in {changed or 'its text'}); use another --out, "
                "or pass --force (force=True) to run this study there: cells whose settings did not change are kept"
            )
    elif (out / "results.jsonl").exists() and not force:
        raise ValueError(f"{out} holds results.jsonl but no study.toml: use another --out, or pass --force to add to it")
    # the summary of the study run there before describes other rows: left in place, it read as this
    # study's until this one finished (never, if it was interrupted). run() writes this study's at its end
    for name in ("summary.md", "summary.csv"):
        (out / name).unlink(missing_ok=True)
    atomic_write_bytes(path, study.text.encode("utf-8"))


def _prompt_sets(study: Study, model, prompt_seed: int) -> list[list[str]]:
    """study.prompt_sets disjoint lists of study.prompts prompts, drawn with ``prompt_seed``."""
    import fixedpos

    wanted = study.prompts * study.prompt_sets
    prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec(study.corpus), wanted, study.max_tokens,
                                      study.min_tokens, seed=prompt_seed)
    if len(prompts) < wanted:
        raise ValueError(f"{study.source}: corpus {study.corpus} gives only {len(prompts)} prompts of {study.min_tokens}.."
                         f"{study.max_tokens} tokens but prompts x prompt_sets = {wanted}; lower prompts or prompt_sets")
    return [prompts[i * study.prompts : (i + 1) * study.prompts] for i in range(study.prompt_sets)]


def preflight(study: Study, todo: list[Cell] | None = None) -> dict[tuple, list[list[str]]]:
    """Check everything the cells ``todo`` (default: all the study's) need that can fail, before the
    first of them runs, so that no study stops midway on a setting: each field model (model, layer),
    the corpus and its prompt sets, the learned initializer of each cell that asks for one, and each
    splat count against the prompts it will fit. ``run`` calls it, and ``splatopt ablate --dry-run``.
    Returns the prompt sets, (model name, prompt seed) -> sets. ValueError naming the setting otherwise."""
    import fixedpos

    from .fit import _resolve_counts
    from .init import resolve_initializer

    todo = study.cells() if todo is None else todo
    prompt_sets: dict[tuple, list[list[str]]] = {}
    lengths: dict[tuple, torch.Tensor] = {}  # (model name, prompt seed, set) -> [P] tokens per prompt
    for cell in todo:
        name, layer = cell.settings.get("model", fixedpos.DEFAULT_MODEL), cell.settings.get("layer")
        try:
            model = fixedpos.load(name, layer=layer)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise ValueError(f"{study.source}: model = {name!r}, layer = {layer!r}: {err}") from None
        key = (model.name, cell.prompt_seed)
        if key not in prompt_sets:
            prompt_sets[key] = _prompt_sets(study, model, cell.prompt_seed)
        try:
            if cell.settings.get("init") == "learned":
                resolve_initializer("learned", model)
            if "n_splats" in cell.settings and cell.settings.get("basis", "splats") == "splats":
                at = (*key, cell.prompt_set)
                if at not in lengths:
                    lengths[at] = model.tokenize(prompt_sets[key][cell.prompt_set]).mask.sum(-1)
                _resolve_counts(cell.settings["n_splats"], lengths[at])
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise ValueError(f"{study.source}: configuration {cell.levels} (settings {cell.settings}): {err}; nothing was "
                             "run") from None
    return prompt_sets


def _fit_cell(study: Study, cell: Cell, prompts: list[str], model, device, progress: bool) -> dict:
    """Fit one cell: its row (see ``run``). progress: the fit's own bar over its steps, under the study's."""
    kwargs = {k: v for k, v in cell.settings.items() if k not in ("layer", "model") and not k.startswith("optimizer.")}
    if "dtype" in kwargs:
        kwargs["dtype"] = _dtype(kwargs["dtype"])
    try:
        # no optimizer.* setting: fit's own choice (the default, or a learned initializer's meta-trained one)
        optimizer = _optimizer(cell.settings) if any(k.startswith("optimizer.") for k in cell.settings) else None
        result = fit(prompts, model, optimizer=optimizer, seed=cell.seed, device=device, progress=progress, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"configuration {cell.levels} (settings {cell.settings}): {err}") from err
    metrics = result.summary()
    floats = getattr(result, "floats_per_token", None)
    if floats is not None:
        metrics.setdefault("floats_per_token", float(torch.as_tensor(floats, dtype=torch.float64).mean()))
    run_device = torch.device(result.config.get("device", "cpu"))
    return {
        # "cell" first: every row begins ROW_START (how a resume tells a row cut short from other text)
        "cell": cell.key, "levels": cell.levels, "seed": cell.seed, "prompt_set": cell.prompt_set,
        **metrics, "encode_seconds": round(result.encode_seconds, 3),
        "settings": cell.settings, "config": result.config, "corpus": study.corpus, "prompt_seed": cell.prompt_seed,
        "max_tokens": study.max_tokens, "min_tokens": study.min_tokens,
        # python too: the stdlib-live corpus is the running interpreter's docstrings, its samples change with the version
        **versions(),
        "device_name": device_label(run_device),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(study: Study | str | Path, out_dir: str | Path, progress: bool = True, device: str | torch.device | None = None, force: bool = False) -> list[dict]:
    """Run every cell of ``study`` not yet in ``out_dir/results.jsonl``; the rows of all its cells, in grid order.

    Writes out_dir/study.toml, results.jsonl (a row per cell, appended and fsynced as each finishes),
    summary.md and summary.csv. progress: a bar over the cells, and each cell's fit's bar over its steps. device: passed to
    fit (None: cuda if available). force: run into a
    folder that holds another study; rows of cells that are unchanged are kept, others ignored.

    A row: ``cell`` (key), ``levels`` (factor -> level), ``seed``, ``prompt_set``; every entry of
    ``FitResult.summary()`` (means over the set's prompts: token_accuracy and field_error as
    fractions, cosine, seconds of fitting, encode_seconds, prompts, tokens, splats...) and
    floats_per_token where the result has it; ``settings`` (the study's), ``config`` (fit's
    resolved configuration), corpus, prompt_seed, max_tokens, min_tokens, splatopt, torch and
    python versions (the stdlib-live corpus is the interpreter's), device_name, and the ``finished`` time.

    Raises, before the first cell runs: the errors of :meth:`Study.load` for a study path; ValueError for
    an ``out_dir`` that cannot be written, holds another study's results (without ``force``) or is being
    written by another run, and for a setting :func:`preflight` refuses.
    """
    from tqdm.auto import tqdm

    import fixedpos

    study = study if isinstance(study, Study) else Study.load(study)
    out = check_output_folder(out_dir, "--out")
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another ablation run is writing to {out}; wait for it or use another --out") from None
        _claim(out, study, force)
        results = out / "results.jsonl"
        rows, whole = _read_results(results)
        if results.exists():
            with results.open("r+b") as handle:
                handle.truncate(whole)
                handle.seek(max(whole - 1, 0))
                if whole and handle.read(1) != b"\n":
                    handle.write(b"\n")
        done: dict[str, dict] = {}  # cell key -> its row
        for row in rows:
            done.setdefault(row["cell"], row)
        cells = study.cells()
        stale = len(set(done) - {c.key for c in cells})
        if stale:
            warnings.warn(f"{results}: {stale} row(s) belong to no cell of this study (an earlier study, --force); they are left out")
        todo = [c for c in cells if c.key not in done]
        prompt_cache = preflight(study, todo)
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="ablate", unit="cell", disable=not progress)
        try:
            for cell in todo:
                bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in cell.levels.items()) + f", seed {cell.seed}")
                model = fixedpos.load(cell.settings.get("model", fixedpos.DEFAULT_MODEL), layer=cell.settings.get("layer"))
                key = (model.name, cell.prompt_seed)
                # the fit's bar too: a long cell (many prompts, or on a CPU) showed nothing but the study's bar
                row = _fit_cell(study, cell, prompt_cache[key][cell.prompt_set], model, device, progress)
                done[cell.key] = _append_row(results, row)
                bar.update()
        except KeyboardInterrupt:
            # Ctrl-C (or SIGTERM, which the command line turns into it) printed a traceback into fit's
            # autograd and nothing of what was kept or how to go on
            bar.close()
            # count what the file holds: the signal can land after a row is written but before `done` records it
            saved_keys = {row["cell"] for row in _read_results(results)[0]}
            saved = sum(c.key in saved_keys for c in cells)
            print(f"ablate: interrupted; {saved} of {len(cells)} cells are saved in {results} (the cell being fitted is "
                  "not); run the same command again to resume", file=sys.stderr)
            raise
        bar.close()
        # the cells' own levels: results.jsonl writes an infinite level (optimizer.clip = inf) as null
        ordered = [{**done[c.key], "levels": c.levels} for c in cells]
        write_summary(ordered, out)
    summary = summarize(ordered)
    identical = identical_configurations(summary)
    if identical:  # one warning per study, naming every such configuration
        named = (f"all {len(summary)} configurations" if len(identical) == len(summary) and len(summary) > 1
                 else "configuration(s) " + "; ".join(f"[{c}]" for c in identical))
        warnings.warn(f"{study.source}: {named} gave identical metrics in every replicate: the fit is deterministic (a start "
                      f"without randomness, as the default grid's), so seeds {study.seeds} on the same prompts repeat one fit and ± 0 is no "
                      f"confidence interval; {REPLICATE_FIX}. summary.md marks them (identical replicates)", stacklevel=2)
    return ordered


def summarize(rows: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[dict]:
    """A dict per configuration (rows with equal levels), first-seen order: its levels, ``n`` (rows:
    seeds x prompt sets), and per metric ``<m>_mean`` and ``<m>_ci95``, the half-width of the 95 %
    Student-t interval (None for one row); for n > 1, ``identical_replicates``: True when every
    replicate gave the same value of every metric but the timings (TIMING_METRICS), i.e. one
    deterministic fit repeated, whose interval of 0 is no measure of certainty (see
    :func:`identical_configurations`). Rows without a metric are left out of its mean; a null
    (results.jsonl's NaN or infinity: a diverged fit) makes it NaN rather than vanish. Of the default
    metrics, those no row has are not reported; a metric asked for by name that no row has is a
    ValueError (a misspelt name would otherwise vanish from the summary), as is a row without
    ``levels``; TypeError for ``metrics`` given as one string, not a tuple."""
    from scipy import stats

    if isinstance(metrics, str):
        raise TypeError(f"metrics={metrics!r}: give a tuple of row keys, e.g. ({metrics!r},)")
    missing = [m for m in metrics if m not in DEFAULT_METRICS and rows and all(m not in row for row in rows)]
    if missing:
        numeric = sorted(k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ValueError(f"metrics {missing} are in no row; the rows' numeric keys are {numeric}")
    unlabelled = next((i for i, row in enumerate(rows) if not isinstance(row, dict) or "levels" not in row), None)
    if unlabelled is not None:
        raise ValueError(f"rows[{unlabelled}] has no 'levels' (factor -> level): give rows as run() or read_rows() return them")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["levels"], sort_keys=True), []).append(row)
    present = [m for m in metrics if any(m in row for row in rows)]
    compared = [m for m in present if m not in TIMING_METRICS]
    out = []
    for group in groups.values():
        entry = {**group[0]["levels"], "n": len(group)}
        identical = len(group) > 1 and bool(compared) and all(
            all(m in row and row[m] is not None and row[m] == group[0].get(m) for row in group) for m in compared)
        for m in present:
            values = [math.nan if row[m] is None else float(row[m]) for row in group if m in row]
            n = len(values)
            mean = sum(values) / n if n else None
            if mean is not None and n > 1:
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
                ci = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
            else:
                ci = None
            entry[f"{m}_mean"], entry[f"{m}_ci95"] = mean, ci
        if len(group) > 1:
            entry["identical_replicates"] = identical
        out.append(entry)
    return out


def identical_configurations(summary: list[dict]) -> list[str]:
    """The configurations of ``summary`` (from :func:`summarize`) whose replicates all gave identical
    metrics, as "factor=level, ..." ("base" for a study without factors)."""
    out = []
    for entry in (e for e in summary if e.get("identical_replicates")):
        factors = list(entry)[: list(entry).index("n")]  # summarize puts the levels before n
        out.append(", ".join(f"{f}={entry[f]}" for f in factors) or "base")
    return out


def markdown_table(summary: list[dict]) -> str:
    """The summary as a Markdown table: the levels, n, and "mean ± ci" per metric (n/a: one replicate;
    "± 0 (identical replicates)", with a note under the table: replicates that repeated one fit)."""
    if not summary:
        return "(no rows)\n"
    # rows of different studies may have different factors and metrics: the union, in first-seen order
    keys = list(dict.fromkeys(k for entry in summary for k in entry))
    factors = list(dict.fromkeys(k for entry in summary for k in list(entry)[: list(entry).index("n")]))
    metrics = [k.removesuffix("_mean") for k in keys if k.endswith("_mean")]

    def cell(entry: dict, m: str) -> str:
        mean, ci = entry.get(f"{m}_mean"), entry.get(f"{m}_ci95")
        if mean is None:
            return "n/a"
        if entry.get("identical_replicates") and m not in TIMING_METRICS:
            return f"{mean:.4g} ± 0 (identical replicates)"
        return f"{mean:.4g} ± " + ("n/a" if ci is None else f"{ci:.2g}")

    lines = ["| " + " | ".join(factors + ["n"] + metrics) + " |", "|" + "---|" * len(factors) + "---:|" * (1 + len(metrics))]
    for entry in summary:
        lines.append("| " + " | ".join([str(entry.get(f, "–")) for f in factors] + [str(entry["n"])] + [cell(entry, m) for m in metrics]) + " |")
    if any(entry.get("identical_replicates") for entry in summary):
        lines += ["", "(identical replicates): every replicate of the configuration gave the same metrics, one deterministic "
                  f"fit repeated, so ± 0 is no confidence interval; {REPLICATE_FIX}."]
    return "\n".join(lines) + "\n"


# under summary.md's table (the report embeds markdown_table with its own caption): what the numbers are, since
# "0.5476 ± 1.2" said neither what ± is nor that the accuracy is a fraction, not %
SUMMARY_KEY = ("mean ± half-width of its 95 % Student-t interval over the n replicates (seeds x prompt sets; n/a: one "
               "replicate). token_accuracy and field_error (squared error over the target's squared norm) are fractions; "
               "seconds: the wall time of one cell's fit.\n")


def write_summary(rows: list[dict], out_dir: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    """Write out_dir/summary.md and summary.csv (empty CI: one replicate; identical_replicates column:
    True where the replicates repeated one fit); return the Markdown table."""
    from fixedpos.cache import atomic_write_bytes

    summary = summarize(rows, metrics)
    table = markdown_table(summary)
    buffer = io.StringIO()
    if summary:
        # rows of different studies may have different factors: the union, factors first (as markdown_table)
        factors = dict.fromkeys(k for entry in summary for k in list(entry)[: list(entry).index("n")])
        columns = list(dict.fromkeys([*factors, "n", *(k for entry in summary for k in entry)]))
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(summary)
    atomic_write_bytes(Path(out_dir) / "summary.md", (table + ("\n" + SUMMARY_KEY if summary else "")).encode("utf-8"))
    atomic_write_bytes(Path(out_dir) / "summary.csv", buffer.getvalue().encode("utf-8"))
    return table


def to_dataframe(rows: list[dict]) -> pandas.DataFrame:
    """The rows as a pandas DataFrame, levels as columns (pandas is optional: ImportError without it)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_dataframe needs pandas, which splatopt does not depend on: pip install pandas") from None
    return pd.DataFrame([{**row["levels"], **{k: v for k, v in row.items() if k != "levels"}} for row in rows])
