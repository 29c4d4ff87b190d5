"""Figures for papers: splat trajectories, edits, target vs rendered fields, metric curves.

Sizes are for a two-column paper: ``COLUMN`` (3.4 in) for one column, ``PAGE`` (7.0 in) for both.
The house style (fonts 6.5-8 pt, thin lines, embedded TrueType) is the matplotlib style file
``splatopt.mplstyle`` next to this module (``STYLE_FILE``); figures/ uses the same file.
``save_figure`` writes every suffix asked for (PDF/SVG are vector, PNG at 300 dpi).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Polygon
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import offset_copy

from fixedpos.cache import check_output_path, is_folder

from .fit import counted

COLUMN = 3.4
PAGE = 7.0
STYLE_FILE = Path(__file__).with_name("splatopt.mplstyle")
# edit-script spans: what the old tokens lose (sky blue) and the new text gains (orange); Okabe-Ito
# colours, told apart with colour-blind vision too, and the same edit kinds in every figure. Orange
# stays clear of the viridis splats; vermillion for deletions was too close to it in the scatter
SPAN_COLORS = {"equal": "0.85", "delete": "#56B4E9", "insert": "#E69F00", "replace": "#CC79A7"}
SPAWNED_COLOR = SPAN_COLORS["insert"]
PRUNED_COLOR = "0.45"


@contextmanager
def house_style():
    """Apply ``splatopt.mplstyle`` to the figures made (and saved) inside the block."""
    with plt.style.context(STYLE_FILE):
        yield


def figure_formats() -> set[str]:
    """The file suffixes (without the dot, lower case) matplotlib writes figures to: "png", "pdf", ..."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def check_figure_path(path: str | Path) -> Path:
    """``path`` if :func:`save_figure` can write it; else ValueError naming ``--plot``, raised before any work.

    A path without a suffix is written as PNG; an existing folder or an unknown format is refused.
    """
    path = Path(path)
    known = figure_formats()
    if is_folder(path):
        raise ValueError(f"--plot {path}: is a folder; give a file name such as {path / 'figure.png'}")
    check_output_path(path if path.suffix else path.with_suffix(".png"), "--plot")
    if path.suffix and path.suffix.lstrip(".").lower() not in known:
        raise ValueError(f"--plot {path}: unknown figure format {path.suffix!r}; use one of "
                         + ", ".join("." + k for k in sorted(known)))
    return path


