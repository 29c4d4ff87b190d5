"""``fixedpos`` command line: model info, round-trip accuracy, decoder-head training."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SAMPLE_TEXT = (
    "Return a new list containing all items from the iterable in ascending order. A custom key function "
    "can be supplied to customize the sort order, and the reverse flag can be set to request the result "
    "in descending order."
)


def _device(name: str | None) -> torch.device:
    from fixedpos.model import resolve_device

    return resolve_device(name, "--device")


def _check_n(n: int) -> None:
    if n < 1:  # sample_prompts would take the whole corpus
        raise ValueError(f"--n {n}: give at least 1 prompt per corpus")


def _check_json_path(path: str) -> None:
    """Fail on an unwritable --json path now, not after the evaluation it would hold."""
    if Path(path).is_dir():
        raise ValueError(f"--json {path} is a folder: give a file path, e.g. {Path(path) / 'roundtrip.json'}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--json {path}: cannot create its folder ({err.strerror}); give a path in a writable folder") from None


def _layers(args, **load_kw) -> list[int]:
    """--layer, or with --all-layers every layer of the model: 0 (embeddings) to its last block."""
    import fixedpos

    if not args.all_layers:
        return [args.layer]
    return list(range(fixedpos.load(args.model, layer=0, head=args.recipe, **load_kw).n_layers + 1))


def roundtrip_report(model, n: int, device, corpora: list[str], seed: int = 0) -> list[dict]:
    """Token accuracy of decode(encode(x)) on ``n`` prompts (<= 64 tokens) of each corpus."""
    import fixedpos

    # every corpus is sampled before any is encoded, so that an unusable one fails before the work
    sampled = []
    for spec in corpora:
        prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec(spec), n, seed=seed)
        if not prompts:
            raise ValueError(f"corpus {spec} has no passage of at least 8 tokens to evaluate: give a corpus with longer passages")
        sampled.append((spec, prompts))
    rows = []
    for spec, prompts in sampled:
        acc = fixedpos.token_accuracy(model, prompts, device=device)
        rows.append({"model": model.name, "layer": model.layer, "corpus": spec, **acc})
    return rows


def cmd_roundtrip(args) -> int:
    import fixedpos
    from fixedpos.head import resolve_recipe

    _check_n(args.n)
    if args.json:
        _check_json_path(args.json)
    resolve_recipe(args.recipe)
    device = _device(args.device)
    rows = []
    for layer in _layers(args):
        model = fixedpos.load(args.model, layer=layer, head=args.recipe)
        rows += roundtrip_report(model, args.n, device, args.corpus, seed=args.seed)
    print(f"{'model':<12} {'layer':>5}  {'corpus':<22} {'prompts':>7} {'tokens':>7} {'accuracy':>9}")
    for r in rows:
        print(f"{r['model']:<12} {r['layer']:>5}  {r['corpus']:<22} {r['texts']:>7} {r['tokens']:>7} {r['accuracy']:>9.4%}")
    if args.json:  # atomic: a run cut short must not leave half a JSON where the last one was
        from fixedpos.cache import atomic_write_bytes

        atomic_write_bytes(Path(args.json), (json.dumps(rows, indent=1) + "\n").encode())
    return 0


def cmd_train_head(args) -> int:
    import fixedpos
    from fixedpos.cache import check_output_folder
    from fixedpos.head import head_filename, load_head, resolve_recipe, save_head

    _check_n(args.n)
    device = _device(args.device)
    recipe = resolve_recipe(args.recipe)
    if args.out:  # checked now: the head is written after minutes of training
        check_output_folder(args.out, "--out")
    out_dir = Path(args.out) if args.out else fixedpos.cache_dir() / "heads"
    done: list[int] = []  # layers whose head is in out_dir, kept or written
    try:
        for layer in _layers(args, train_head_if_missing=False):
            model = fixedpos.load(args.model, layer=layer, head=args.recipe, train_head_if_missing=False)
            path = out_dir / head_filename(model.model_hash, layer, recipe)
            # a head is written whole or not at all (a temporary file, then a rename), and one that does not
            # read back (damaged since) is trained again rather than taken for a finished one
            if path.is_file() and not args.force:
                try:
                    load_head(path, model.word_embeddings, model.model_hash, layer)
                except ValueError as err:
                    print(f"  layer {layer}: {path} does not read back ({err}); training it again")
                else:
                    print(f"kept {path} (layer {layer}: written before; --force trains it again)")
                    done.append(layer)
                    continue
            head, meta = fixedpos.train_head(model, fixedpos.load_corpus("stdlib", "train"), recipe, device=device)
            model.set_head(head)
            meta["roundtrip"] = []
            for corpus in ("stdlib:validation", "stdlib:test", "licenses"):
                try:
                    meta["roundtrip"] += roundtrip_report(model, args.n, device, [corpus])
                except FileNotFoundError as err:  # licences are absent on non-Debian systems
                    print(f"  skipped {corpus}: {err}")
            for r in meta["roundtrip"]:
                print(f"  layer {layer} {r['corpus']:<18} {r['accuracy']:.4%} ({r['tokens']} tokens)")
            save_head(head, path, meta)
            print(f"wrote {path}")
            done.append(layer)
    except KeyboardInterrupt:
        # a re-run skips the heads already written: say which are kept, and that the one in training is not
        kept = f"the heads of layer(s) {', '.join(map(str, done))} are kept in {out_dir}" if done else "no head was written"
        print(f"train-head: interrupted; {kept} (the one being trained is not); run the same command again to go on",
              file=sys.stderr)
        raise
    return 0


def cmd_info(args) -> int:
    import fixedpos
    from fixedpos.head import resolve_recipe

    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty: give some text to round-trip, or leave --text out for the sample text")
    resolve_recipe(args.recipe)
    device = _device(args.device)
    model = fixedpos.load(args.model, layer=args.layer, head=args.recipe)
    print(model)
    print(f"hash {model.model_hash}\ncache {fixedpos.cache_dir()}")
    batch = model.tokenize([SAMPLE_TEXT if args.text is None else args.text], device=device)
    pred = model.decode(model.encode(batch)).argmax(-1)
    acc = (pred == batch.ids)[batch.mask].float().mean().item()
    print(f"sample round trip: {acc:.2%} of {int(batch.mask.sum())} tokens\n  {model.detokenize(pred, batch.mask)[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixedpos", description=__doc__)
    # fixedpos ships inside the splatopt distribution, so it carries that version
    parser.add_argument("--version", action="version", version=f"fixedpos (splatopt {_distribution_version()})")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="minilm-l6", help="'minilm-l6' (default) or a local Hugging Face encoder folder")
        p.add_argument("--layer", type=int, default=None,
                       help="encoder layer (0 = embeddings); default: 2 (fixedpos.DEFAULT_LAYER, for every model)")
        p.add_argument("--device", default="auto", help="auto (CUDA if available, else the CPU; default), cpu, cuda or cuda:N")
        p.add_argument("--recipe", default="standard", help="decoder-head recipe: standard (default) or quick")

    p = sub.add_parser("info", help="describe a model and round-trip a sample text")
    common(p)
    p.add_argument("--text", default=None, help="the text to round-trip (default: a built-in sample)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("roundtrip", help="token accuracy of decode(encode(x)) on corpora")
    common(p)
    p.add_argument("--all-layers", action="store_true", help="every layer of the model, 0 to its last block (instead of --layer)")
    p.add_argument("--n", type=int, default=512,
                   help="prompts per corpus (default: 512): its passages (a file's lines) of under 8 tokens are skipped, "
                        "longer ones cut to at most 64 tokens at a word boundary; the prompts column counts those used")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt sample (default: 0)")
    p.add_argument("--corpus", nargs="+", default=["stdlib:validation", "licenses"],
                   help="corpora: stdlib:SPLIT, licenses, or a .txt/.jsonl path (default: stdlib:validation licenses)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser("train-head", help="train (and cache) a decoder head")
    common(p)
    p.add_argument("--all-layers", action="store_true", help="a head for every layer of the model, 0 to its last block (instead of --layer)")
    p.add_argument("--n", type=int, default=512,
                   help="prompts per corpus for the accuracy report on stdlib:validation, stdlib:test and licenses (default: 512)")
    p.add_argument("--out", default=None, help="folder for the head file (default: the user cache)")
    p.add_argument("--force", action="store_true",
                   help="train a layer's head again even if --out already holds it (by default it is kept and skipped, so "
                        "an interrupted --all-layers run goes on where it stopped)")
    p.set_defaults(func=cmd_train_head)
    return parser


def _distribution_version() -> str:
    """The installed splatopt distribution's version (fixedpos never imports splatopt)."""
    try:
        return importlib.metadata.version("splatopt")
    except importlib.metadata.PackageNotFoundError:
        return "not installed: run from a source checkout"


