"""``splatopt`` command line: fit, show, edit, bench, ablate, meta-train, demo."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from . import __version__

if TYPE_CHECKING:  # fit imports the renderers; a hint needs none of it
    from .fit import FitResult

DEMO_TEXT = (
    "Return a new list containing all items from the iterable in ascending order. "
    "A custom key function can be supplied to customize the sort order."
)


def _device(name: str) -> torch.device:
    from fixedpos.model import resolve_device

    return resolve_device(name, "--device")


def _or(value, default):
    """``value`` unless it was not given (None): a 0 stays 0 and fails validation rather than becoming the default."""
    return default if value is None else value


def _n_splats(text: str) -> float | int:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--splats {text}: give a fraction of L such as 0.25, or a count")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--splats {text}: must be > 0 (a fraction of L such as 0.25, or a count)")
    if value > 1 and value != int(value):  # refused after the model loaded, as n_splats=2.5, not as the flag
        raise argparse.ArgumentTypeError(f"--splats {text}: a count is a whole number (such as {int(value)}), a fraction "
                                         "of L lies in (0, 1] (such as 0.25)")
    return value if value < 1 or "." in text else int(value)


# suffixes that say a file is something other than a fit (besides a figure's): --out refuses them (any other
# name is written as safetensors)
NOT_A_FIT_FILE = (".json", ".jsonl", ".txt", ".csv", ".md", ".toml", ".pt", ".pth", ".pkl", ".npz", ".npy")


def _check_outputs(args) -> None:
    """Refuse an ``--out`` or ``--plot`` that cannot be written before fitting, so no fit is lost to it."""
    from fixedpos.cache import check_output_path, is_folder
    from splatopt.plot import check_figure_path, figure_formats

    out = getattr(args, "out", None)
    if out and is_folder(out):
        raise ValueError(f"--out {out}: is a folder; give a file name such as {Path(out) / 'run.safetensors'}")
    if out:
        check_output_path(out, "--out")
    if getattr(args, "plot", None):
        plot = check_figure_path(args.plot)
        written = plot if plot.suffix else plot.with_suffix(".png")
        if out and written.resolve() == Path(out).expanduser().resolve():
            raise ValueError(f"--out {out} and --plot {args.plot} both write {written}: the figure would replace the fit; "
                             "give them different names")
        if getattr(args, "record_every", None) == 0:  # the plot draws the recorded steps; 0 records the last alone
            raise ValueError("--plot draws the splats' recorded trajectory, and --record-every 0 records only the last step; "
                             "give --record-every 5 (or leave it out)")
    suffix = Path(out).suffix.lower() if out else ""
    figure = bool(suffix) and suffix.lstrip(".") in figure_formats()
    if out and (suffix in NOT_A_FIT_FILE or figure):
        # --out traj.png (meaning --plot) wrote safetensors into a .png and replaced the figure it named
        raise ValueError(f"--out {out}: the fit is written as safetensors, not {suffix}; name it "
                         f"{Path(out).with_suffix('.safetensors')}" + (" (the figure goes to --plot)" if figure else ""))


def _plot_prompt(args, B: int) -> int:
    """The prompt ``--plot`` draws (``--plot-prompt K``, default 0) of a fit of ``B`` prompts; ValueError naming
    the option for a K out of range or given without --plot, before any fitting."""
    k = getattr(args, "plot_prompt", None)
    if k is None:
        return 0
    if not args.plot:
        raise ValueError(f"--plot-prompt {k} picks the prompt that --plot draws: give --plot FILE too")
    if not 0 <= k < B:
        raise ValueError(f"--plot-prompt {k}: the fit holds prompts 0..{B - 1} (counting from 0)")
    return k


def _json_object(text: str, option: str, accepted: str) -> dict:
    """The JSON object given to ``option``; ValueError naming the option and what it ``accepted`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{option} {text!r}: not valid JSON ({err}); give {accepted}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{option} {text!r}: give {accepted}")
    return value


FILE_TEXTS = ("one text per line, or, in a file with blank lines, one per blank-line-separated paragraph (its lines "
              'joined by spaces); a .jsonl file: a {"text": ...} object per line')


def _not_a_path(text: str) -> str:
    """``text`` unless it names a file here (``splatopt fit texts.txt`` fitted the 4 tokens "texts . txt"):
    ValueError pointing at ``--file``, which reads a file's texts."""
    if text.strip() and not any(c.isspace() for c in text.strip()) and Path(text).expanduser().is_file():
        raise ValueError(f"{text!r} is the name of a file here, not a text: to use the texts in it, give --file {text}")
    return text


def _file_texts(path: str) -> list[str]:
    """The texts of ``--file path`` (see FILE_TEXTS); ValueError naming the option for a file that holds none."""
    import fixedpos

    texts = fixedpos.load_text_file(path)
    if not texts:
        what = 'no line with a non-empty "text"' if Path(path).suffix == ".jsonl" else "no text (it is empty or only whitespace)"
        raise ValueError(f"--file {path} holds {what}: put the texts in it, {FILE_TEXTS}")
    return texts


def _save_fit(result: FitResult, out: str) -> Path:
    """Write ``result`` to ``--out``; where that fails after the work, keep what can be kept and say where.

    A prompt that diverged (NaN or inf splats, which FitResult.save refuses) is left out and the others are
    written beside ``out`` as ``NAME.finite.safetensors``; a write that fails (the disk is full, the folder was
    removed or made read-only during the fit) is retried in the temporary folder. Either way the error names
    the file that holds the fit: the command failed, but the minutes of fitting are not lost."""
    import os
    import tempfile

    try:
        return result.save(out)
    except (OSError, ValueError) as err:
        failed = err
    B = result.mask.shape[0]
    diverged = result.splats.nonfinite().cpu() if result.splats is not None else torch.zeros(B, dtype=torch.bool)
    kept = [b for b in range(B) if not diverged[b]]
    if not kept:
        raise ValueError(f"{failed}; every prompt diverged, so there is nothing to keep") from failed
    path = Path(out).expanduser()
    if bool(diverged.any()):
        rescue = path.with_name(f"{path.stem}.finite{path.suffix or '.safetensors'}")
        said, what = f"{failed}", f"the {len(kept)} other prompt(s) ({kept[:8]}{', ...' if len(kept) > 8 else ''} of the fit)"
    else:
        rescue = Path(tempfile.gettempdir()) / f"splatopt-rescued-{os.getpid()}-{path.name}"
        said, what = f"--out {out} could not be written after the fit ({failed})", "the fit"
    try:
        written = (result.select(kept) if len(kept) < B else result).save(rescue)
    except (OSError, ValueError) as err:
        raise type(failed)(f"{said}; keeping {what} in {rescue} failed too ({err})") from failed
    raise type(failed)(f"{said}; {what} kept in {written}: move it where you want it") from failed


PRINTED_PROMPTS = 8  # prompts listed one by one; the summary line covers all


def _print_result(result, listing: str | None = None, limit: int = PRINTED_PROMPTS) -> None:
    """Per prompt (the first ``limit``): counts, token accuracy, relative field error (squared error over the
    target's squared norm), mean cosine and the decoded text; then the means over every prompt. listing: where
    the prompts left out can be read (a command)."""
    from splatopt.fit import counted

    s = result.summary()
    unit = "splats" if s["basis"] == "splats" else f"{s['basis']} terms"
    counts = result.n_terms if result.n_terms is not None else result.splats.counts
    B = len(result.mask)
    for b in range(min(B, limit)):
        L, N = int(result.mask[b].sum()), int(counts[b])
        acc = f"{float(result.token_accuracy[b]):.2%}" if result.token_accuracy is not None else "n/a"
        print(f"[{b}] {counted(N, unit)} / {counted(L, 'tokens')}  token accuracy {acc}  relative field error "
              f"{float(result.field_error[b]):.3f}  cosine {float(result.cosine[b]):.3f}")
        if result.texts:
            print(f"    decoded: {result.texts[b]}")
    if B > limit:  # said, so that a listing cut at 8 does not read as a fit of 8 prompts
        where = f" ({listing})" if listing else ""
        print(f"... and {B - limit} more prompt(s), not listed{where}")
    acc = f"{s['token_accuracy']:.2%}" if "token_accuracy" in s else "n/a"
    means = ", means over prompts" if B > 1 else ""
    print(f"{counted(s['prompts'], 'prompts')}, {counted(s['tokens'], 'tokens')}, {counted(s['terms'], unit)}{means}: "
          f"token accuracy {acc}, relative field error {s['field_error']:.3f}, cosine {s['cosine']:.3f}; "
          f"fit {result.seconds:.2f} s (encode {result.encode_seconds:.2f} s) on {result.config.get('device')}")


def cmd_fit(args) -> int:
    import fixedpos
    import splatopt
    from splatopt.plot import save_figure, trajectory_figure

    _check_outputs(args)
    texts = [_not_a_path(text) for text in args.text]
    if args.file:
        texts += _file_texts(args.file)
    saved = _saved_fit(args.config) if args.config else None
    if not texts and saved is not None and saved.input_texts:
        texts = list(saved.input_texts)  # the saved fit's own texts
    if not texts:
        raise ValueError("give a text to fit, or --file with one text per line")
    plot_prompt = _plot_prompt(args, len(texts))
    optimizer: str | dict | None
    if args.optimizer == "picked":  # the one shipped beside the learned initializer (--init learned)
        optimizer = "picked"
    else:
        optimizer = _json_object(args.optimizer, "--optimizer", "picked or InnerOptimizer fields as a JSON object") if args.optimizer else None
    options = dict(
        n_splats=args.splats, steps=args.steps, objective=args.objective,
        init={"name": "learned", "path": args.init} if args.init.endswith(".safetensors") else args.init,
        optimizer=optimizer, kernel=args.kernel, mode=args.mode, varpro=args.varpro, truncate=args.truncate, seed=args.seed,
        record_every=args.record_every, basis=args.basis,
        density=_json_object(args.density, "--density", 'a strategy name or a JSON object such as {"name": "budget"}')
        if args.density.startswith("{") else args.density,
    )
    model_name, layer = args.model, args.layer
    if saved is not None:  # the saved fit's settings, and over them the options given on this command line
        given = {FIT_FLAGS.get(dest, dest) for dest in (*FIT_FLAGS, *options, "model", "layer")
                 if getattr(args, dest, None) != args.defaults.get(dest)}
        recorded = splatopt.fit_options(saved.config)
        if "optimizer" in given and isinstance(optimizer, dict):  # fields over the recorded optimizer
            options["optimizer"] = {**recorded["optimizer"], **optimizer}
        options = {**recorded, **{k: v for k, v in options.items() if k in given}}
        model_name = args.model if "model" in given else saved.config.get("model") or args.model
        layer = args.layer if "layer" in given else saved.config.get("layer")
    model = fixedpos.load(model_name, layer=layer)
    result = splatopt.fit(texts, model, device=_device(args.device), progress=not args.quiet, **options)
    _print_result(result, listing=f"splatopt show {args.out} --prompts {len(result.mask)} lists them" if args.out
                  else "give --out FILE to keep them, then splatopt show FILE --prompts N")
    if args.out:
        print(f"wrote {_save_fit(result, args.out)}")
    if args.plot and not result.trajectory:  # a fixed basis: nothing moves
        print(f"no trajectory plot: a {result.basis} fit has no moving splats")
    elif args.plot:
        paths = save_figure(trajectory_figure(result, plot_prompt, model), args.plot)
        print("wrote " + ", ".join(map(str, paths)))
    return 0


# fit's subcommand options whose name is not fit's keyword: --splats sets n_splats
FIT_FLAGS = {"splats": "n_splats"}


def _saved_fit(path: str):
    """The fit that ``--config`` names: a saved fit (.safetensors), or a JSON file of a fit's ``config`` (an
    ablation row, with its ``config``, serves too), as a FitResult whose config and texts are read."""
    from splatopt.fit import FitResult

    if not path.endswith(".json"):
        return FitResult.load(path)
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not valid JSON ({err}): give a saved fit (.safetensors) or a fit's "
                         "config as JSON") from None
    config = raw.get("config", raw) if isinstance(raw, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} holds a JSON {type(raw).__name__}, not a fit's config object")
    return SimpleNamespace(config=config, input_texts=None)


def cmd_show(args) -> int:
    import fixedpos
    from splatopt.fit import FitResult
    from splatopt.plot import save_figure, trajectory_figure

    _check_outputs(args)
    if args.prompts < 0:
        raise ValueError(f"--prompts {args.prompts}: give how many prompts' splats to list (0 or more)")
    result = FitResult.load(args.file)
    plot_prompt = _plot_prompt(args, len(result.mask))
    cfg = result.config
    print(f"{args.file}: model {cfg.get('model')} layer {cfg.get('layer')}, objective {cfg.get('objective')}, "
          f"{cfg.get('steps')} steps, kernel {cfg.get('kernel')}, mode {cfg.get('mode')}")
    _print_result(result, listing=f"--prompts {len(result.mask)} lists them", limit=max(PRINTED_PROMPTS, args.prompts))
    s = result.splats
    if s is None:  # a fixed basis: coefficients only
        # FitResult.load refuses a fixed-basis file without coefficients; fit gives every basis floats_per_token
        assert result.coefficients is not None and result.floats_per_token is not None
        print(f"{result.basis} basis: coefficients {tuple(result.coefficients.shape)}, "
              f"{float(result.floats_per_token.mean()):.1f} floats per token")
        return 0
    for b in range(min(len(result.mask), args.prompts)):
        if result.input_texts:
            print(f"[{b}] text: {result.input_texts[b]}")
        print("     slot      mu   sigma  weight   |v|")
        for i in torch.nonzero(s.mask[b]).flatten().tolist():
            print(f"     {i:4d} {float(s.mu[b, i]):7.2f} {float(s.sigma[b, i]):7.2f} {float(s.weight[b, i]):7.3f} "
                  f"{float(s.v[b, i].norm()):6.2f}")
    if args.plot and not result.trajectory:
        print(f"no trajectory plot: a {result.basis} fit has no moving splats")
    elif args.plot:
        model = fixedpos.load(cfg["model"], layer=cfg["layer"]) if cfg.get("model") == fixedpos.DEFAULT_MODEL else None
        print("wrote " + ", ".join(map(str, save_figure(trajectory_figure(result, plot_prompt, model), args.plot))))
    return 0


def _fresh_init(text: str) -> str | list[str]:
    """``--fresh-init``: auto, or initializer names, comma-separated; ValueError naming the option otherwise."""
    from splatopt.init import INITIALIZERS

    if text == "auto":
        return text
    names, known = [name.strip() for name in text.split(",")], sorted(INITIALIZERS) + ["learned"]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--fresh-init {text}: {', '.join(map(repr, unknown))} is not an initializer; give auto, or "
                         f"comma-separated names of {', '.join(known)} (e.g. --fresh-init learned,grid)")
    return names


def _edit_model(args, old):
    """The FieldModel of ``--model``, or None for edit() to load the fit's own; ValueError naming ``--model``
    where the fit's model is a local encoder folder that is not here (a fit keeps only its folder's name)."""
    import fixedpos
    from splatopt.edit import fitted_model_name

    if args.model:
        return fixedpos.load(args.model, layer=old.config.get("layer"))
    if fitted_model_name(old.config) is None:
        name = old.config["model"]
        raise ValueError(f"{args.file} was fitted with the local encoder named {name!r} (a fit keeps only its folder's "
                         f"name, and no folder {name!r} with config.json is here): pass --model PATH, the encoder folder "
                         "it was fitted with")
    return None


def _edit_texts(args, old: FitResult) -> tuple[FitResult, str | list[str]]:
    """(the fit to edit, the new text or texts) from TEXT, ``--prompt`` and ``--file``; ValueError naming them."""
    B = old.mask.shape[0]
    if args.file_texts and (args.text is not None or args.prompt is not None):
        raise ValueError("--file gives one new text per prompt of the fit: leave out TEXT and --prompt with it "
                         "(or give TEXT and --prompt K to edit prompt K alone)")
    if args.file_texts:
        texts = _file_texts(args.file_texts)
        if len(texts) != B:
            raise ValueError(f"--file {args.file_texts} holds {len(texts)} texts, but {args.file} holds {B} prompts: "
                             f"give one new text per prompt ({FILE_TEXTS}), or TEXT with --prompt K to edit one prompt")
        return old, texts
    if args.text is None:
        raise ValueError("give the edited text (TEXT), or --file with one new text per prompt of the fit")
    _not_a_path(args.text)
    if args.prompt is not None:
        if not 0 <= args.prompt < B:
            raise ValueError(f"--prompt {args.prompt}: {args.file} holds prompts 0..{B - 1} (--prompt counts from 0)")
        return old.select(args.prompt), args.text
    if B != 1:
        raise ValueError(f"{args.file} holds {B} prompts: give --prompt K (0..{B - 1}) to edit prompt K alone with TEXT "
                         "(the output then holds its re-fit only), or --file NEW.txt with one new text per prompt "
                         "(and no TEXT)")
    return old, args.text


def _span(text: str | None, offsets, i: int, j: int) -> str | None:
    """The characters of tokens i..j-1 of ``text`` (offsets [L, 2]), quoted; None where the text is not known."""
    if text is None or offsets is None or j <= i:
        return None
    return repr(text[int(offsets[i][0]):int(offsets[j - 1][1])])


def _describe_script(script, old_text=None, old_offsets=None, new_text=None, new_offsets=None) -> str:
    """The edit script's changes in words, with the texts they touch: insert 'sorted' at token 3; delete ...
    (the opcodes [tag, i1, i2, j1, j2] printed as lists said nothing without difflib's manual)."""
    parts = []
    tokens = lambda a, b: f"token {a}" if b - a == 1 else f"tokens {a}-{b - 1}"  # noqa: E731
    for tag, i1, i2, j1, j2 in (op for op in script if op[0] != "equal"):
        old, new = _span(old_text, old_offsets, i1, i2), _span(new_text, new_offsets, j1, j2)
        if tag == "insert":
            parts.append(f"insert {new} at {tokens(j1, j2)} of the new text" if new else f"insert {tokens(j1, j2)} of the new text")
        elif tag == "delete":
            parts.append(f"delete {old} ({tokens(i1, i2)} of the old text)" if old else f"delete {tokens(i1, i2)} of the old text")
        elif old and new:
            parts.append(f"replace {old} with {new} ({tokens(i1, i2)} -> {tokens(j1, j2)})")
        else:
            parts.append(f"replace {tokens(i1, i2)} of the old text with {tokens(j1, j2)} of the new")
    return "; ".join(parts) or "no change"


def _print_edit_record(e: dict, old: FitResult, new: FitResult, b: int = 0) -> None:
    """An edit record in words: the changes (with the texts of ``old`` and ``new`` results' prompt ``b``), the
    splats carried, pruned and spawned, the frozen far ones, and the start kept."""
    texts = {}
    if old.input_texts and new.input_texts:
        texts = dict(old_text=old.input_texts[b], old_offsets=None if old.offsets is None else old.offsets[b].tolist(),
                     new_text=new.input_texts[b], new_offsets=None if new.offsets is None else new.offsets[b].tolist())
    print(f"edit script: {_describe_script(e['script'], **texts)}")
    far = len(e["far_from_edit"])
    frozen = (f"{far} far from the edit, frozen for {e['frozen_steps']} step(s)" if far and e["frozen_steps"]
              else f"{far} far from the edit, free" if far else "none far from the edit")
    tried = e["starts_tried"]
    kept = f"{e['start']} start" + (f" ({e['start_initializer']})" if e["start_initializer"] else "")
    print(f"splats: transported {len(e['transported'])}, pruned {len(e['pruned'])}, spawned {len(e['spawned'])} "
          f"({e.get('splats', '?')} in all; a cold fit of the new text has {e.get('budget', '?')}), {frozen}; kept the {kept}"
          + (", the only one tried" if tried == 1 else f", the best of {tried} starts tried"))


def cmd_edit(args) -> int:
    import splatopt
    from splatopt.plot import (
        edit_trajectory_figure,
        edit_trajectory_series,
        save_figure,
    )

    _check_outputs(args)
    options = {}
    if args.objective:
        options["objective"] = args.objective
    if args.optimizer:
        # fields over edit()'s default: the old fit's, constant schedule
        options["optimizer"] = _json_object(args.optimizer, "--optimizer", "InnerOptimizer fields as a JSON object")
    if args.learned_optimizer in ("picked", "meta-trained"):
        options["learned_optimizer"] = args.learned_optimizer
    else:  # InnerOptimizer fields over the meta-trained one
        options["learned_optimizer"] = _json_object(args.learned_optimizer, "--learned-optimizer",
                                                    "picked, meta-trained, or InnerOptimizer fields as a JSON object")
    fresh_init = _fresh_init(args.fresh_init)
    old = splatopt.FitResult.load(args.file)
    if getattr(args, "plot_prompt", None) is not None and args.prompt is not None:
        raise ValueError(f"--plot-prompt {args.plot_prompt} picks among the prompts of a --file edit; with --prompt "
                         f"{args.prompt} the edit and its plot hold that prompt alone: drop --plot-prompt")
    old, new_text = _edit_texts(args, old)
    plot_prompt = _plot_prompt(args, len(old.mask))
    model = _edit_model(args, old)
    result = splatopt.edit(old, new_text, model=model, steps=args.steps, freeze_steps=args.freeze_steps, local=not args.free,
                           far_tolerance=args.far_tolerance, fresh_start=not args.no_fresh_start, hold_budget=not args.no_hold_budget,
                           fresh_near=not args.no_fresh_near, fresh_init=fresh_init, choose=args.choose, device=_device(args.device),
                           record_every=args.record_every, progress=not args.quiet, **options)
    if isinstance(result.edit, list):  # --file: one record per prompt
        for b, e in enumerate(result.edit[:PRINTED_PROMPTS]):  # as many as _print_result lists
            assert e is not None  # edit() gives every prompt a record
            print(f"[{b}] ", end="")
            _print_edit_record(e, old, result, b)
    else:
        assert isinstance(result.edit, dict)  # one new text: one edit record
        _print_edit_record(result.edit, old, result)
    _print_result(result)
    if args.out:
        print(f"wrote {_save_fit(result, args.out)}")
    if args.plot:
        import fixedpos

        model = model or fixedpos.load(result.config["model"], layer=result.config["layer"])
        before, after = (old.select([plot_prompt]), result.select([plot_prompt])) if isinstance(result.edit, list) else (old, result)
        series = edit_trajectory_series(before, after, model)
        print("wrote " + ", ".join(map(str, save_figure(edit_trajectory_figure(series), args.plot))))
    return 0


def cmd_bench(args) -> int:
    from fixedpos.cache import check_output_folder
    from splatopt.bench import BenchConfig, run_bench, save_bench

    if args.long and args.e2e:
        raise ValueError("--long and --e2e are two different benchmarks: give one")
    kind = "--long" if args.long else "--e2e" if args.e2e else "the step bench"
    reads = BENCH_OPTIONS["long" if args.long else "e2e" if args.e2e else "step"]
    ignored = [dest for dest in sorted(set().union(*BENCH_OPTIONS.values()) - reads)
               if getattr(args, dest) != args.bench_parser.get_default(dest)]
    if ignored:  # e.g. --e2e --batch 2048 timed fit's own chunking and said nothing
        raise ValueError(f"{kind} does not read {_flags(ignored)}: drop it (it reads {_flags(reads)})")
    check_output_folder(args.out, "--out")  # now, so that a bad --out fails before the timing, not after it
    if args.long:
        return _bench_long(args)
    if args.e2e:
        return _bench_e2e(args)
    cfg = BenchConfig(batch=_or(args.batch, 4096), length=_or(args.length, 64), splats=_or(args.splats, 16), dim=args.dim,
                      objective=_or(args.objective, "mse"), kernel=args.kernel, dtype=args.dtype, warmup=_or(args.warmup, 5),
                      iters=_or(args.iters, 20), fused_precision=args.fused_precision)
    paths = tuple(args.paths or ("eager", "compile"))
    paths += ("fused",) if args.fused and "fused" not in paths else ()
    result = run_bench(cfg, _device(args.device), paths, peak_gbs=args.peak_gbs, peak_tflops=args.peak_tflops,
                       progress=not args.quiet)
    print(f"device {result['device']}, torch {result['torch']}: B={cfg.batch} L={cfg.length} N={cfg.splats} d={cfg.dim} "
          f"objective {cfg.objective} {cfg.dtype}")
    for path, r in result["results"].items():
        mem = f", peak {r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] is not None else ""
        speedup = f"  x{r['speedup_vs_eager']:.2f} vs eager" if "speedup_vs_eager" in r else ""
        roof = f", {r['hbm_roofline_fraction']:.1%} of HBM roofline" if r["hbm_roofline_fraction"] is not None else ""
        tensor = f", {r['tensor_core_fraction']:.1%} of bf16 tensor-core peak" if r.get("tensor_core_fraction") is not None else ""
        print(f"  {path:<10} {r['step_ms']:8.2f} ms/step ({r['loss_backward_ms']:.2f} ms loss+backward)  "
              f"{r['prompt_steps_per_s']:12.0f} prompt-steps/s{speedup}{roof}{tensor}{mem}")
    print(f"wrote {save_bench(result, args.out)}")
    return 0


# the options each bench reads (argparse dests); --device and --out are read by all three
BENCH_OPTIONS = {
    "step": {"batch", "length", "splats", "dim", "objective", "kernel", "dtype", "warmup", "iters", "paths", "fused",
             "fused_precision", "peak_gbs", "peak_tflops", "quiet"},
    "long": {"batch", "length", "splats", "dim", "objective", "kernel", "mode", "truncate", "tile", "dtype", "warmup",
             "iters", "paths", "quiet"},
    "e2e": {"prompts", "corpus", "length", "splats_fraction", "steps", "batch_size", "init", "objective", "warmup", "fused",
            "no_cuda_graphs", "quiet"},  # quiet: its fits show no progress bar anyway
}


def _flags(dests) -> str:
    return " ".join("--" + dest.replace("_", "-") for dest in sorted(dests))


def _bench_long(args) -> int:
    from splatopt.bench import LongBenchConfig, run_long_bench, save_bench

    length = _or(args.length, LongBenchConfig.length)
    cfg = LongBenchConfig(batch=_or(args.batch, LongBenchConfig.batch), length=length, splats=_or(args.splats, max(1, length // 4)),
                          dim=args.dim, objective=_or(args.objective, "mse"), kernel=args.kernel, mode=args.mode,
                          truncate=_or(args.truncate, LongBenchConfig.truncate), tile=_or(args.tile, LongBenchConfig.tile),
                          dtype=args.dtype, warmup=_or(args.warmup, LongBenchConfig.warmup), iters=_or(args.iters, LongBenchConfig.iters))
    result = run_long_bench(cfg, _device(args.device), tuple(args.paths or ("dense", "local")), progress=not args.quiet)
    print(f"device {result['device']}, torch {result['torch']}: B={cfg.batch} L={cfg.length} N={cfg.splats} d={cfg.dim} "
          f"objective {cfg.objective} {cfg.dtype}, truncate {cfg.truncate:g} sigma, tiles of {cfg.tile} tokens "
          f"({result['tile_candidates']} splats each)")
    for path, r in result["results"].items():
        if "error" in r:
            print(f"  {path:<6} {r['error']}: {r['message']}")
            continue
        mem = f", peak {r['peak_memory_gb']:.3f} GB (step {r['step_memory_gb']:.3f} GB)" if r["peak_memory_gb"] is not None else ""
        speedup = f"  x{r['speedup_vs_dense']:.1f} vs dense" if "speedup_vs_dense" in r else ""
        print(f"  {path:<6} {r['step_ms']:9.2f} ms/step{speedup}{mem}")
    if result["max_abs_diff"] is not None:
        print(f"  fields differ by at most {result['max_abs_diff']:.2e}")
    print(f"wrote {save_bench(result, args.out)}")
    return 0


def _bench_e2e(args) -> int:
    from splatopt.bench import E2EBenchConfig, run_e2e_bench, save_bench

    d = E2EBenchConfig
    cfg = E2EBenchConfig(prompts=args.prompts, corpus=args.corpus, max_tokens=_or(args.length, d.max_tokens),
                         splats_fraction=args.splats_fraction, steps=tuple(args.steps), batch_size=args.batch_size,
                         init=args.init, objective=_or(args.objective, d.objective), warmup_steps=_or(args.warmup, d.warmup_steps))
    result = run_e2e_bench(cfg, _device(args.device), fused=True if args.fused else None,
                           cuda_graphs=False if args.no_cuda_graphs else None)
    print(f"device {result['device']}, torch {result['torch']}: {result['prompts']} prompts ({result['distinct_prompts']} distinct) "
          f"of {cfg.corpus}, {result['tokens']} tokens (L <= {result['max_length']}, mean {result['mean_length']:.1f}), "
          f"N = {cfg.splats_fraction:g} L, objective {cfg.objective}, init {cfg.init}")
    if result["note"]:
        print(f"  note: {result['note']}")
    warm = f", warm-up {result['warmup_seconds']:.1f} s" if result["warmup_seconds"] is not None else ""
    print(f"  sampled in {result['sample_seconds']:.1f} s, encoded in {result['encode_seconds']:.2f} s{warm}")
    for r in result["runs"]:
        verdict = "meets" if r["meets_target"] else "misses"
        mem = f", peak {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
        print(f"  {r['steps']:5d} steps: {r['wall_seconds']:7.1f} s wall ({r['fit_seconds']:.1f} s fit), token accuracy "
              f"{r['token_accuracy_pooled']:.2%} pooled / {r['token_accuracy_mean']:.2%} mean, "
              f"{r['prompts_below_target']} prompts below {cfg.target_accuracy:.0%}{mem}; "
              f"{verdict} {cfg.target_accuracy:.0%} in {cfg.target_seconds:g} s")
    print(f"wrote {save_bench(result, args.out)}")
    return 0


def cmd_ablate(args) -> int:
    from splatopt import ablate

    study = ablate.Study.load(args.study)
    if args.dry_run:
        print(study.describe())
        ablate.preflight(study)  # models, corpus, prompt sets, learned starts and splat counts: what a run checks first
        print("checked: every cell's model, prompt sets, learned start and splat counts")
        if args.out:
            # a study not started yet has no results file: nothing is done, which is no error
            results = Path(args.out) / "results.jsonl" if Path(args.out).is_dir() else Path(args.out)
            done = {row["cell"] for row in ablate.read_rows(args.out)} if results.is_file() else set()
            print(f"{args.out}: {sum(c.key in done for c in study.cells())} of these cells are done")
        return 0
    if not args.out:
        raise ValueError("ablate: give --out DIR (results.jsonl, summary.md and summary.csv go there), or --dry-run")
    ablate.run(study, args.out, progress=not args.quiet, device=_device(args.device), force=args.force)
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'results.jsonl'}, summary.md, summary.csv")
    return 0


def _with_overrides(config: dict, assignments: list[str]) -> dict:
    """``config`` with each ``KEY=VALUE`` set; a dotted key sets one field of a table and keeps the others.

    VALUE is read as TOML (``0.1``, ``true``, ``[0.25, 0.5]``, ``"text"``); what TOML cannot read is
    taken as a string, since the shell strips the quotes of ``corpus="stdlib:train"``.
    """
    import copy
    import tomllib

    config = copy.deepcopy(config)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {assignment!r}: write KEY=VALUE, e.g. --set outer_steps=200 or --set inner_optimizer.lr_mu=0.1")
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text
        *tables, field = key.strip().split(".")
        where = config
        for table in tables:
            where = where.setdefault(table, {})
            if not isinstance(where, dict):
                raise ValueError(f"--set {assignment!r}: {table!r} is not a table of the config")
        where[field] = value
    return config


def cmd_meta_train(args) -> int:
    from splatopt import meta

    config = args.config
    if config is None:  # a resume reads the run's own settings: repeating --config and every --set was easy to get wrong
        if not args.resume:
            raise ValueError("give --config (a TOML file of MetaConfig keys), or --resume to continue the run in --out")
        config = Path(args.out) / "config.json"
        if not config.is_file():
            raise ValueError(f"--resume: {config} does not exist, so there is no run to continue in {args.out}; check --out, "
                             "or give --config")
    cfg = meta.MetaConfig.from_file(config)
    if args.set:
        cfg = meta.MetaConfig.from_dict(_with_overrides(cfg.to_dict(), args.set), f"{config} with --set")
    net = meta.train(cfg, args.out, resume=args.resume, device=_device(args.device), progress=not args.quiet)
    stopped = net.meta.get("stopped")
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        device = net.log_lr_scale.device  # the one train() used (--device auto resolved; under torchrun, rank 0's)
        where = f"{net.meta['world_size']} ranks ({device.type})" if net.meta.get("world_size", 1) > 1 else str(device)
        # a run cut short said "meta-trained 11 outer steps" and exited 0, as a finished one does: a script
        # (meta-train && evaluate) took a half-trained initializer for the result
        of = f" of {net.meta['outer_steps']}" if stopped else ""
        print(f"meta-trained {net.meta['outer_steps_done']}{of} outer steps in {net.meta['wall_s']} s on {where}"
              + (f" (stopped early: {stopped}; --resume{' --set time_limit_s=<more>' if stopped == 'time limit' else ''} "
                 "continues it)" if stopped else "")
              + f"; inner learning-rate scales {_lr_scales(net.log_lr_scale.detach().exp().tolist())}")
        print(f"wrote {Path(args.out) / 'initializer.safetensors'}, metrics.jsonl, checkpoint.safetensors")
    if stopped in ("SIGINT", "SIGTERM"):
        import signal

        return 128 + int(getattr(signal, stopped))  # what a shell reports for a command ended by that signal
    return 0


def _lr_scales(scales: list[float]) -> str:
    """The meta-learned learning-rate scales named by their parameter group (a bare list of four numbers
    said nothing of which was whose): "mu x0.67, log_sigma x0.6, weight_logit x0.56, v x0.63"."""
    from splatopt.optim import GROUPS

    return ", ".join(f"{group} x{scale:.3g}" for group, scale in zip(GROUPS, scales))


def cmd_demo(args) -> int:
    # parsed by the fit command itself, so the demo takes every fit default (and every new option)
    argv = ["fit", DEMO_TEXT, "--splats", "0.25", "--steps", str(args.steps), "--device", args.device,
            "--out", args.out or "splatopt-demo.safetensors", "--plot", args.plot or "splatopt-demo.png"]
    fit_args = build_parser().parse_args(argv + (["--quiet"] if args.quiet else []))
    print(f"fitting {fit_args.splats} splats per token to: {DEMO_TEXT}")
    return cmd_fit(fit_args)


DEVICE_HELP = "auto (CUDA if available, else the CPU), cpu, cuda or cuda:N"
PLOT_PROMPT_HELP = "the prompt --plot draws, counting from 0 (default: 0)"


class _HelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, where it has one worth saying (not None, off
    or empty) and the text does not already say it."""

    def _get_help_string(self, action) -> str | None:
        text, default = action.help, action.default
        unsaid = default is None or default is False or default is argparse.SUPPRESS or (isinstance(default, (list, str)) and not default)
        if text and action.option_strings and "default" not in text and not unsaid:
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            return f"{text} (default: {shown})"
        return text


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser: its help shows the defaults (_HelpFormatter)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splatopt", description="Fit Gaussian text splats to prompts.")
    parser.add_argument("--version", action="version", version=f"splatopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubParser)

    p = sub.add_parser("fit", help="fit splats to texts and print the decoded text and metrics")
    p.add_argument("text", nargs="*", help="texts to fit")
    p.add_argument("--file", help="also fit the texts of a .txt / .jsonl file: " + FILE_TEXTS)
    p.add_argument("--model", default="minilm-l6", help="the embedded model, or a local Hugging Face encoder folder")
    p.add_argument("--layer", type=int, default=None, help="the encoder layer whose embeddings are fitted (0: the embeddings; default: 2)")
    p.add_argument("--splats", type=_n_splats, default=0.5, help="splats: a fraction of L (0.25) or a count (8)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--objective", default="mse+ce", help="weighted terms, e.g. mse, ce, cosine, 1*mse+0.5*ce")
    p.add_argument("--init", default="grid", help="grid, tokens, learned (the shipped meta-trained initializer) or a .safetensors file of one")
    p.add_argument("--optimizer", default=None, help='InnerOptimizer fields as JSON, e.g. \'{"lr_mu": 0.2}\', or picked '
                   "(with --init learned: the one picked on validation for short budgets, shipped beside it)")
    p.add_argument("--kernel", default="gaussian", choices=["gaussian", "erf"],
                   help="a splat's profile: gaussian sampled at each token's centre, or averaged over the token (erf)")
    p.add_argument("--mode", default="additive", choices=["additive", "normalized"],
                   help="splats' fields add, or are averaged by their weights at each token")
    p.add_argument("--varpro", action="store_true", help="closed-form embeddings, optimize geometry only")
    p.add_argument("--truncate", type=float, default=None,
                   help="cut splats off beyond this many sigmas and render locally (default: none, 4 for texts over 1024 tokens)")
    p.add_argument("--basis", default="splats", choices=["splats", "fixed-grid", "dct", "segments"],
                   help="mobile splats, or a fixed baseline at the same float budget")
    p.add_argument("--density", default="none",
                   help='density control: none, adaptive, budget, or JSON such as \'{"name": "budget", "relocate_fraction": 0.1}\'')
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--record-every", type=int, default=5, help="record the splats every this many steps (0: only the last step)")
    p.add_argument("--out", help="write the fit (safetensors + JSON metadata); checked before the fit, and should the write "
                   "still fail after it, the fit is kept elsewhere and the error names the file")
    p.add_argument("--plot", help="write the trajectory figure of one prompt (.png, .pdf, .svg)")
    p.add_argument("--plot-prompt", type=int, default=None, metavar="K", help=PLOT_PROMPT_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="repeat a fit: its settings from FILE, a saved fit (its texts too, unless texts are given) or a "
                        "fit's config as JSON; the options given here override them")
    p.set_defaults(func=cmd_fit)
    p.set_defaults(defaults={a.dest: a.default for a in p._actions})

    p = sub.add_parser("show", help="describe a saved fit")
    p.add_argument("file", help="a saved fit (splatopt fit --out)")
    p.add_argument("--prompts", type=int, default=1, metavar="N",
                   help=f"list the splats (slot, mu, sigma, weight, |v|) of the first N prompts; 0: none (the metrics of "
                        f"the first max(N, {PRINTED_PROMPTS}) are listed)")
    p.add_argument("--plot", help="write the trajectory figure of one prompt (.png, .pdf, .svg)")
    p.add_argument("--plot-prompt", type=int, default=None, metavar="K", help=PLOT_PROMPT_HELP)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("edit", help="re-fit a saved fit to an edited text, warm-started from its splats")
    p.add_argument("file", help="a saved fit (splatopt fit --out); of several prompts: with --prompt K or --file")
    p.add_argument("text", nargs="?", help="the edited text")
    p.add_argument("--prompt", type=int, default=None, metavar="K",
                   help="edit prompt K (counting from 0) of a fit of several prompts: TEXT replaces its text, and the "
                        "output holds its re-fit only")
    p.add_argument("--file", dest="file_texts", default=None, metavar="NEW",
                   help="instead of TEXT, a .txt / .jsonl file of new texts, one per prompt of the fit, in order: "
                        + FILE_TEXTS + "; all prompts are re-fitted in one batch")
    p.add_argument("--model", default=None,
                   help="the fit's model, for a local encoder folder the file names only by its base name (default: the fit's)")
    p.add_argument("--steps", type=int, default=60, help="re-fit steps")
    p.add_argument("--freeze-steps", type=int, default=0, help="with --free: keep splats far from the edit fixed for these first steps")
    p.add_argument("--free", action="store_true",
                   help="re-fit the splats far from the edit too, after --freeze-steps (default: they stay fixed throughout)")
    p.add_argument("--far-tolerance", type=float, default=0.0,
                   help="frozen far splats' embeddings may change by at most this fraction of their norm (default 0: held)")
    p.add_argument("--no-fresh-start", action="store_true",
                   help="never also re-fit a text with no far splat from fresh starts")
    p.add_argument("--no-fresh-near", action="store_true",
                   help="never also re-fit a text's near-edit splats from fresh starts (beside its far ones)")
    p.add_argument("--fresh-init", default="auto",
                   help="initializers of the second starts, comma-separated (grid, tokens, learned); auto: learned,grid "
                        "where a learned initializer is shipped for the model, else grid")
    p.add_argument("--choose", default="accuracy", choices=["accuracy", "objective"],
                   help="how each prompt's best start is judged")
    p.add_argument("--objective", default=None, help="the re-fit's objective (default: the old fit's), e.g. ce")
    p.add_argument("--optimizer", default=None,
                   help='InnerOptimizer fields as JSON (default: the old fit\'s, constant schedule), e.g. \'{"beta2": 0.9}\'')
    p.add_argument("--no-hold-budget", action="store_true",
                   help="keep every transported splat, even beyond a cold fit's count of the new text (default: hold it)")
    p.add_argument("--learned-optimizer", default="picked",
                   help="the inner optimizer of the learned initializer's starts: picked (default: the one picked on "
                        "validation that ships beside it), meta-trained, or InnerOptimizer fields as JSON over the "
                        'meta-trained one, e.g. \'{"beta1": 0.5}\'')
    p.add_argument("--device", default="auto", help="the re-fit's device: " + DEVICE_HELP)
    p.add_argument("--record-every", type=int, default=2, help="record the splats every this many steps (0: only the last step)")
    p.add_argument("--out", help="write the edited fit")
    p.add_argument("--plot", help="write the edit's figure: the fit, the transport jump, the re-fit (.png, .pdf, .svg)")
    p.add_argument("--plot-prompt", type=int, default=None, metavar="K", help=PLOT_PROMPT_HELP + " (with --file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("bench", help="time one inner step, eager vs torch.compile (vs fused with --fused; "
                                      "--objective mse+ce --paths eager fused_ce chunked_ce for the decode-aware term), or dense vs "
                                      "local rendering of a long document (--long), or whole fits of many real prompts "
                                      "(--e2e), and save JSON",
                       description="Three benches, each reading only its own options and refusing the others': "
                                   + "; ".join(f"{name} reads {_flags(BENCH_OPTIONS[key])}" for name, key in
                                               (("the step bench (default)", "step"), ("--long", "long"), ("--e2e", "e2e")))
                                   + " (--e2e's fits show no progress bar). All read --device and --out.")
    p.add_argument("--long", action="store_true", help="long documents: dense vs local (tiled, truncated) rendering")
    p.add_argument("--e2e", action="store_true",
                   help="end to end: sample, encode and fit --prompts real prompts for each of --steps; wall time and token accuracy")
    p.add_argument("--prompts", type=int, default=10_000, help="--e2e: prompts to fit (a smaller corpus is cycled)")
    p.add_argument("--corpus", default="stdlib:test", help="--e2e: corpus (stdlib:SPLIT, licenses, or a .txt / .jsonl file)")
    p.add_argument("--splats-fraction", type=float, default=0.5, help="--e2e: splats per prompt as a fraction of its length")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 150, 200], help="--e2e: step budgets, one fit each")
    p.add_argument("--batch-size", type=int, default=None, help="--e2e: prompts per fit chunk (default: fit's, 16384 // L)")
    p.add_argument("--init", default="grid", help="--e2e: initializer (grid, tokens, learned)")
    p.add_argument("--batch", type=int, default=None, help="prompts (default 4096; --long: 1)")
    p.add_argument("--length", type=int, default=None, help="tokens per prompt (default 64; --long: 10000; --e2e: at most, 64)")
    p.add_argument("--splats", type=int, default=None, help="splats per prompt (default 16; --long: length / 4)")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension")
    p.add_argument("--objective", default=None, help="default mse; --e2e: mse+ce")
    p.add_argument("--kernel", default="gaussian", help="gaussian or erf")
    p.add_argument("--mode", default="additive", choices=["additive", "normalized"], help="--long only")
    p.add_argument("--truncate", type=float, default=None, help="--long: splats cut off beyond this many sigmas (default 4)")
    p.add_argument("--tile", type=int, default=None, help="--long: tokens per tile of the local renderer (default 64)")
    p.add_argument("--dtype", default="float32", help="float32, float64, bfloat16 or float16")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; --long: 3; --e2e: of a warm-up fit, 2)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20; --long: 10)")
    p.add_argument("--paths", nargs="+", default=None, choices=["eager", "compile", "fused", "graph", "fused_ce", "chunked_ce", "dense", "local"],
                   help="default eager compile; fused: the Triton field loss (mse/cosine); fused_ce: the "
                        "projection + cross-entropy without logits (one-sweep Triton kernel on CUDA); chunked_ce: its "
                        "row-chunk implementation; graph: fit's CUDA step replayed as CUDA graphs; --long: dense local")
    p.add_argument("--fused", action="store_true",
                   help="also time the fused Triton field loss (splatopt.kernels); --e2e: insist on it in fit (field-only objectives)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="--e2e: fit with cuda_graphs=False, launching every inner step (fused or PyTorch) instead of replaying "
                        "CUDA graphs (to measure what they save)")
    p.add_argument("--fused-precision", default=None, choices=["ieee", "tf32x3", "tf32"],
                   help="tl.dot precision of --fused (default: the kernel's, ieee for the loss, tf32x3 for the MSE step)")
    p.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth (GB/s) for the roofline fraction")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for the tensor-core fraction of a cross-entropy objective")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", default="figures/data/bench", help="folder of the JSON result")
    p.add_argument("--quiet", action="store_true", help="no progress bar (step and --long benches: the path being timed)")
    p.set_defaults(func=cmd_bench, bench_parser=p)

    p = sub.add_parser("ablate", help="run a study (TOML): a grid of fit configurations x seeds, resumable")
    p.add_argument("study", help="study file, e.g. figures/studies/kernel_mode.toml")
    p.add_argument("--out", help="results folder: results.jsonl (a row per cell), summary.md, summary.csv; run again to resume")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid and the number of cells and check every cell (model, layer, corpus and prompt sets, "
                        "learned start, splat counts), fit nothing; with --out, also how many cells are done")
    p.add_argument("--force", action="store_true", help="run into a folder that holds another study's results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("meta-train", help="meta-train the splat initializer (bilevel; runs under torchrun too)")
    p.add_argument("--config", default=None,
                   help="TOML of splatopt.meta.MetaConfig keys, e.g. splatopt/initializers/minilm-l6-layer2.toml (or a run's "
                        "config.json); with --resume, default: the run's own config.json (--set may still change outer_steps, "
                        "time_limit_s, log_every or checkpoint_every)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.safetensors, metrics.jsonl, initializer.safetensors")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where its checkpoint left it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (TOML value); repeatable")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (under torchrun: each rank's GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("demo", help="fit the built-in sample text with the embedded defaults and plot it")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", default=None, help="write the fit (default: splatopt-demo.safetensors)")
    p.add_argument("--plot", default=None, help="write the trajectory figure (default: splatopt-demo.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # one runner for both command lines: errors, Ctrl-C / SIGTERM (130 / 143) and a closed pipe alike
    from fixedpos.cli import run_command, warnings_as_lines

    with warnings_as_lines("splatopt"):
        return run_command("splatopt", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