def save_figure(fig, path: str | Path, formats: Sequence[str] | None = None) -> list[Path]:
    """Save ``fig`` to ``path`` and, if given, to the same stem with each of ``formats`` (e.g. ["pdf", "png"]).

    Saved inside the house style: font embedding, dpi (300) and tight bounding box are read at save time.
    Vector files carry no creation date, so rebuilding a figure from the same data gives the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = [path.suffix.lstrip(".") or "png"] + [f for f in (formats or []) if f != path.suffix.lstrip(".")]
    out = []
    with house_style():
        for suffix in suffixes:
            target = path.with_suffix("." + suffix)
            fig.savefig(target, metadata={"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(suffix))
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
    label the position axis, so one sees which splat ends up covering which words. A key under the
    x axis says so (the CLI writes the figure without a caption).
    """
    traj = result.trajectory
    if not -len(result.mask) <= prompt < len(result.mask):
        raise IndexError(f"prompt={prompt}: this result holds prompts 0..{len(result.mask) - 1}")
    if not traj:
        raise ValueError(f"this {result.basis} fit recorded no splat trajectory (a fixed basis does not move its terms; "
                         "for splats, fit with record_every > 0)")
    steps = traj["step"].numpy()
    if len(steps) < 2:
        raise ValueError(f"this fit recorded its splats at {len(steps)} step(s) only, no trajectory to draw; "
                         "fit with record_every > 0 (e.g. record_every=5)")
    mu = traj["mu"][:, prompt].numpy()
    sigma = traj["sigma"][:, prompt].numpy()
    weight = traj["weight"][:, prompt].numpy()
    active = ~np.isnan(mu[-1])
    tokens = _tokens(result, prompt, model)
    L = len(tokens)
    height = height or max(2.2, min(0.11 * L + 0.8, 9.0))
    with house_style():
        fig, ax = plt.subplots(figsize=(width, height))
        # viridis stops at 0.8, as in edit_trajectory_figure: its yellow end, faded by a light splat's opacity, is barely
        # visible on white
        colors = plt.cm.viridis(np.linspace(0.05, 0.8, max(int(active.sum()), 1)))
        for c, i in enumerate(np.flatnonzero(active)):
            _draw_splat(ax, steps, mu[:, i], sigma[:, i], weight[:, i], colors[c], i)
        ax.set_xlim(steps[0], steps[-1])
        _token_axis(ax, tokens, L)
        ax.set_xlabel("inner step")
        ax.set_ylabel("position (token)")
        n = int(active.sum())
        acc = f", acc {float(result.token_accuracy[prompt]):.0%}" if result.token_accuracy is not None else ""
        ax.set_title(title or f"{counted(n, 'splats')}, {counted(L, 'tokens')}{acc}")
        # a key under the x label: the CLI writes this figure without a caption, and neighbouring bands overlap
        # (sigma is often wider than the spacing of the centres), so what a band is must be said on the figure
        key_color = plt.cm.viridis(0.4)
        handles = [Line2D([], [], color=key_color, lw=1.2, label="splat centre μ (opacity: weight)"),
                   Patch(facecolor=key_color, alpha=0.16, edgecolor=key_color, ls=(0, (2, 1.5)), lw=0.4, label="μ ± σ")]
        below = offset_copy(ax.transAxes, fig=fig, y=-26, units="points")
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=2,
                  handlelength=1.8, columnspacing=1.2)
    return fig


def _draw_splat(ax, steps, mu, sigma, weight, color, slot: int | np.integer, edges: bool = True, band: float = 1.0) -> None:
    """One splat over steps [S]: its centre mu [S] as a line, a +-sigma band; opacity follows its last weight.

    edges: dashed lines at mu +- sigma; band: scales the band's opacity (many wide splats wash out at 1).
    The centre line's gid is ``"splat <slot>"`` (tests and SVG readers find splats by it).
    """
    w = float(np.nan_to_num(weight[np.isfinite(weight)][-1])) if np.isfinite(weight).any() else 0.0
    alpha_line = 0.25 + 0.75 * w
    lo, hi = mu - sigma, mu + sigma
    ax.fill_between(steps, lo, hi, color=color, alpha=band * (0.06 + 0.10 * w), lw=0)
    if edges:
        for edge in (lo, hi):
            ax.plot(steps, edge, color=color, alpha=0.5 * alpha_line, lw=0.4, ls=(0, (2, 1.5)))
    ax.plot(steps, mu, color=color, alpha=alpha_line, lw=1.2, gid=f"splat {slot}")


def _token_axis(ax, tokens: Sequence[str], L: int, right: bool = False) -> None:
    """Positions 0..L-1 top to bottom (as text reads), labelled with ``tokens``; on the right side if asked."""
    ax.set_ylim(L - 0.5, -0.5)
    ax.set_yticks(range(len(tokens)))
    # as large as the row a token gets allows (up to the house style's 6.5 pt): the figures grow with L, so a
    # size falling as 1/L (220 / L) printed a 60-token prompt's labels at 4 pt where 6 pt fitted
    row_pt = ax.get_position().height * ax.figure.get_figheight() * 72 / max(L, 1)
    ax.set_yticklabels(tokens, fontsize=max(4.0, min(6.5, 0.9 * row_pt)))
    ax.tick_params(axis="y", length=1.5, pad=1.5)
    if right:
        ax.yaxis.tick_right()
        ax.spines["right"].set_visible(True)
        ax.spines["left"].set_visible(False)
    ax.grid(axis="y", lw=0.3, alpha=0.3)


