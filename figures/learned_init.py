"""Learned vs grid initialization: token accuracy and field error against inner steps, N = L/4.

Data: figures/data/ablations/learned_init/ (stdlib test split) and learned_init_ood/ (licence
prose the initializer never saw), each the results.jsonl of ``splatopt ablate
figures/studies/<study>.toml``: one row per (init, steps), 512 prompts of at most 64 tokens, a
separate fit for every step budget (its learning-rate schedule runs over that budget), objective
MSE + decode CE. The learned initializer fits with the inner Adam it was meta-trained with; a third
curve (learned_momentum_test/, learned_momentum_ood/: the same prompts) fits it with the Adam
momenta picked on validation for short budgets (scripts/select_learned_momentum.py), a fourth
(learned_metric_test/, learned_metric_ood/) with the embedding update in the decoder's Fisher
metric picked on validation (InnerOptimizer(metric="fisher"), splatopt.fisher). Steps
are plotted on a symlog axis so that the feed-forward result (0 steps) sits at x = 0. Columns:
token accuracy, relative field error; line style: corpus. The horizontal rule marks the grid's
token accuracy after 300 steps on the test split: the issue's bar for the learned start.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from figure_io import DATA, PAGE, house_style, save
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from splatopt import ablate

DATA_FILES = ["ablations/learned_init/results.jsonl", "ablations/learned_init_ood/results.jsonl",
              "ablations/learned_momentum_test/results.jsonl", "ablations/learned_momentum_ood/results.jsonl",
              "ablations/learned_metric_test/results.jsonl", "ablations/learned_metric_ood/results.jsonl"]
CORPORA = {"learned_init": ("stdlib test", "-"), "learned_init_ood": ("licences (out of domain)", ":")}
MOMENTA = {"learned_init": "learned_momentum_test", "learned_init_ood": "learned_momentum_ood"}
METRIC = {"learned_init": "learned_metric_test", "learned_init_ood": "learned_metric_ood"}
TICKS = [0, 1, 3, 10, 30, 100, 300]
INITS = {"grid": ("grid init", "#d95f02", "s"), "learned": ("learned init", "#08306b", "o"),
         "momenta": ("learned init, picked momenta", "#1b9e77", "^"),
         "metric": ("learned init, Fisher metric", "#7570b3", "D")}


def curves(study: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """init -> (steps, mean token accuracy, mean field error), sorted by steps."""
    rows = ablate.read_rows(DATA / "ablations" / study)
    # the momenta and metric studies have one method (the pick) and no init level: their rows are the third and fourth curves
    rows += [{**r, "levels": {**r["levels"], "init": "momenta"}} for r in ablate.read_rows(DATA / "ablations" / MOMENTA[study])]
    rows += [{**r, "levels": {**r["levels"], "init": "metric"}} for r in ablate.read_rows(DATA / "ablations" / METRIC[study])]
    out = {}
    for init in INITS:
        mine = sorted((r for r in rows if r["levels"]["init"] == init), key=lambda r: r["levels"]["steps"])
        out[init] = ([r["levels"]["steps"] for r in mine], [r["token_accuracy"] for r in mine], [r["field_error"] for r in mine])
    return out


def main() -> list:
    house_style()
    fig, axes = plt.subplots(1, 2, figsize=(PAGE, PAGE * 0.4), constrained_layout=True)
    bar = None
    for study, (corpus, ls) in CORPORA.items():
        for init, (steps, acc, err) in curves(study).items():
            label, color, marker = INITS[init]
            style = {"color": color, "marker": marker, "ls": ls, "ms": 3.5, "lw": 1.2}
            axes[0].plot(steps, [100 * a for a in acc], label=f"{label}, {corpus}", **style)
            axes[1].plot(steps, err, **style)
            if study == "learned_init" and init == "grid":
                bar = 100 * acc[steps.index(300)]
    axes[0].axhline(bar, color="0.5", lw=0.8, ls="--")
    axes[0].annotate(f"grid, 300 steps: {bar:.1f} %", (1, bar), xytext=(0, 3), textcoords="offset points", fontsize=7, color="0.35")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, 330)
        ax.xaxis.set_major_locator(FixedLocator(TICKS))
        ax.xaxis.set_major_formatter(FixedFormatter([str(t) for t in TICKS]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("inner steps")
    axes[0].set_ylabel("token accuracy (%)")
    axes[0].set_ylim(0, 108)
    axes[1].set_ylabel("relative field error")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=6, frameon=False)
    return save(fig, "learned_init")


if __name__ == "__main__":
    print("\n".join(map(str, main())))
