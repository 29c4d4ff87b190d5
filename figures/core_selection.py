"""Selection of the fit's defaults on the validation split: token accuracy of each variant at N = L/4.

Data: figures/data/core_selection.json (``python scripts/eval_core.py --select``: 256 validation
prompts, 300 steps). Bars: mean per-prompt token accuracy with 95 % CI; the selected variant (the
best, which became the default) is dark. The test split played no part in the choice.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from figure_io import COLUMN, house_style, load_json, save

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
    with house_style():
        fig, ax = plt.subplots(figsize=(COLUMN, 0.22 * len(rows) + 0.5))
        y = range(len(rows))
        ax.barh(y, [100 * r["token_accuracy"] for r in rows], xerr=[100 * r["token_accuracy_ci95"] for r in rows],
                color=["tab:blue" if r["variant"] == best else "tab:gray" for r in rows], alpha=0.85, height=0.65,
                error_kw={"lw": 0.7, "capsize": 1.5})
        for i, r in enumerate(rows):
            ax.text(100 * (r["token_accuracy"] + r["token_accuracy_ci95"]) + 0.15, i, f"{100 * r['token_accuracy']:.1f}",
                    va="center", fontsize=6)
        ax.set_yticks(list(y), [VARIANT_NAMES.get(r["variant"], r["variant"]) for r in rows])
        low = min(100 * (r["token_accuracy"] - r["token_accuracy_ci95"]) for r in rows)
        ax.set_xlim(5 * int(low // 5), 100.9)
        ax.set_xlabel(f"token accuracy (%), {rows[0]['prompts']} validation prompts, N = L/4")
        ax.grid(axis="x", lw=0.3, alpha=0.4)
    return save(fig, "core_selection")


if __name__ == "__main__":
    main()