def field_figure(target: torch.Tensor, rendered: torch.Tensor, tokens: Sequence[str] | None = None, dims: int = 64, width: float = PAGE):
    """Target and rendered field of one prompt side by side as heatmaps ([L, d] each), and their difference."""
    if target.dim() != 2 or rendered.shape != target.shape:
        raise ValueError(f"field_figure: target {tuple(target.shape)} and rendered {tuple(rendered.shape)} must be one prompt's "
                         "fields of the same shape [L, d]; pass e.g. model.encode(model.tokenize([result.input_texts[b]]))[0] and "
                         "splatopt.render(result.splats.select(b), L)[0] (a FitResult holds no target field)")
    if tokens is not None and len(tokens) != target.shape[0]:
        raise ValueError(f"field_figure: {len(tokens)} tokens for a field of {target.shape[0]} positions")
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


def mean_ci95(values) -> tuple[np.ndarray, np.ndarray]:
    """Mean over prompts of values [S, B] and the half-width of its 95 % confidence interval, each [S]."""
    values = np.asarray(values, dtype=float)
    mean = values.mean(1)
    half = 1.96 * values.std(1, ddof=1) / np.sqrt(values.shape[1]) if values.shape[1] > 1 else 0 * mean
    return mean, half


# the range of a recorded metric, where it has one: curves_figure cuts its confidence band there
METRIC_BOUNDS = {"token_accuracy": (0.0, 1.0), "cosine": (-1.0, 1.0), "field_error": (0.0, np.inf), "ce": (0.0, np.inf)}
# axis labels that say what a metric is (field_error is the squared error over the target's squared norm)
METRIC_LABELS = {"field_error": "relative field error", "ce": "cross-entropy (nats)", "loss": "objective"}


def curves_figure(histories: dict[str, dict], metrics: Sequence[str] = ("token_accuracy", "field_error"), width: float = COLUMN):
    """Metric vs inner step, mean over prompts with a 95 % confidence band, one line per named run."""
    drawn = {m for hist in histories.values() for m in hist if m != "step"}
    missing = [m for m in metrics if m not in drawn]
    if missing:  # an empty panel would look like a run that recorded nothing
        raise ValueError(f"curves_figure: no run recorded {missing}; the runs hold {sorted(drawn)}")
    with house_style():
        fig, axes = plt.subplots(len(metrics), 1, figsize=(width, 1.5 * len(metrics) + 0.3), sharex=True, squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics):
            for label, hist in histories.items():
                if metric not in hist:
                    continue
                mean, half = mean_ci95(hist[metric].float().numpy())
                steps = hist["step"].numpy()
                (line,) = ax.plot(steps, mean, label=label)
                # the band in its line's colour: fill_between draws from the patch colour cycle, which keeps in step
                # with the lines' only while every run draws both
                low, high = METRIC_BOUNDS.get(metric, (-np.inf, np.inf))  # a band past 100 % accuracy is no possible mean
                ax.fill_between(steps, np.clip(mean - half, low, high), np.clip(mean + half, low, high), color=line.get_color(),
                                alpha=0.2, lw=0)
            ax.set_ylabel(METRIC_LABELS.get(metric, metric.replace("_", " ")))
            ax.grid(lw=0.3, alpha=0.4)
        axes[-1, 0].set_xlabel("inner step")
        axes[0, 0].legend(frameon=False)
    return fig


def _nan_to_none(values):
    """Nested lists of floats with NaN as None, so that ``json.dumps`` writes valid JSON."""
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


