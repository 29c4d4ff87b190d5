"""Rebuild every figure from the recorded results in figures/data/ (``make figures``).

    python figures/make_all.py                  # every figure
    python figures/make_all.py throughput       # only the named ones

Each entry of ``FIGURE_SCRIPTS`` is a script figures/<name>.py with ``DATA_FILES`` (names or globs
under figures/data/) and ``main()``, which writes figures/<name>.pdf and .png. To add a figure,
write such a script and add its name here. Before drawing anything, every script's data files are
checked: if one is missing, nothing is drawn and the command fails naming them all.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from figure_io import FIGURES, find_data

FIGURE_SCRIPTS = [
    "core_acceptance",
    "core_selection",
    "throughput",
    "edit_recovery",
    "edit_warm_curves",
    "edit_trajectory",
    "rate_distortion",
    "learned_init",
]


def missing_data(scripts) -> list[str]:
    """'script: figures/data/<pattern>' for every data file a script needs and figures/data/ lacks."""
    return [f"{module.__name__}: figures/data/{pattern}" for module in scripts for pattern in module.DATA_FILES
            if not find_data(pattern)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"figures to build (default: all of {', '.join(FIGURE_SCRIPTS)})")
    names = parser.parse_args(argv).names or FIGURE_SCRIPTS
    unknown = sorted(set(names) - set(FIGURE_SCRIPTS))
    if unknown:
        parser.error(f"unknown figures {unknown}; FIGURE_SCRIPTS lists {FIGURE_SCRIPTS}")
    scripts = [importlib.import_module(name) for name in names]
    missing = missing_data(scripts)
    if missing:
        print("make_all: missing recorded results, no figure drawn:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    for module in scripts:
        paths = module.main()
        print(f"{module.__name__}: wrote " + ", ".join(str(p.relative_to(FIGURES.parent)) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
