"""Editing: re-fit steps each edited prompt needs to reach its cold fit's accuracy, against the edit's size.

Data: figures/data/edit_budget/test_seed{0,1,2,3}.json.gz (scripts/eval_edit.py: 4 samples of 200
test-split prompts, N = L/4, one random insert / delete / replace of 1-4 words each; re-fit of 60
steps, metrics every 5). The default re-fit (the cold fit's splat budget, far splats frozen, second
starts, the most accurate kept); prompts not recovered
within the re-fit sit in the top row, and the share recovered per edit size is written above each
group.
"""

from __future__ import annotations

from figure_io import load_json, parse_cli, save

from splatopt.plot import recovery_figure

DATA_FILES = [f"edit_budget/test_seed{s}.json" for s in range(4)]
VARIANT = "default"


def main():
    runs = [load_json(name) for name in DATA_FILES]
    data = runs[0]
    rows = [r for run in runs for r in run["rows"] if r["variant"] == VARIANT]
    fig = recovery_figure([r["edit_tokens"] for r in rows], [r["steps_to_recover"] for r in rows],
                          max(rows[0]["steps"]), ops=[r["op"] for r in rows])
    fig.axes[0].set_title(f"{len(rows)} {data['split']} edits, N = L/{round(1 / data['n_splats'])}, re-fit at the cold fit's budget",
                          fontsize=7, pad=6)
    return save(fig, "edit_recovery")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