def _splat_series(trajectory: dict[str, torch.Tensor], splats, step: int) -> dict:
    """``step`` [S] and ``mu``/``sigma``/``weight`` [S][N] of prompt 0, from a recorded trajectory.

    Without a recorded trajectory, the final splats alone, as one step at ``step``.
    """
    if trajectory.get("mu") is not None and len(trajectory["step"]):
        columns = {k: trajectory[k][:, 0].float() for k in ("mu", "sigma", "weight")}
        steps = trajectory["step"].tolist()
    else:
        s = splats.to("cpu")
        hide = lambda t: torch.where(s.mask[0], t[0], torch.full_like(t[0], float("nan")))[None].float()
        columns = {"mu": hide(s.mu), "sigma": hide(s.sigma), "weight": hide(s.weight)}
        steps = [step]
    return {"step": steps, **{k: _nan_to_none(v.tolist()) for k, v in columns.items()}}


def edit_trajectory_series(before, after, model=None) -> dict:
    """What :func:`edit_trajectory_figure` draws, as plain JSON-ready lists (NaN written as None).

    before: the one-prompt FitResult that was edited (its recorded trajectory, else its final splats);
    after: the FitResult ``splatopt.edit`` returned (its ``edit`` record and re-fit trajectory).
    model: the field model, for token strings (else token ids).
    Keys: old_text, new_text; old_tokens [L_old], new_tokens [L_new]; script: [tag, i1, i2, j1, j2]
    (old tokens [i1, i2) became new tokens [j1, j2)); fit and refit: step [S] and mu, sigma, weight
    [S][N] (positions and widths in tokens, weights in (0, 1)); warm: mu, sigma [N_new], the splats
    right after the edit (transported and spawned, None where pruned); transported, pruned, spawned:
    slot lists (an old slot keeps its index in the re-fit); start: the start the re-fit kept ("warm",
    "warm-learned", "fresh", "fresh-near": :func:`splatopt.edit`'s second starts) and
    start_initializer; accuracy_before, accuracy_after.
    """
    if getattr(after, "edit", None) is None:
        raise ValueError("`after` has no edit record: pass the FitResult that splatopt.edit returned")
    if isinstance(after.edit, list):  # a batched edit's records: one prompt's, as select([b]) leaves it
        if len(after.edit) != 1:
            raise ValueError(f"`after` holds {len(after.edit)} prompts' edit records: pass one edited prompt and the fit "
                             "it came from, e.g. after.select([b]) and before.select([b])")
        if after.edit[0] is None:
            raise ValueError("`after`'s prompt has no edit record (a plain fit joined to an edit by FitResult.cat): "
                             "pass a prompt that splatopt.edit returned")
        after = replace(after, edit=after.edit[0])
    if isinstance(after.edit, dict) and "start_splats" not in after.edit:
        raise ValueError("`after`'s edit record has no start splats (a file saved before FitResult.save kept them): "
                         "pass the FitResult that splatopt.edit returned, or a file saved by this version")
    if before.mask.shape[0] != 1:
        raise ValueError(f"`before` must be the one-prompt fit that was edited, not {before.mask.shape[0]} prompts")
    warm = after.edit["start_splats"].to("cpu")
    hide = lambda t: torch.where(warm.mask[0], t[0], torch.full_like(t[0], float("nan"))).float().tolist()
    accuracy = lambda r: float(r.token_accuracy[0]) if r.token_accuracy is not None else None
    return {
        "old_text": after.edit["old_text"],
        "new_text": after.input_texts[0] if after.input_texts else None,
        "old_tokens": _tokens(before, 0, model),
        "new_tokens": _tokens(after, 0, model),
        "script": [list(op) for op in after.edit["script"]],
        "fit": _splat_series(before.trajectory, before.splats, int(before.config.get("steps", 0))),
        "warm": {"mu": _nan_to_none(hide(warm.mu)), "sigma": _nan_to_none(hide(warm.sigma))},
        "refit": _splat_series(after.trajectory, after.splats, int(after.config.get("steps", 0))),
        "transported": list(after.edit["transported"]),
        "pruned": list(after.edit["pruned"]),
        "spawned": list(after.edit["spawned"]),
        "start": after.edit.get("start", "warm"), "start_initializer": after.edit.get("start_initializer"),
        "accuracy_before": accuracy(before),
        "accuracy_after": accuracy(after),
    }


