"""Inner-step throughput: prompt-steps per second of each execution path, per benchmark configuration.

Data: figures/data/bench/step-*.json (``splatopt bench``: one inner step = render + loss + backward +
Adam, paths timed in the same run). One horizontal bar per (configuration, path), grouped by
configuration (objective, batch B; L = 64, N = 16, d = 384, fp32, on the device named); each bar is
labelled with its milliseconds per step and its speed-up over eager (where eager ran: at B = 2048 the
materialized logits of the decode-aware step would not be worth timing, so only the chunked path ran).
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
from figure_io import COLUMN, data_paths, house_style, save

DATA_FILES = ["bench/step-*.json"]  # one inner step; long-* and e2e-* runs are other benchmarks
OBJECTIVE_NAMES = {"mse": "MSE", "mse+ce": "MSE + CE"}
PATH_COLORS = {"eager": "tab:gray", "compile": "tab:blue"}


def main():
    runs = [json.loads(p.read_text()) for p in data_paths(DATA_FILES[0])]
    runs.sort(key=lambda r: (r["config"]["objective"], r["config"]["batch"], list(r["results"])))
    bars = []  # (configuration label, path, result), one horizontal bar each, grouped by configuration
    for run in runs:
        c = run["config"]
        label = f"{OBJECTIVE_NAMES.get(c['objective'], c['objective'])}, B={c['batch']}"
        bars += [(label, path, res) for path, res in run["results"].items()]
    paths = list(dict.fromkeys(path for _, path, _ in bars))
    colors = {path: PATH_COLORS.get(path, f"C{k + 2}") for k, path in enumerate(paths)}
    with house_style():
        fig, ax = plt.subplots(figsize=(COLUMN, 0.6 + 0.2 * len(bars)))
        y = np.arange(len(bars))[::-1]
        for yi, (label, path, res) in zip(y, bars):
            ax.barh(yi, res["prompt_steps_per_s"], 0.75, color=colors[path])
            speedup = f", ×{res['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in res and path != "eager" else ""
            ax.text(res["prompt_steps_per_s"] * 1.15, yi, f"{res['step_ms']:.3g} ms{speedup}", va="center", fontsize=5.5)
        ax.set_xscale("log")
        top = max(res["prompt_steps_per_s"] for _, _, res in bars)
        low = min(res["prompt_steps_per_s"] for _, _, res in bars)
        ax.set_xlim(10 ** np.floor(np.log10(low) - 0.2), top * 12)
        ax.set_yticks(y, [f"{label}  {path}" for label, path, _ in bars], fontsize=5.5)
        ax.set_xlabel("prompt-steps / s (L=64, N=16)")
        devices = sorted({run["device"] for run in runs})
        ax.set_title(f"{', '.join(devices)}, d={runs[0]['config']['dim']}; paths of a row group ran together", fontsize=6)
        ax.grid(axis="x", lw=0.3, alpha=0.4)
    return save(fig, "throughput")


if __name__ == "__main__":
    main()
