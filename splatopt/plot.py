"""Figures for papers: splat trajectories, target vs rendered fields, metric curves.

Sizes are for a two-column paper: ``COLUMN`` (3.4 in) for one column, ``PAGE`` (7.0 in) for both;
fonts are 7-8 pt. ``save_figure`` writes every suffix asked for (PDF/SVG are vector, PNG at 300 dpi).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

COLUMN = 3.4
PAGE = 7.0
STYLE = {
    "font.size": 7.5,
    "axes.titlesize": 8,
    "axes.labelsize": 7.5,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5,
    "axes.linewidth": 0.6,
    "lines.linewidth": 0.9,
    "xtick.major.width": 0.5,
    "ytick.major.width": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # embed TrueType: editable text in vector output
    "svg.fonttype": "none",
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


@contextmanager
def house_style():
    with plt.rc_context(STYLE):
        yield


def save_figure(fig, path: str | Path, formats: Sequence[str] | None = None) -> list[Path]:
    """Save ``fig`` to ``path`` and, if given, to the same stem with each of ``formats`` (e.g. ["pdf", "png"])."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = [path.suffix.lstrip(".") or "png"] + [f for f in (formats or []) if f != path.suffix.lstrip(".")]
    out = []
    for suffix in suffixes:
        target = path.with_suffix("." + suffix)
        fig.savefig(target, dpi=300 if suffix == "png" else None, bbox_inches="tight", pad_inches=0.02)
        out.append(target)
    plt.close(fig)
    return out


def _tokens(result, prompt: int, model=None) -> list[str]:
    """Target tokens of a prompt as strings (from the model's tokenizer, else ids)."""
    mask = result.mask[prompt].cpu()
    ids = result.ids[prompt].cpu()[mask] if result.ids is not None else None
    if ids is None:
        return [str(i) for i in range(int(mask.sum()))]
    if model is not None:
        return model.tokenizer.convert_ids_to_tokens(ids.tolist())
    return [str(int(i)) for i in ids]


def trajectory_figure(result, prompt: int = 0, model=None, width: float = COLUMN, height: float | None = None, title: str | None = None):
    """Splat trajectories of one prompt: step (x) against position (y), each splat a line.

    The band around each line is +-sigma; opacity follows the splat's weight; the target tokens
    label the position axis, so one sees which splat ends up covering which words.
    """
    traj = result.trajectory
    steps = traj["step"].numpy()
    mu = traj["mu"][:, prompt].numpy()
    sigma = traj["sigma"][:, prompt].numpy()
    weight = traj["weight"][:, prompt].numpy()
    active = ~np.isnan(mu[-1])
    tokens = _tokens(result, prompt, model)
    L = len(tokens)
    height = height or max(2.2, min(0.11 * L + 0.8, 9.0))
    with house_style():
        fig, ax = plt.subplots(figsize=(width, height))
        colors = plt.cm.viridis(np.linspace(0.05, 0.9, max(int(active.sum()), 1)))
        for c, i in enumerate(np.flatnonzero(active)):
            w = np.nan_to_num(weight[:, i])
            alpha_line = 0.25 + 0.75 * float(w[-1])
            lo, hi = mu[:, i] - sigma[:, i], mu[:, i] + sigma[:, i]
            ax.fill_between(steps, lo, hi, color=colors[c], alpha=0.06 + 0.10 * float(w[-1]), lw=0)
            for edge in (lo, hi):
                ax.plot(steps, edge, color=colors[c], alpha=0.5 * alpha_line, lw=0.4, ls=(0, (2, 1.5)))
            ax.plot(steps, mu[:, i], color=colors[c], alpha=alpha_line, lw=1.2)
        ax.set_xlim(steps[0], steps[-1])
        ax.set_ylim(L - 0.5, -0.5)  # first token on top, as text reads
        ax.set_yticks(range(L))
        ax.set_yticklabels(tokens, fontsize=max(4.0, min(6.5, 220 / max(L, 1))))
        ax.set_xlabel("inner step")
        ax.set_ylabel("position (token)")
        n = int(active.sum())
        acc = f", acc {float(result.token_accuracy[prompt]):.0%}" if result.token_accuracy is not None else ""
        ax.set_title(title or f"{n} splats, {L} tokens{acc}")
        ax.grid(axis="y", lw=0.3, alpha=0.3)
    return fig


def field_figure(target: torch.Tensor, rendered: torch.Tensor, tokens: Sequence[str] | None = None, dims: int = 64, width: float = PAGE):
    """Target and rendered field of one prompt side by side as heatmaps ([L, d] each), and their difference."""
    t = target.detach().float().cpu().numpy()[:, :dims]
    r = rendered.detach().float().cpu().numpy()[:, :dims]
    vmax = float(np.abs(t).max()) or 1.0
    with house_style():
        fig, axes = plt.subplots(1, 3, figsize=(width, max(1.8, 0.09 * t.shape[0] + 0.7)), sharey=True)
        for ax, data, name in zip(axes, (t, r, r - t), ("target", "rendered", "rendered - target")):
            im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_title(name)
            ax.set_xlabel(f"dimension (first {t.shape[1]})")
        axes[0].set_ylabel("position (token)")
        if tokens is not None:
            axes[0].set_yticks(range(len(tokens)))
            axes[0].set_yticklabels(tokens, fontsize=max(4.0, min(6.0, 200 / max(len(tokens), 1))))
        fig.colorbar(im, ax=axes, shrink=0.8, pad=0.01)
    return fig


def curves_figure(histories: dict[str, dict], metrics: Sequence[str] = ("token_accuracy", "field_error"), width: float = COLUMN):
    """Metric vs inner step, mean over prompts with a 95 % confidence band, one line per named run."""
    with house_style():
        fig, axes = plt.subplots(len(metrics), 1, figsize=(width, 1.5 * len(metrics) + 0.3), sharex=True, squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics):
            for label, hist in histories.items():
                if metric not in hist:
                    continue
                values = hist[metric].float().numpy()  # [S, B]
                mean = values.mean(1)
                half = 1.96 * values.std(1, ddof=1) / np.sqrt(values.shape[1]) if values.shape[1] > 1 else 0 * mean
                steps = hist["step"].numpy()
                ax.plot(steps, mean, label=label)
                ax.fill_between(steps, mean - half, mean + half, alpha=0.2, lw=0)
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(lw=0.3, alpha=0.4)
        axes[-1, 0].set_xlabel("inner step")
        axes[0, 0].legend(frameon=False)
    return fig
