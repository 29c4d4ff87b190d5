"""Corpora that are always present: no download.

- ``stdlib``: docstring paragraphs of Python 3.12.3's standard library, shipped as a snapshot
  (``corpora/stdlib-py3.12.3.txt.gz``, 9,672 passages, checksummed), so every machine samples the
  same prompts: the interpreter's own docstrings change with its version (3.11.7 has 11,817).
  ``stdlib-live`` reads the running interpreter's instead, with ``ast`` (nothing is imported).
  Split by a hash of each passage's text, so a passage lands in the same split on every machine:
  80 % train, 10 % validation, 10 % test.
- ``licenses``: English prose from outside the training corpus, the licence texts the system ships
  in ``/usr/share/common-licenses`` (Debian's base-files), paragraphs de-duplicated; all of it is
  held-out text, every split returns the same passages.
- any ``.txt`` file (one passage a line, or passages separated by blank lines) or ``.jsonl`` file
  (``{"text": ...}`` a line).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .model import FieldModel


SPLITS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
# the recorded studies' corpus: stdlib_passages(source="live") under Python 3.12.3, one passage a line
STDLIB_SNAPSHOT = Path(__file__).parent / "corpora" / "stdlib-py3.12.3.txt.gz"
STDLIB_SNAPSHOT_SHA256 = "523721d7856e8e8fe703384068d1d3f64a3cf338e1fc8766208e9cbaebe581d1"  # of the decompressed text
SNAPSHOT_MIN_WORDS = 6
LICENSES_DIR = Path("/usr/share/common-licenses")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def _clean_paragraphs(text: str, min_words: int) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        words = flat.split()
        if len(words) < min_words:
            continue
        letters = sum(ch.isalpha() for ch in flat)
        if letters < 0.6 * len(flat):  # tables, code samples, doctests
            continue
        if flat.startswith((">>>", "...", "$ ")):
            continue
        out.append(flat)
    return out


def split_of(passage: str) -> str:
    """The split a passage belongs to, decided by the SHA-1 of its text (stable across machines)."""
    bucket = int(hashlib.sha1(passage.encode("utf-8")).hexdigest()[:8], 16) % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


@lru_cache(maxsize=None)
def stdlib_passages(min_words: int = 6, source: str = "snapshot") -> tuple[str, ...]:
    """Every docstring paragraph of the standard library, de-duplicated, in file order.

    source: "snapshot" (Python 3.12.3's, shipped: the same on every machine) or "live" (the running
    interpreter's). The snapshot holds passages of at least ``SNAPSHOT_MIN_WORDS`` words.
    """
    if source == "snapshot":
        if min_words < SNAPSHOT_MIN_WORDS:
            raise ValueError(f"min_words={min_words}: the stdlib snapshot holds passages of at least {SNAPSHOT_MIN_WORDS} "
                             "words; use source='live' (corpus 'stdlib-live') for shorter ones")
        return tuple(p for p in _snapshot_lines(STDLIB_SNAPSHOT, STDLIB_SNAPSHOT_SHA256) if len(p.split()) >= min_words)
    if source != "live":
        raise ValueError(f"source={source!r}: choose 'snapshot' or 'live'")
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if not doc:
                    continue
                for para in _clean_paragraphs(doc, min_words):
                    if para not in seen:
                        seen.add(para)
                        out.append(para)
    if not out:
        raise RuntimeError(f"found no docstrings under {root}: is this a complete Python installation?")
    return tuple(out)


def _snapshot_lines(path: Path, sha256: str) -> list[str]:
    """The passages of a shipped gzip snapshot (one a line), after checking its checksum."""
    try:
        text = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise RuntimeError(f"{path} is missing or not gzip ({err}): reinstall splatopt, or use corpus 'stdlib-live'") from err
    if hashlib.sha256(text).hexdigest() != sha256:
        raise RuntimeError(f"{path} does not match its checksum (corrupt or edited): reinstall splatopt, or use corpus 'stdlib-live'")
    return text.decode("utf-8").splitlines()


@lru_cache(maxsize=None)
def license_passages(min_words: int = 6) -> tuple[str, ...]:
    """Paragraphs of the system's licence texts (out-of-domain English prose), de-duplicated."""
    if not LICENSES_DIR.is_dir():
        raise FileNotFoundError(
            f"{LICENSES_DIR} is missing (it ships with Debian/Ubuntu base-files); evaluate other prose with a .txt or .jsonl file"
        )
    seen: set[str] = set()
    out = []
    for path in sorted(LICENSES_DIR.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        for para in _clean_paragraphs(path.read_text(encoding="utf-8", errors="replace"), min_words):
            if para not in seen:
                seen.add(para)
                out.append(para)
    return tuple(out)


def load_text_file(path: str | Path) -> list[str]:
    """Passages of a ``.txt`` file (blank-line separated if it has blank lines, else one per line;
    whitespace runs collapsed) or ``.jsonl`` (a ``{"text": ...}`` object a line). FileNotFoundError
    for a missing file; ValueError for a file that is not UTF-8 or a malformed JSONL line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"corpus file {path} is a folder: give a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    try:
        raw = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {path} is not UTF-8 (byte {err.start} is {err.object[err.start]:#04x}): "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}:{n} has no string "text" field')
            if row["text"].strip():
                out.append(row["text"])
        return out
    if re.search(r"\n\s*\n", raw):
        parts = re.split(r"\n\s*\n", raw)
    else:
        parts = raw.splitlines()
    return [" ".join(p.split()) for p in parts if p.strip()]


def load_corpus(name: str = "stdlib", split: str = "train") -> list[str]:
    """Passages of a corpus: ``stdlib`` or ``stdlib-live`` (split train/validation/test), ``licenses``, or a ``.txt``/``.jsonl`` path.

    ``split`` selects from the stdlib corpora only (the others are held-out text, returned whole);
    ValueError for an unknown split or corpus; a path raises as :func:`load_text_file` does
    (FileNotFoundError for a missing file)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {list(SPLITS)}")
    if name in ("stdlib", "stdlib-live"):
        source = "live" if name == "stdlib-live" else "snapshot"
        return [p for p in stdlib_passages(source=source) if split_of(p) == split]
    if name == "licenses":
        return list(license_passages())
    if name.endswith((".txt", ".jsonl")) or Path(name).is_file():
        return load_text_file(name)
    raise ValueError(f"unknown corpus {name!r}: use 'stdlib', 'stdlib-live', 'licenses', or a path to a .txt / .jsonl file")


def check_corpus_spec(spec) -> None:
    """ValueError unless ``spec`` names a corpus as :func:`load_corpus_spec` reads it: ``stdlib:SPLIT``
    with a known split, ``licenses``, or a .txt / .jsonl path (read when used). Nothing is read."""
    if isinstance(spec, str) and (spec.endswith((".txt", ".jsonl")) or Path(spec).is_file()):
        return
    name, _, split = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if name not in ("stdlib", "stdlib-live", "licenses") or (split and split not in SPLITS) or (name == "licenses" and split):
        raise ValueError(f"{spec!r}: use " + ", ".join(f'"stdlib:{s}"' for s in SPLITS)
                         + ' (or "stdlib-live:SPLIT", this interpreter\'s docstrings), "licenses", or a path to a .txt / .jsonl file')


def load_corpus_spec(spec: str, default_split: str = "validation") -> list[str]:
    """Passages of a corpus named as the command lines name it: ``stdlib:SPLIT`` or
    ``stdlib-live:SPLIT`` (the name alone means ``default_split``), ``licenses``, or a ``.txt`` /
    ``.jsonl`` path; errors as :func:`load_corpus`."""
    if Path(spec).is_file():
        return load_text_file(spec)
    name, _, split = spec.partition(":")
    return load_corpus(name, split or default_split)


def sample_prompts(model: FieldModel, texts: Sequence[str], n: int, max_tokens: int = 64, min_tokens: int = 8, seed: int = 0) -> list[str]:
    """Up to ``n`` prompts of ``min_tokens..max_tokens`` tokens cut from ``texts`` at word boundaries.

    Passages longer than ``max_tokens`` are cut at the last whole word that fits, so prompts are real
    text (the project's evaluation protocol: L <= 64). model: a FieldModel (its tokenizer counts
    the tokens). Fewer than ``n`` when the passages run out. Deterministic in ``seed``. ValueError
    for n not an int >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # a slice by n would take the whole corpus
        raise ValueError(f"sample_prompts: n={n!r} must be an int >= 1 (prompts to draw)")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[str] = []
    for i in order:
        text = texts[i]
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                              split_special_tokens=True)  # as FieldModel.tokenize counts them
        offs = enc["offset_mapping"]
        if len(offs) < min_tokens:
            continue
        if len(offs) > max_tokens:
            end = offs[max_tokens - 1][1]
            # back off to a word boundary so no wordpiece is split
            cut = text.rfind(" ", 0, end + 1) if end < len(text) and not text[end].isspace() else end
            text = text[: cut if cut > 0 else end].rstrip()
            if len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) < min_tokens:
                continue
        out.append(text)
        if len(out) == n:
            break
    return out


def chunk_token_ids(model, texts: Sequence[str], chunk_tokens: int, max_tokens: int) -> list[torch.Tensor]:
    """Token-id chunks of at most ``chunk_tokens`` covering ``texts`` in order, ``max_tokens`` in all."""
    chunks, total = [], 0
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for s in range(0, len(ids), chunk_tokens):
            piece = torch.tensor(ids[s : s + chunk_tokens], dtype=torch.long)
            if len(piece) < 2:
                continue
            chunks.append(piece)
            total += len(piece)
            if total >= max_tokens:
                return chunks
    return chunks
