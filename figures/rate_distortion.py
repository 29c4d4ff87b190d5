"""Rate–distortion: token accuracy and field cosine against floats per token, per method and corpus.

Data: figures/data/ablations/rate_distortion/ (stdlib test split) and rate_distortion_ood/ (licence
prose, out of domain), each the results.jsonl of ``splatopt ablate figures/studies/<study>.toml``:
one row per (n_splats, method, prompt set), 256 prompts of at most 64 tokens per set, 300 steps,
objective MSE + decode CE. Columns: corpus. Top row: mean per-prompt token accuracy; bottom row:
field cosine. Each point is the mean over prompt sets at one splat budget N, with its 95 %
Student-t interval (``splatopt.ablate.summarize``). A splat costs d + 3 floats, a fixed-basis term d,
so at each budget the fixed bases store < 1 % fewer floats than the splats. Where several methods'
markers would coincide (equal budget and floats, values within ``Y_TOLERANCE`` of the axis range:
mostly where they all decode every token), they are spread along x in steps of ``DODGE`` (5 %) so
that none is hidden; every other point stays at its measured x.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import figure_io
from figure_io import PAGE, house_style, parse_cli, save
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from splatopt import ablate

DATA_FILES = ["ablations/rate_distortion/results.jsonl", "ablations/rate_distortion_ood/results.jsonl"]
STUDIES = {"rate_distortion": "stdlib test", "rate_distortion_ood": "licences (out of domain)"}
METRICS = ("token_accuracy", "cosine", "field_error", "floats_per_token")
# mobile splats in blues and purples (solid lines), fixed bases in other hues (dashed / dotted; dash-dotted
# with solved coefficients, the update the learned initializer fits with)
METHODS = {
    "splats": ("mobile splats", {"color": "#08306b", "marker": "o", "ls": "-"}),
    "splats-adaptive": ("splats + adaptive density", {"color": "#2c7fb8", "marker": "^", "ls": "-"}),
    "splats-budget": ("splats + budget relocation", {"color": "#7fb8e0", "marker": "v", "ls": "-"}),
    "splats-solve": ("splats, solved v", {"color": "#6a51a3", "marker": "p", "ls": "-"}),
    "splats-learned": ("splats, learned init (solved v)", {"color": "#c51b8a", "marker": "*", "ls": "-"}),
    "fixed-grid": ("fixed-grid Gaussians", {"color": "#d95f02", "marker": "s", "ls": "--"}),
    "dct": ("DCT", {"color": "#1b9e77", "marker": "D", "ls": "--"}),
    "fixed-grid-solve": ("fixed grid, solved v", {"color": "#fdae6b", "marker": "s", "ls": "-."}),
    "dct-solve": ("DCT, solved v", {"color": "#66c2a4", "marker": "D", "ls": "-."}),
    "segments": ("segments (mean-pooling)", {"color": "0.45", "marker": "X", "ls": ":"}),
}
# coinciding points (same budget, values closer than Y_TOLERANCE x the y range) are spread along x by DODGE
# (natural-log units of x, ~5 %) per step, in SLOT order: the fixed grid and DCT on either side of the splats
DODGE = 0.05
Y_TOLERANCE = 0.025
SLOT = {"splats-adaptive": -4, "fixed-grid-solve": -3, "splats-solve": -2, "fixed-grid": -1, "splats": 0, "dct": 1,
        "splats-learned": 2, "dct-solve": 3, "splats-budget": 4, "segments": 5}
FLOAT_TICKS = [25, 50, 100, 200, 400]


def summaries() -> dict[str, list[dict]]:
    """Study name -> ``ablate.summarize`` of its rows (a dict per (n_splats, method): means and 95 % t-intervals)."""
    return {study: ablate.summarize(ablate.read_rows(figure_io.DATA / "ablations" / study), metrics=METRICS) for study in STUDIES}


def methods_of(summary: list[dict]) -> list[str]:
    """The methods a study has, in METHODS order (unknown ones last, as recorded)."""
    present = list(dict.fromkeys(e["method"] for e in summary))
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def spread(points: list[dict], y_range: float) -> dict[tuple, float]:
    """(method, n_splats) -> factor on x: 1, except for points whose markers would hide each other.

    points: {"method", "n_splats", "x", "y"}. Two points of one budget coincide when their x differ
    by less than DODGE (in log) and their y by at most Y_TOLERANCE x y_range; coinciding points,
    chained, form a group, and a group of k is spread over k steps of DODGE around its mean x, in
    SLOT order.
    """
    factor = {(p["method"], p["n_splats"]): 1.0 for p in points}
    close = lambda p, q: abs(math.log(p["x"] / q["x"])) < DODGE and abs(p["y"] - q["y"]) <= Y_TOLERANCE * y_range
    for n in {p["n_splats"] for p in points}:
        groups: list[list[dict]] = []
        for p in (p for p in points if p["n_splats"] == n):
            joined = [g for g in groups if any(close(p, q) for q in g)]
            groups = [g for g in groups if g not in joined] + [[p, *(q for g in joined for q in g)]]
        for group in (g for g in groups if len(g) > 1):
            group.sort(key=lambda p: SLOT.get(p["method"], len(SLOT)))
            centre = math.exp(sum(math.log(p["x"]) for p in group) / len(group))
            for i, p in enumerate(group):
                factor[p["method"], n] = centre * math.exp(DODGE * (i - (len(group) - 1) / 2)) / p["x"]
    return factor


def fraction_label(frac: float) -> str:
    return "L" if frac == 1 else f"L/{round(1 / frac)}"


def main():
    data = summaries()
    all_methods = list(dict.fromkeys(m for s in data.values() for m in methods_of(s)))
    with house_style():
        fig, axes = plt.subplots(2, len(data), figsize=(PAGE, 3.7), sharex="col", sharey="row",
                                 gridspec_kw={"hspace": 0.12, "wspace": 0.06})
        for col, (study, summary) in enumerate(data.items()):
            methods = methods_of(summary)
            for row, metric in enumerate(("token_accuracy", "cosine")):
                ax = axes[row, col]
                scale = 100 if metric == "token_accuracy" else 1
                y_range = 1.0 if metric == "token_accuracy" else 0.7  # the panel rows' y spans, in the metric's units
                factor = spread([{"method": e["method"], "n_splats": e["n_splats"], "x": e["floats_per_token_mean"],
                                  "y": e[f"{metric}_mean"]} for e in summary], y_range)
                for method in methods:
                    mine = sorted((e for e in summary if e["method"] == method), key=lambda e: e["n_splats"])
                    label, style = METHODS.get(method, (method, {}))
                    ax.errorbar([e["floats_per_token_mean"] * factor[method, e["n_splats"]] for e in mine],
                                [scale * e[f"{metric}_mean"] for e in mine],
                                yerr=[scale * (e[f"{metric}_ci95"] or 0) for e in mine], capsize=1.3, elinewidth=0.6,
                                lw=0.9, ms=3.0, mfc="white" if method == "splats-budget" else None, label=label,
                                zorder=3 if method.startswith("splats") else 2, **style)
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(FixedLocator(FLOAT_TICKS))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_xticklabels([str(t) for t in FLOAT_TICKS])
                floats = [e["floats_per_token_mean"] for e in summary]
                ax.set_xlim(min(floats) / 1.3, max(floats) * 1.3)
                ax.grid(lw=0.3, alpha=0.4)
                if row == 0:
                    ax.set_title(STUDIES[study], pad=14)
                    ax.set_ylim(-3, 103)
                    # the splat budgets N, at the mobile splats' floats per token, on top of each column
                    splats = sorted((e for e in summary if e["method"] == "splats"), key=lambda e: e["n_splats"])
                    top = ax.secondary_xaxis("top")
                    top.xaxis.set_major_locator(FixedLocator([e["floats_per_token_mean"] for e in splats]))
                    top.xaxis.set_minor_locator(NullLocator())
                    top.set_xticklabels([f"N = {fraction_label(e['n_splats'])}" for e in splats], fontsize=6)
                    top.tick_params(length=2, pad=1)
                    top.spines["top"].set_visible(False)
                else:
                    ax.set_xlabel("floats per token (log scale)")
            axes[0, 0].set_ylabel("token accuracy (%)")
            axes[1, 0].set_ylabel("field cosine")
        handles = [Line2D([], [], label=METHODS.get(m, (m, {}))[0], lw=0.9, ms=3.0,
                          mfc="white" if m == "splats-budget" else None, **METHODS.get(m, (m, {}))[1]) for m in all_methods]
        # two rows: the mobile-splat variants on the first, the fixed bases on the second (legends fill by column)
        mobile = [h for h, m in zip(handles, all_methods) if m.startswith("splats")]
        fixed = [h for h, m in zip(handles, all_methods) if not m.startswith("splats")]
        ncol = max(len(mobile), len(fixed))
        mobile, fixed = mobile + [Line2D([], [], alpha=0)] * (ncol - len(mobile)), fixed + [Line2D([], [], alpha=0)] * (ncol - len(fixed))
        handles = [h for pair in zip(mobile, fixed) for h in pair]
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.99), ncol=ncol, handlelength=1.9,
                   columnspacing=0.7, handletextpad=0.5)
    return save(fig, "rate_distortion")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
