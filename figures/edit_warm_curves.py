"""Editing: token accuracy over the warm re-fit for each re-fit variant, against a cold fit of the edited text.

Data: figures/data/edit_second_starts.json (scripts/eval_edit.py, 200 edited test-split prompts,
N = L/4, re-fits of 60 steps at a constant learning rate), recorded when a re-fit could hold more
splats than the cold fit, and figures/data/edit_budget/test_seed0.json.gz (the same prompts and edits,
the default re-fit holding the cold fit's budget). Left: the whole re-fit, the default at the cold
fit's budget, the earlier default (far splats frozen, second starts, the most accurate kept) and
the warm start alone, and the cold fit from scratch. Right: the last 30 steps of the variants, mean with 95 % CI over prompts. The
dashed line is the cold fit's final accuracy (its full 300 steps), the goal the re-fit should
reach in 20 % of them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from figure_io import COLUMN, house_style, load_json, parse_cli, save

from splatopt.plot import mean_ci95

DATA_FILES = ["edit_second_starts.json", "edit_budget/test_seed0.json"]
RENAMED = {"edit_budget/test_seed0.json": {"default": "held-budget"}}  # its variants, named apart from the first file's
# legend order of the variants recorded with extra splats (a two-column legend fills by column)
VARIANT_NAMES = {
    "held-budget": "default: the cold fit's budget", "default": "learned + grid starts, by accuracy",
    "learned-near-accuracy": "learned starts, by accuracy", "warm-only": "warm start alone",
    "grid-objective": "grid start, by objective", "grid-accuracy": "grid start, by accuracy",
    "default-free": "default, far splats free",
}
# Okabe-Ito colours (colour-blind safe) and a marker each; the default at the cold fit's budget, the
# one the report's goal is about, in blue and drawn thicker
STYLES = {
    "held-budget": ("#0072B2", "o"), "default": ("#D55E00", "s"), "learned-near-accuracy": ("#CC79A7", "P"),
    "warm-only": ("#E69F00", "^"), "grid-objective": ("#009E73", "v"), "grid-accuracy": ("#56B4E9", "D"),
    "default-free": ("#7f4f24", "X"),
}
WHOLE_RUN = ["held-budget", "default", "warm-only"]  # drawn over all steps on the left


def main():
    runs = [load_json(name) for name in DATA_FILES]
    curves = {}
    for name, run in zip(DATA_FILES, runs):
        renamed = RENAMED.get(name, {})
        for variant in (v for v in run["summary"] if renamed.get(v, v) in VARIANT_NAMES):
            rows = [r for r in run["rows"] if r["variant"] == variant]
            steps = rows[0]["steps"]
            curves[renamed.get(variant, variant)] = (steps, *mean_ci95([[r["warm_curve"][i] for r in rows] for i in range(len(steps))]))
    # the same prompts and edits in every file (their cold fits agree but for GPU nondeterminism: one
    # prompt of 200 in the two recorded files)
    def edits_of(run: dict) -> list[str]:
        return [r["new_text"] for r in run["rows"] if r["variant"] == "default"]

    assert all(edits_of(run) == edits_of(runs[0]) for run in runs[1:]), "the files must share prompts and edits"
    cold = runs[0]["cold_curve"]
    cold_final = runs[0]["summary"]["default"]["cold_final_mean"]
    cold_steps = runs[0]["summary"]["default"]["cold_steps"]
    warm_steps = max(curves[WHOLE_RUN[0]][0])
    curves = {v: curves[v] for v in VARIANT_NAMES if v in curves}
    colors = {v: STYLES[v][0] for v in curves}

    def width(v: str) -> float:
        return 1.4 if v == "held-budget" else 0.9

    with house_style():
        fig, (ax_all, ax_end) = plt.subplots(1, 2, figsize=(COLUMN, 2.3), gridspec_kw={"wspace": 0.3, "width_ratios": [1, 1.15]})
        for ax in (ax_all, ax_end):
            ax.axhline(100 * cold_final, color="k", ls="--", lw=0.7)
            ax.grid(lw=0.3, alpha=0.4)
            ax.set_xlabel("re-fit step")
        ax_all.text(1, 100 * cold_final + 0.8, f"cold, {cold_steps} steps", fontsize=5.5, va="bottom")
        shown = [(s, a) for s, a in zip(cold["step"], cold["token_accuracy"]) if s <= warm_steps]
        ax_all.plot([s for s, _ in shown], [100 * a for _, a in shown], color="0.5", ls=":", lw=1.0, label="cold from scratch")
        for variant in WHOLE_RUN:
            steps, mean, half = curves[variant]
            # markers as in the legend: the vermillion and orange curves cross, and colour alone did not tell them apart
            ax_all.plot(steps, 100 * mean, color=colors[variant], lw=width(variant), marker=STYLES[variant][1], ms=2.2,
                        markevery=2, label=VARIANT_NAMES.get(variant, variant))
            ax_all.fill_between(steps, 100 * (mean - half), 100 * (mean + half), color=colors[variant], alpha=0.2, lw=0)
        ax_all.set_ylabel("token accuracy (%)")
        ax_all.set_xlim(0, warm_steps)
        start = warm_steps // 2
        dodge = (warm_steps - start) / 40  # final values with their CI, side by side right of the curves
        for k, (variant, (steps, mean, half)) in enumerate(curves.items()):
            keep = [i for i, s in enumerate(steps) if s >= start]
            xs = [steps[i] for i in keep]
            ax_end.plot(xs, 100 * mean[keep], color=colors[variant], marker=STYLES[variant][1], ms=2.5, lw=width(variant),
                        label=VARIANT_NAMES.get(variant, variant))
            # the interval of a mean accuracy, cut at 100 %, which no mean can pass
            end, low = 100 * float(mean[keep][-1]), 100 * float(half[keep][-1])
            ax_end.errorbar([warm_steps + (k + 2) * dodge], [end], yerr=[[low], [min(low, 100 - end)]],
                            color=colors[variant], marker=STYLES[variant][1], ms=2.5, capsize=1.2, lw=0.7)
        ax_end.set_xlim(start - 1, warm_steps + (len(curves) + 3) * dodge)
        ax_end.set_xticks(range(start, warm_steps + 1, 10))
        ax_end.axvspan(warm_steps + dodge, warm_steps + (len(curves) + 3) * dodge, color="0.95", lw=0, zorder=0)
        ax_end.set_title(f"steps {start}–{warm_steps}; shaded: {warm_steps} ± CI", fontsize=7)
        ax_all.set_title(f"{runs[0]['n']} {runs[0]['split']} edits, N = L/{round(1 / runs[0]['n_splats'])}", fontsize=7)
        # two legends: what holds the cold fit's budget, then the variants recorded with extra splats
        by_label = dict(zip(*reversed(ax_end.get_legend_handles_labels())))
        cold_handle = ax_all.get_legend_handles_labels()[0][0]
        budget = fig.legend([cold_handle, by_label[VARIANT_NAMES["held-budget"]]],
                            ["cold from scratch", VARIANT_NAMES["held-budget"]], loc="upper center",
                            bbox_to_anchor=(0.5, -0.04), ncol=2, handlelength=1.8)
        fig.canvas.draw()
        below = budget.get_window_extent().transformed(fig.transFigure.inverted()).y0
        extra = [label for v, label in VARIANT_NAMES.items() if v in curves and v != "held-budget"]
        fig.legend([by_label[label] for label in extra], extra, loc="upper center", bbox_to_anchor=(0.5, below + 0.02), ncol=2,
                   handlelength=1.8, columnspacing=0.8, title="recorded with extra splats (before the budget was held):",
                   title_fontsize=6.5)
    return save(fig, "edit_warm_curves")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
