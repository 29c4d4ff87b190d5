"""Inner-step throughput: prompt-steps per second of each execution path, per benchmark configuration.

Data: figures/data/bench/*.json (``splatopt bench``: one inner step = render + loss + backward +
Adam, paths timed in the same run). One group of bars per recorded configuration (objective,
batch B, L, N, d, dtype, device), one bar per path (eager, compile, and any later path); each bar is
labelled with its milliseconds per step and its speed-up over eager.
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
from figure_io import COLUMN, data_paths, house_style, save

DATA_FILES = ["bench/*.json"]
OBJECTIVE_NAMES = {"mse": "MSE", "mse+ce": "MSE + CE"}
PATH_COLORS = {"eager": "tab:gray", "compile": "tab:blue"}


def main():
    runs = [json.loads(p.read_text()) for p in data_paths(DATA_FILES[0])]
    runs.sort(key=lambda r: (r["config"]["objective"], -r["config"]["batch"]))
    paths = list(dict.fromkeys(p for r in runs for p in r["results"]))
    width = 0.8 / len(paths)
    with house_style():
        fig, ax = plt.subplots(figsize=(COLUMN, 2.0))
        for k, path in enumerate(paths):
            for g, run in enumerate(runs):
                res = run["results"].get(path)
                if res is None:
                    continue
                x = g + (k - (len(paths) - 1) / 2) * width
                ax.bar(x, res["prompt_steps_per_s"], width * 0.92, color=PATH_COLORS.get(path, f"C{k + 2}"),
                       label=path if g == 0 else None)
                ax.text(x, res["prompt_steps_per_s"] * 1.12, f"{res['step_ms']:.1f} ms\n×{res['speedup_vs_eager']:.2f}",
                        ha="center", va="bottom", fontsize=5.5, linespacing=1.0)
        ax.set_yscale("log")
        top = max(r["prompt_steps_per_s"] for run in runs for r in run["results"].values())
        low = min(r["prompt_steps_per_s"] for run in runs for r in run["results"].values())
        ax.set_ylim(10 ** np.floor(np.log10(low) - 0.3), top * 8)
        labels = [f"{OBJECTIVE_NAMES.get(c['objective'], c['objective'])}\nB={c['batch']} L={c['length']} N={c['splats']}"
                  for c in (run["config"] for run in runs)]
        ax.set_xticks(range(len(runs)), labels)
        ax.set_ylabel("prompt-steps / s")
        devices = sorted({run["device"] for run in runs})
        dtypes = sorted({run["config"]["dtype"] for run in runs})
        ax.set_title(f"{', '.join(devices)}, d={runs[0]['config']['dim']}, {', '.join(dtypes)}", fontsize=6.5)
        ax.legend(loc="upper right", ncol=len(paths))
        ax.grid(axis="y", lw=0.3, alpha=0.4)
    return save(fig, "throughput")


if __name__ == "__main__":
    main()