def _wrapped_title(ax, units: Sequence[str]) -> None:
    """Set ``ax``'s title to ``units`` joined by spaces, a line break wherever a line would be wider than
    the axes: a centred title wider than its panel runs over its neighbour's title. A unit is kept
    whole unless it is wider than the axes by itself (then it breaks at its spaces)."""
    renderer = ax.figure.canvas.get_renderer()
    limit = ax.get_window_extent(renderer).width
    title = ax.title

    def width(text: str) -> float:
        title.set_text(text)
        return title.get_window_extent(renderer).width

    words = [w for unit in units for w in ([unit] if width(unit) <= limit else unit.split(" "))]
    lines: list[str] = []
    for word in words:
        if lines and width(f"{lines[-1]} {word}") <= limit:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    title.set_text("\n".join(lines))


def edit_trajectory_figure(series: dict, width: float = PAGE, height: float | None = None):
    """A fit, the edit's transport jump, and the re-fit, as three panels sharing the position axis.

    series: from :func:`edit_trajectory_series` (or its JSON). Left: splat centres (lines, +-sigma
    bands) over the fit, positions labelled by the old tokens, deleted (and replaced) spans shaded. Middle: the
    edit script's position map (grey for kept spans, vermillion deleted, orange inserted, pink replaced)
    and each old splat's jump from its last fitted position to its transported one; pruned splats
    end in a cross, spawned splats start with a star. Right: the re-fit, labelled by the new tokens,
    inserted (and replaced) spans shaded. A transported splat keeps its colour across the three panels;
    the legend names each span colour the script uses.
    """
    arr = lambda x: np.asarray(x, dtype=float)
    fit, refit = series["fit"], series["refit"]
    f_steps, f_mu, f_sigma, f_w = (arr(fit[k]) for k in ("step", "mu", "sigma", "weight"))
    r_steps, r_mu, r_sigma, r_w = (arr(refit[k]) for k in ("step", "mu", "sigma", "weight"))
    warm_mu = arr(series["warm"]["mu"])
    old_tokens, new_tokens = series["old_tokens"], series["new_tokens"]
    L = max(len(old_tokens), len(new_tokens))
    transported, pruned, spawned = series["transported"], series["pruned"], series["spawned"]
    height = height or max(2.4, min(0.1 * L + 1.1, 9.0))
    with house_style():
        fig, (ax_fit, ax_edit, ax_refit) = plt.subplots(
            1, 3, figsize=(width, height), gridspec_kw={"width_ratios": [4, 1.2, 4], "wspace": 0.08})
        for tag, i1, i2, j1, j2 in series["script"]:
            corners = [(0, i1 - 0.5), (0, i2 - 0.5), (1, j2 - 0.5), (1, j1 - 0.5)]
            ax_edit.add_patch(Polygon(corners, closed=True, color=SPAN_COLORS[tag], alpha=0.25 if tag != "equal" else 0.35, lw=0))
            if tag in ("delete", "replace"):
                ax_fit.axhspan(i1 - 0.5, i2 - 0.5, color=SPAN_COLORS[tag], alpha=0.12, lw=0)
            if tag in ("insert", "replace"):
                ax_refit.axhspan(j1 - 0.5, j2 - 0.5, color=SPAN_COLORS[tag], alpha=0.12, lw=0)
        # viridis stops at 0.8: its yellow end, faded further by a light splat's opacity, is barely visible on white
        colors = dict(zip(transported, plt.cm.viridis(np.linspace(0.05, 0.8, max(len(transported), 1)))))
        for slot in transported:
            _draw_splat(ax_fit, f_steps, f_mu[:, slot], f_sigma[:, slot], f_w[:, slot], colors[slot], slot, edges=False, band=0.5)
            ax_edit.plot([0, 1], [f_mu[-1, slot], warm_mu[slot]], color=colors[slot], lw=1.2, gid=f"transport {slot}")
            _draw_splat(ax_refit, r_steps, r_mu[:, slot], r_sigma[:, slot], r_w[:, slot], colors[slot], slot, edges=False, band=0.5)
        for slot in pruned:
            _draw_splat(ax_fit, f_steps, f_mu[:, slot], f_sigma[:, slot], f_w[:, slot], PRUNED_COLOR, slot, edges=False, band=0.5)
            ax_fit.plot([f_steps[-1]], [f_mu[-1, slot]], marker="x", ms=5, mew=1.2, color=PRUNED_COLOR, clip_on=False,
                        gid=f"pruned {slot}")
        for slot in spawned:
            ax_refit.plot([r_steps[0]], [warm_mu[slot]], marker="*", ms=7, color=SPAWNED_COLOR, clip_on=False, zorder=5,
                          gid=f"spawned {slot}")
            _draw_splat(ax_refit, r_steps, r_mu[:, slot], r_sigma[:, slot], r_w[:, slot], SPAWNED_COLOR, slot, edges=False, band=0.5)

        ax_fit.set_xlim(f_steps[0], f_steps[-1])
        ax_refit.set_xlim(r_steps[0], r_steps[-1])
        for ax in (ax_fit, ax_refit):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 5, 10]))
        _token_axis(ax_fit, old_tokens, L)
        _token_axis(ax_refit, new_tokens, L, right=True)
        ax_edit.set_xlim(0, 1)
        ax_edit.set_ylim(L - 0.5, -0.5)
        ax_edit.set_xticks([0.5], [" "])  # a blank tick label keeps "transport" level with the other x labels
        ax_edit.tick_params(axis="x", length=0)
        fig.align_xlabels([ax_fit, ax_edit, ax_refit])
        ax_edit.set_yticks([])
        ax_edit.spines["left"].set_visible(False)
        ax_fit.set_xlabel("fit step")
        ax_edit.set_xlabel("transport")
        ax_refit.set_xlabel("re-fit step")
        ax_fit.set_ylabel("position (old tokens)")
        ax_refit.set_ylabel("position (new tokens)", rotation=270, labelpad=9)
        ax_refit.yaxis.set_label_position("right")
        acc = lambda key: [f"acc {series[key]:.0%}"] if series.get(key) is not None else []

        def counts(n: int, tokens: Sequence[str], key: str) -> list[str]:
            return [f"{counted(n, 'splats')},", counted(len(tokens), "tokens") + ("," if acc(key) else ""), *acc(key)]

        _wrapped_title(ax_fit, ["fit:", *counts(len(transported) + len(pruned), old_tokens, "accuracy_before")])
        _wrapped_title(ax_edit, ["edit"])
        start, by = series.get("start", "warm"), series.get("start_initializer")
        fresh = [] if start == "warm" else [f"({start} start{', ' + by if by else ''})"]
        _wrapped_title(ax_refit, ["re-fit:", *counts(len(transported) + len(spawned), new_tokens, "accuracy_after"), *fresh])
        handles = [
            Line2D([], [], color=plt.cm.viridis(0.5), lw=1.2, label=f"transported ({len(transported)})"),
            Line2D([], [], color=PRUNED_COLOR, lw=1.2, marker="x", label=f"pruned ({len(pruned)})"),
            Line2D([], [], color=SPAWNED_COLOR, lw=1.2, marker="*", ms=6, label=f"spawned ({len(spawned)})"),
            Patch(color=SPAN_COLORS["delete"], alpha=0.25, label="deleted span"),
            Patch(color=SPAN_COLORS["insert"], alpha=0.25, label="inserted span"),
        ]
        if any(op[0] == "replace" for op in series["script"]):  # shaded in both panels: a colour the legend must name
            handles.append(Patch(color=SPAN_COLORS["replace"], alpha=0.25, label="replaced span"))
        # below the x labels whatever the figure's height: a fixed offset in points under the middle panel
        below = offset_copy(ax_edit.transAxes, fig=fig, y=-32, units="points")
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=len(handles))
    return fig


