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
token accuracy, relative field error; line style: corpus (solid stdlib test, dashed licences, as in core_acceptance.py). The horizontal rule marks the grid's
token accuracy after 300 steps on the test split: the issue's bar for the learned start.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import figure_io
from figure_io import PAGE, house_style, parse_cli, save
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from splatopt import ablate

DATA_FILES = ["ablations/learned_init/results.jsonl", "ablations/learned_init_ood/results.jsonl",
              "ablations/learned_momentum_test/results.jsonl", "ablations/learned_momentum_ood/results.jsonl",
              "ablations/learned_metric_test/results.jsonl", "ablations/learned_metric_ood/results.jsonl"]
CORPORA = {"learned_init": ("stdlib test", "-"), "learned_init_ood": ("licences (out of domain)", "--")}
MOMENTA = {"learned_init": "learned_momentum_test", "learned_init_ood": "learned_momentum_ood"}
METRIC = {"learned_init": "learned_metric_test", "learned_init_ood": "learned_metric_ood"}
TICKS = [0, 1, 3, 10, 30, 100, 300]
# the grid start and the learned start in the colours and markers of rate_distortion.py's "mobile splats" and
# "splats, learned init"; the learned start's two other updates in darker and lighter shades of its magenta
INITS = {"grid": ("grid init", "#08306b", "o"), "learned": ("learned init", "#c51b8a", "*"),
         "momenta": ("learned init, picked momenta", "#f768a1", "^"),
         "metric": ("learned init, Fisher metric", "#7a0177", "D")}


def curves(study: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """init -> (steps, mean token accuracy, mean field error), sorted by steps."""
    rows = ablate.read_rows(figure_io.DATA / "ablations" / study)
    # the momenta and metric studies have one method (the pick) and no init level: their rows are the third and fourth curves
    rows += [{**r, "levels": {**r["levels"], "init": "momenta"}} for r in ablate.read_rows(figure_io.DATA / "ablations" / MOMENTA[study])]
    rows += [{**r, "levels": {**r["levels"], "init": "metric"}} for r in ablate.read_rows(figure_io.DATA / "ablations" / METRIC[study])]
    out = {}
    for init in INITS:
        mine = sorted((r for r in rows if r["levels"]["init"] == init), key=lambda r: r["levels"]["steps"])
        out[init] = ([r["levels"]["steps"] for r in mine], [r["token_accuracy"] for r in mine], [r["field_error"] for r in mine])
    return out


def main() -> list:
    with house_style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE, 2.0), gridspec_kw={"wspace": 0.22})
        bar = None
        for study, (corpus, ls) in CORPORA.items():
            for init, (steps, acc, err) in curves(study).items():
                label, color, marker = INITS[init]
                style = {"color": color, "marker": marker, "ls": ls, "ms": 4 if marker == "*" else 2.6}
                axes[0].plot(steps, [100 * a for a in acc], **style)
                axes[1].plot(steps, err, **style)
                if study == "learned_init" and init == "grid":
                    bar = 100 * acc[steps.index(300)]
        axes[0].axhline(bar, color="0.5", lw=0.7, ls=":")
        # left of the curves' rise, so that the label crosses no data
        axes[0].annotate(f"grid, 300 steps: {bar:.1f} %", (0.1, bar), xytext=(0, 2), textcoords="offset points",
                         fontsize=6, color="0.35", va="bottom")
        for ax in axes:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, 330)
            ax.xaxis.set_major_locator(FixedLocator(TICKS))
            ax.xaxis.set_major_formatter(FixedFormatter([str(t) for t in TICKS]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("inner steps (symlog; a separate fit per budget)")
            ax.grid(lw=0.3, alpha=0.4)
        axes[0].set_ylabel("token accuracy (%)")
        axes[0].set_ylim(0, 105)
        axes[1].set_ylabel("relative field error")
        axes[0].set_title("token accuracy, N = L/4, 512 prompts per corpus", fontsize=7)
        axes[1].set_title("field error (lower is better)", fontsize=7)
        # one row of starts (colour, marker), one of corpora (line style); legends fill by column
        inits = [Line2D([], [], color=c, marker=m, ms=4 if m == "*" else 2.6, label=name) for name, c, m in INITS.values()]
        corpora = [Line2D([], [], color="0.3", ls=ls, label=name) for name, ls in CORPORA.values()]
        corpora += [Line2D([], [], alpha=0)] * (len(inits) - len(corpora))
        handles = [h for pair in zip(inits, corpora) for h in pair]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(inits), handlelength=2.4)
    return save(fig, "learned_init")

if __name__ == "__main__":
    parse_cli(__doc__)
    print("\n".join(map(str, main())))