@contextlib.contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """Inside, a warning prints as the command's own line ("splatopt: warning: ..."), not as Python's file,
    line number and the source line that raised it (cli.py:432 "net = meta.train(...)" said nothing to a
    user); a category other than the UserWarning and RuntimeWarning the packages raise is named."""
    import warnings

    def one_line(message, category, filename, lineno, line=None) -> str:
        kind = "" if category in (UserWarning, RuntimeWarning) else f" ({category.__name__})"
        return f"{prog}: warning{kind}: {message}\n"

    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    with warnings_as_lines("fixedpos"):
        return run_command("fixedpos", build_parser(), argv, prepare=_default_layer)


def _default_layer(args) -> None:
    if getattr(args, "layer", 0) is None:
        from fixedpos import DEFAULT_LAYER

        args.layer = DEFAULT_LAYER


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop, ``kill``) raised where the command is, as Ctrl-C raises
    KeyboardInterrupt: the same clean-up (``splatopt ablate`` names the cells kept, ``meta-train``
    checkpoints, ``fixedpos train-head`` names the heads kept) instead of a silent death."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises :class:`Terminated` (in the main thread, where no one else handles it)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # signals reach only the main thread; a handler someone installed is theirs
        return

    def terminate(signum, frame):
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_command(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None,
                prepare: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse ``argv`` and run the command it names (``args.func(args)``, after ``prepare(args)``), as both
    command lines (``fixedpos``, ``splatopt``) do: its return code; an error (ValueError, TypeError, OSError,
    RuntimeError) is one line "PROG: error: ..." and 2; Ctrl-C or SIGTERM one line "PROG: interrupted
    (Ctrl-C)" and 130 (143 for SIGTERM), no traceback (what was kept is said by the command, where it is
    known); a closed stdout pipe ends quietly with 141."""
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help, --version or a usage error: what it printed is flushed while caught here
            sys.stdout.flush()
            raise
        try:
            with sigterm_as_interrupt():
                if prepare is not None:
                    prepare(args)
                return args.func(args)
        except KeyboardInterrupt as err:
            terminated = isinstance(err, Terminated)
            print(f"{prog}: interrupted ({'SIGTERM' if terminated else 'Ctrl-C'})", file=sys.stderr)
            return 143 if terminated else 130  # 128 + the signal, as a shell reports a command it ended
        except BrokenPipeError:
            raise
        except (ValueError, TypeError, OSError, RuntimeError) as err:  # OSError: a missing file, a folder where a file goes
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        finally:
            sys.stdout.flush()  # a closed pipe fails here, not at exit, where it could no longer be caught
    except BrokenPipeError:
        # stdout's reader is gone (splatopt show run.safetensors | head -1): nothing more can be said, so end
        # quietly, as a command killed by SIGPIPE does; what is still buffered goes to devnull at exit
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, what a shell reports for such a command


def _stdout_to_devnull() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (replaced, as under pytest)
        pass


if __name__ == "__main__":
    sys.exit(main())
