"""Shared by every figure script: where recorded results live, reading them, saving a figure.

A figure script reads only committed results under figures/data/ (``load_json``) and writes
figures/<name>.pdf and figures/<name>.png at 300 dpi (``save``), in the house style of
splatopt.plot (``splatopt/splatopt.mplstyle``, linked as figures/splatopt.mplstyle).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

FIGURES = Path(__file__).resolve().parent
DATA = FIGURES / "data"
# the checkout's package, not whichever splatopt is installed: a figure is drawn by the code beside
# its data (make puts the checkout first on PYTHONPATH too; a script run on its own did not)
if str(FIGURES.parent) not in sys.path:
    sys.path.insert(0, str(FIGURES.parent))

from splatopt.plot import COLUMN, PAGE, house_style, save_figure  # noqa: E402

__all__ = ["COLUMN", "DATA", "FIGURES", "PAGE", "data_paths", "find_data", "house_style", "load_json", "parse_cli", "read_json",
           "save", "write_json"]


def parse_cli(doc: str | None) -> None:
    """A figure script's command line: no options, only ``--help`` (its docstring); anything else is
    refused instead of being ignored while the figure is redrawn."""
    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def find_data(pattern: str) -> list[Path]:
    """Recorded result files matching ``pattern`` under figures/data/ (a name or a glob), sorted; where
    none match, those matching ``pattern + ".gz"`` (large results are committed gzipped). May be empty."""
    return sorted(DATA.glob(pattern)) or sorted(DATA.glob(pattern + ".gz"))


def data_paths(pattern: str) -> list[Path]:
    """:func:`find_data`, but raises FileNotFoundError when none match: a figure is never drawn from
    missing data."""
    paths = find_data(pattern)
    if not paths:
        raise FileNotFoundError(f"no recorded results match figures/data/{pattern}: run the experiment that writes "
                                "them (its command is in README.md) and commit its JSON")
    return paths


def load_json(pattern: str) -> dict:
    """The JSON of the one recorded result file named ``pattern`` under figures/data/."""
    (path,) = data_paths(pattern)
    return read_json(path)


def read_json(path: Path) -> dict:
    """A results file's JSON, gzipped (``.gz``) or not."""
    data = path.read_bytes()
    try:
        return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)
    except (json.JSONDecodeError, gzip.BadGzipFile, EOFError) as err:  # EOFError: a truncated .gz
        raise ValueError(f"{path} is damaged ({err}): restore it with git checkout, or re-run the command in its header") from None


def write_json(path: str | Path, data: dict) -> None:
    """Write a results file as indented JSON, gzipped where ``path`` ends in ``.gz`` (reproducibly:
    no timestamp in the gzip header)."""
    text = json.dumps(data, indent=1).encode()
    Path(path).write_bytes(gzip.compress(text, mtime=0) if str(path).endswith(".gz") else text)


def save(fig, name: str) -> list[Path]:
    """Write figures/<name>.pdf and figures/<name>.png (300 dpi); the paths written."""
    return save_figure(fig, FIGURES / f"{name}.pdf", ["png"])
