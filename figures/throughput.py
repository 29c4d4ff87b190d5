"""Inner-step throughput: prompt-steps per second of each execution path, per benchmark configuration.

Data: figures/data/bench/step-*.json (``splatopt bench``: one inner step = render + loss + backward +
Adam, paths timed in the same run). One horizontal bar per (configuration, path), grouped by
configuration (objective, batch B; L = 64, N = 16, d = 384, fp32, on the device named); each bar is
labelled with its milliseconds per step and its speed-up over eager, timed in the same run. Several runs
of one configuration are numbered ("run 2 of 3"); the title names the GPU most runs used, and the
header of a run made on another names it.
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
from figure_io import COLUMN, data_paths, house_style, parse_cli, save

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
    # with runs from several GPUs the title names the one most ran on, and the header of a run made elsewhere names its GPU
    most = max(devices, key=lambda d: sum(run["device"] == d for run in runs))

    def config(run: dict) -> str:
        return f"{OBJECTIVE_NAMES.get(run['config']['objective'], run['config']['objective'])}, B = {run['config']['batch']}"

    repeats = {name: [run for run in runs if config(run) == name] for name in {config(run) for run in runs}}
    rows = []  # top to bottom: a header per run (its configuration), then one bar per path it timed
    for run in runs:
        same = repeats[config(run)]
        # runs of one configuration are numbered: identical headers read as one group drawn twice
        number = f", run {same.index(run) + 1} of {len(same)}" if len(same) > 1 else ""
        device = f" ({short_device(run['device'])})" if run["device"] != most else ""
        rows.append((config(run) + number + device, None, None))
        rows += [(path, path, res) for path, res in run["results"].items()]
    bars = [res for _, _, res in rows if res]
    with house_style():
        fig, ax = plt.subplots(figsize=(COLUMN, 0.6 + 0.13 * len(rows)))
        # the headers sit inside the axes (their rows hold no bar), so the margin holds only the path names
        fig.subplots_adjust(left=0.2, right=0.95)
        y = np.arange(len(rows))[::-1]
        for yi, (label, path, res) in zip(y, rows):
            if res is None:  # the run's header in its own row, starting at the axis
                ax.text(0.01, yi - 0.1, label, transform=ax.get_yaxis_transform(), ha="left", va="center",
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
        ax.set_xlabel(f"prompt-steps / s (log scale; L = {runs[0]['config']['length']}, N = {runs[0]['config']['splats']})")
        ax.set_title(f"{short_device(most)} unless named, d = {runs[0]['config']['dim']}, {runs[0]['config']['dtype']}; "
                     "a group is one run:\nms per step, speed-up over the run's eager", fontsize=6.5)
        ax.grid(axis="x", lw=0.3, alpha=0.4)
    return save(fig, "throughput")


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
