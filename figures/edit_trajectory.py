"""Editing: splat centres over a fit, the edit's transport jump, and the re-fit of the edited text.

Data: figures/data/edit_trajectory.json (figures/data_edit_trajectory.py: the built-in sample text,
N = L/4, 300 fit steps; a phrase inserted and another deleted; 60 re-fit steps, CPU). Page width:
the token labels of both texts need it.
"""

from __future__ import annotations

from figure_io import PAGE, load_json, parse_cli, save

from splatopt.plot import edit_trajectory_figure

DATA_FILES = ["edit_trajectory.json"]


def main():
    return save(edit_trajectory_figure(load_json("edit_trajectory.json"), width=PAGE), "edit_trajectory")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