def recovery_figure(
    edit_tokens: Sequence[int],
    steps_to_recover: Sequence[int | None],
    max_steps: int,
    ops: Sequence[str] | None = None,
    bins: Sequence[int] = (1, 2, 3, 4, 5, 7, 10),
    width: float = COLUMN,
    height: float = 2.1,
):
    """Re-fit steps each edited prompt needed to reach its cold fit's accuracy, against the edit's size.

    edit_tokens: [P] tokens touched by each edit; steps_to_recover: [P] steps, None where the re-fit
    did not get there within ``max_steps``; those sit in a separate top row ("not recovered"). ops: [P] edit kinds
    ("insert", "delete", "replace") colour the points. bins: left edges of the edit-size groups on
    the x axis; the share of prompts recovered in each group, and its size n, are written above it
    in two rows named "share recovered" and "edits (n)".
    """
    sizes = np.asarray(edit_tokens, dtype=int)
    steps = np.array([np.nan if s is None else s for s in steps_to_recover], dtype=float)
    if sizes.shape != steps.shape:
        raise ValueError(f"{len(sizes)} edit sizes but {len(steps)} recovery steps")
    if (sizes < bins[0]).any():
        raise ValueError(f"edit sizes below the first bin ({bins[0]}): {sorted(set(sizes[sizes < bins[0]].tolist()))}")
    group = np.searchsorted(np.asarray(bins), sizes, side="right") - 1
    labels = [str(lo) if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in itertools.pairwise(bins)] + [f"≥{bins[-1]}"]
    failed_row = max_steps * 1.18
    y = np.where(np.isnan(steps), failed_row, steps)
    x = group + np.random.default_rng(0).uniform(-0.3, 0.3, len(sizes))
    kinds = np.asarray(ops) if ops is not None else np.full(len(sizes), "edit")
    op_colors = {**SPAN_COLORS, "edit": "#0072B2"}
    op_markers = {"insert": "^", "delete": "v", "replace": "o"}  # shape as well as colour tells the kinds apart
    with house_style():
        fig, ax = plt.subplots(figsize=(width, height))
        for kind in dict.fromkeys(kinds.tolist()):
            pick = kinds == kind
            ax.scatter(x[pick], y[pick], s=6, lw=0, alpha=0.65, color=op_colors.get(kind), marker=op_markers.get(kind, "o"),
                       label=kind, gid=f"edits {kind}")
        # two rows above the groups, each named at the left: the share recovered, then the group's size
        share_row, n_row = failed_row + max_steps * 0.25, failed_row + max_steps * 0.14
        for g in range(len(labels)):
            members = group == g
            if members.any():
                ax.text(g, share_row, f"{np.isfinite(steps[members]).mean():.0%}", ha="center", va="center", fontsize=6,
                        color="0.3")
                ax.text(g, n_row, f"{members.sum()}", ha="center", va="center", fontsize=6, color="0.3")
        names = ax.get_yaxis_transform()  # x in axes units, y in data: just left of the axis, like a tick label
        ax.text(-0.02, share_row, "share recovered", transform=names, ha="right", va="center", fontsize=6, color="0.3")
        ax.text(-0.02, n_row, "edits (n)", transform=names, ha="right", va="center", fontsize=6, color="0.3")
        ax.axhline((max_steps + failed_row) / 2, color="0.6", lw=0.5, ls=":")
        ticks = [t for t in ax.get_yticks() if 0 <= t <= max_steps]
        ax.set_yticks(ticks + [failed_row], [f"{t:g}" for t in ticks] + ["not\nrecovered"])
        ax.set_ylim(-max_steps * 0.04, failed_row + max_steps * 0.31)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_xlabel("edit size (tokens)")
        ax.set_ylabel("re-fit steps to recover")
        if ops is not None:
            # under the x label, in one row: beside the axes it widened the figure past one column
            below = offset_copy(ax.transAxes, fig=fig, y=-26, units="points")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=3, handletextpad=0.1,
                      markerscale=2, columnspacing=1.5)
    return fig
