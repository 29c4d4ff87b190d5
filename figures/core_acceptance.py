"""Fit acceptance: token accuracy against splats per token (N/L), and against the inner step.

Data: figures/data/core_acceptance.json (scripts/eval_core.py: 512 prompts per corpus, <= 64 tokens,
300 steps). Left: mean per-prompt token accuracy with 95 % CI, stdlib test split and licences (out
of domain). Right: mean accuracy over the fit's steps, one line per N/L and corpus. Both panels share
the y axis (0-100 %). Colour means N on the right only: the corpora are told apart by line style and
marker, in grey, so that no corpus colour is read as an N.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from figure_io import COLUMN, house_style, load_json, parse_cli, save

DATA_FILES = ["core_acceptance.json"]
CORPUS_NAMES = {"stdlib:test": "stdlib test", "licenses": "licences (out of domain)"}
# line style (solid / dashed, as in learned_init.py) and marker tell the corpora apart, in neutral greys:
# the right panel's colours are the splat budgets, and a coloured corpus read as one of them
CORPUS_STYLE = {"stdlib:test": {"color": "0.15", "marker": "o", "ls": "-"},
                "licenses": {"color": "0.45", "marker": "s", "ls": "--"}}


def fraction_label(frac: float) -> str:
    return f"L/{round(1 / frac)}"


def main():
    data = load_json("core_acceptance.json")
    rows = [r for r in data["rows"] if r["variant"] == "default"]
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    fracs = sorted({r["n_splats"] for r in rows})
    with house_style():
        # one y axis for both panels: the left one alone started near 65 %, a truncation the reader had no notice of
        fig, (ax_n, ax_step) = plt.subplots(1, 2, figsize=(COLUMN, 1.75), sharey=True, gridspec_kw={"wspace": 0.12})
        for corpus in corpora:
            mine = sorted((r for r in rows if r["corpus"] == corpus), key=lambda r: r["n_splats"])
            style = CORPUS_STYLE.get(corpus, {})
            ax_n.errorbar([r["n_splats"] for r in mine], [100 * r["token_accuracy"] for r in mine],
                          yerr=[100 * r["token_accuracy_ci95"] for r in mine], capsize=1.5, lw=0.9, ms=3,
                          label=CORPUS_NAMES.get(corpus, corpus), **style)
        ax_n.set_xscale("log", base=2)
        ax_n.set_xticks(fracs, [fraction_label(f) for f in fracs])
        ax_n.minorticks_off()
        ax_n.set_xlabel("splats N")
        ax_n.set_ylabel("token accuracy (%)")
        ax_n.grid(lw=0.3, alpha=0.4)
        shades = {f: plt.cm.viridis(0.15 + 0.6 * i / max(len(fracs) - 1, 1)) for i, f in enumerate(fracs)}
        for r in rows:
            curve = r["curve"]
            ax_step.plot(curve["step"], [100 * a for a in curve["token_accuracy"]], color=shades[r["n_splats"]],
                         ls=CORPUS_STYLE.get(r["corpus"], {}).get("ls", "-"))
        for f in fracs:
            ax_step.plot([], [], color=shades[f], label=f"N = {fraction_label(f)}")
        ax_step.set_xticks(range(0, max(r["steps"] for r in rows) + 1, 100))
        ax_step.set_xlabel("inner step")
        ax_n.set_ylim(0, 103)
        ax_step.grid(lw=0.3, alpha=0.4)
        ax_step.legend(loc="lower right", handlelength=1.2)
        fig.legend(*ax_n.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 1.04), ncol=2)
    return save(fig, "core_acceptance")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
