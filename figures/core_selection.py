"""Selection of the fit's defaults on the validation split: token accuracy of each variant at N = L/4.

Data: figures/data/core_selection.json (``python scripts/eval_core.py --select``: 256 validation
prompts, 300 steps). Dots: mean per-prompt token accuracy, whiskers its 95 % CI; the selected variant (the
best, which became the default) is blue. The test split played no part in the choice.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from figure_io import COLUMN, house_style, load_json, parse_cli, save

DATA_FILES = ["core_selection.json"]
# the run's variant names (scripts/eval_core.py SWEEP) as readers know them; "default" was lr_v = 0.05 then
VARIANT_NAMES = {
    "default": "previous default (lr_v 0.05)", "tokens-init": "token-anchored init", "erf": "erf kernel",
    "ce-only": "CE only (no MSE)", "lr_v-0.1": "lr_v 0.1 (selected)", "lr_mu-0.3": "lr_mu 0.3",
    "lr-all-x2": "all learning rates ×2",
}


def main():
    data = load_json("core_selection.json")
    rows = sorted((r for r in data["rows"] if r["corpus"] == "stdlib:validation"), key=lambda r: r["token_accuracy"])
    best = rows[-1]["variant"]
    # a broken x axis: one variant lies 10 points below the rest, which differ by tenths of a point
    far = [r for r in rows if r["token_accuracy"] < 0.95]
    far_span = (math.floor(min(100 * (r["token_accuracy"] - r["token_accuracy_ci95"]) for r in far)) - 0.5,
                math.ceil(max(100 * (r["token_accuracy"] + r["token_accuracy_ci95"]) for r in far)) + 2.5) if far else None
    spans = ([far_span] if far else []) + [(98.2, 100.2)]
    with house_style():
        # mean and 95 % CI as a dot and whisker: bars on an axis that starts far above 0 would draw lengths that mean nothing
        fig, axes = plt.subplots(1, len(spans), sharey=True, figsize=(COLUMN, 0.2 * len(rows) + 0.55), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 2.2][-len(spans):], "wspace": 0.06})
        fig.subplots_adjust(left=0.42, right=0.97)  # the variant names fit within the column
        for ax, (lo, hi) in zip(axes[0], spans):
            for i, r in enumerate(rows):
                color = "#0072B2" if r["variant"] == best else "0.3"
                ax.errorbar(100 * r["token_accuracy"], i, xerr=100 * r["token_accuracy_ci95"], fmt="o", ms=2.5, color=color,
                            lw=0.8, capsize=1.5)
                end = 100 * (r["token_accuracy"] + r["token_accuracy_ci95"])
                if lo <= 100 * r["token_accuracy"] <= hi:
                    ax.text(end + (hi - lo) * 0.03, i, f"{100 * r['token_accuracy']:.1f}", va="center", fontsize=6, color=color)
            ax.set_xlim(lo, hi)
            ax.grid(axis="x", lw=0.3, alpha=0.4)
        if far:  # the break: the facing spines hidden, a pair of slashes on the x axis
            axes[0, 0].spines["right"].set_visible(False)
            axes[0, 1].spines["left"].set_visible(False)
            axes[0, 1].tick_params(axis="y", length=0)
            for ax, x in ((axes[0, 0], 1), (axes[0, 1], 0)):
                ax.plot([x], [0], transform=ax.transAxes, marker=[(-1, -1.5), (1, 1.5)], ms=5, color="k", mew=0.6, clip_on=False)
        ax = axes[0, 0]
        ax.set_yticks(range(len(rows)), [VARIANT_NAMES.get(r["variant"], r["variant"]) for r in rows])
        ax.get_yticklabels()[-1].set_color("#0072B2")
        ax.tick_params(axis="y", length=0)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        # N = L/4 in the title: in the x label it made the label wider than the column (the figure 3.46 in)
        fig.supxlabel("token accuracy (%), mean ± 95 % CI", x=0.7, y=-0.06, fontsize=7.5)
        fig.suptitle(f"{rows[0]['prompts']} validation prompts, N = L/{round(1 / rows[0]['n_splats'])}, {rows[0]['steps']} steps",
                     x=0.7, fontsize=7)
    return save(fig, "core_selection")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
