"""Inner-step throughput: prompt-steps per second of each execution path, per benchmark configuration.

Data: figures/data/bench/step-*.json (``splatopt bench``: one inner step = render + loss + backward +
Adam, paths timed in the same run). One horizontal bar per (configuration, path), grouped by
configuration (objective, batch B; L = 64, N = 16, d = 384, fp32, on the device named); each bar is
labelled with its milliseconds per step and its speed-up over eager, timed in the same run.
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
from figure_io import COLUMN, data_paths, house_style, save

DATA_FILES = ["bench/step-*.json"]  # one inner step; long-* and e2e-* runs are other benchmarks
OBJECTIVE_NAMES = {"mse": "MSE", "mse+ce": "MSE + CE"}
# one fixed colour per path (Okabe-Ito, colour-blind safe); eager, the reference, grey
PATH_COLORS = {"eager": "0.6", "compile": "#0072B2", "fused": "#D55E00", "graph": "#CC79A7", "fused_ce": "#E69F00",
               "chunked_ce": "#009E73"}


def short_device(name: str) -> str:
    """'NVIDIA H200' -> 'H200': the GPU model without the vendor."""
    return name.removeprefix("NVIDIA ").split(" ")[0]


def main():
    runs = [json.loads(p.read_text()) for p in data_paths(DATA_FILES[0])]
    runs.sort(key=lambda r: (r["config"]["objective"], r["config"]["batch"], list(r["results"])))
    devices = sorted({run["device"] for run in runs})
    # with runs from several GPUs the title names the one most ran on and the runs made elsewhere
    most = max(devices, key=lambda d: sum(run["device"] == d for run in runs))
    rows = []  # top to bottom: a header per run (its configuration), then one bar per path it timed
    for run in runs:
        c = run["config"]
        rows.append((f"{OBJECTIVE_NAMES.get(c['objective'], c['objective'])}, B = {c['batch']}", None, None))
        rows += [(path, path, res) for path, res in run["results"].items()]
    bars = [res for _, _, res in rows if res]
    with house_style():
        fig, ax = plt.subplots(figsize=(COLUMN, 0.6 + 0.13 * len(rows)))
        fig.subplots_adjust(left=0.3, right=0.93)  # the headers and path names fit within the column
        y = np.arange(len(rows))[::-1]
        for yi, (label, path, res) in zip(y, rows):
            if res is None:  # the run's header in its own row, ending at the axis like the path names
                ax.text(0.0, yi - 0.1, label, transform=ax.get_yaxis_transform(), ha="right", va="center",
                        fontsize=6.5, fontweight="bold")
                continue
            ax.barh(yi, res["prompt_steps_per_s"], 0.8, color=PATH_COLORS.get(path, "0.3"))
            speedup = f", ×{res['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in res and path != "eager" else ""
            ax.text(res["prompt_steps_per_s"] * 1.15, yi, f"{res['step_ms']:.3g} ms{speedup}", va="center", fontsize=6)
        ax.set_xscale("log")
        top = max(res["prompt_steps_per_s"] for res in bars)
        low = min(res["prompt_steps_per_s"] for res in bars)
        ax.set_xlim(10 ** np.floor(np.log10(low) - 0.2), top * 15)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ticks = [(yi, label) for yi, (label, _, res) in zip(y, rows) if res]
        ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks])
        ax.tick_params(axis="y", length=0)
        ax.set_xlabel("prompt-steps / s (log scale; L = 64, N = 16)")
        others = "; ".join(f"{OBJECTIVE_NAMES.get(r['config']['objective'], r['config']['objective'])}, B = {r['config']['batch']}: "
                           f"{short_device(r['device'])}" for r in runs if r["device"] != most)
        on = short_device(most) + (f" ({others})" if others else "")
        ax.set_title(f"{on}, d = {runs[0]['config']['dim']}; a group is one run:\n"
                     "ms per step, speed-up over its eager", fontsize=6.5)
        ax.grid(axis="x", lw=0.3, alpha=0.4)
    return save(fig, "throughput")

if __name__ == "__main__":
    main()
