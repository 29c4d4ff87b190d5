"""Smoke tests of the paper figures: small synthetic input, the right number of lines and points."""

import json

import numpy as np
import pytest
import torch

from splatopt.plot import (
    STYLE_FILE,
    curves_figure,
    edit_trajectory_figure,
    house_style,
    mean_ci95,
    recovery_figure,
    save_figure,
)


def _lines(ax, prefix: str) -> list:
    return [line for line in ax.lines if (line.get_gid() or "").startswith(prefix)]


def _edit_series(steps: int = 4) -> dict:
    """An old text of 6 tokens with 3 splats; tokens 2-3 deleted (slot 1 pruned), 2 tokens inserted at 5 (slot 3 spawned)."""
    nan = None
    fit_mu = [[0.5 + 0.1 * s, 2.5, 4.5 - 0.1 * s] for s in range(steps)]
    refit_mu = [[0.6, nan, 2.6, 4.0 + 0.1 * s] for s in range(steps)]
    ones = lambda rows: [[None if m is None else 1.0 for m in row] for row in rows]
    return {
        "old_tokens": list("abcdef"), "new_tokens": list("abefXY"),
        "script": [["equal", 0, 2, 0, 2], ["delete", 2, 4, 2, 2], ["equal", 4, 6, 2, 4], ["insert", 6, 6, 4, 6]],
        "fit": {"step": list(range(0, 10 * steps, 10)), "mu": fit_mu, "sigma": ones(fit_mu), "weight": ones(fit_mu)},
        "warm": {"mu": [0.8, nan, 2.2, 4.5], "sigma": [1.0, nan, 1.0, 1.0]},
        "refit": {"step": list(range(steps)), "mu": refit_mu, "sigma": ones(refit_mu), "weight": ones(refit_mu)},
        "transported": [0, 2], "pruned": [1], "spawned": [3], "accuracy_before": 1.0, "accuracy_after": 0.5,
    }


def test_style_file_is_the_house_style():
    assert STYLE_FILE.is_file()
    import matplotlib.pyplot as plt

    with house_style():
        assert plt.rcParams["pdf.fonttype"] == 42 and plt.rcParams["savefig.dpi"] == 300
    assert STYLE_FILE.read_text() == (STYLE_FILE.parents[1] / "figures" / "splatopt.mplstyle").read_text()


def test_edit_trajectory_figure_draws_each_splat_and_each_jump(tmp_path):
    series = json.loads(json.dumps(_edit_series()))  # what the figure script reads: NaN written as null
    fig = edit_trajectory_figure(series)
    ax_fit, ax_edit, ax_refit = fig.axes
    assert sorted(line.get_gid() for line in _lines(ax_fit, "splat")) == ["splat 0", "splat 1", "splat 2"]
    assert sorted(line.get_gid() for line in _lines(ax_refit, "splat")) == ["splat 0", "splat 2", "splat 3"]
    jumps = _lines(ax_edit, "transport")
    assert len(jumps) == 2
    # each jump runs from the splat's last fitted centre to its transported centre
    assert {tuple(line.get_ydata()) for line in jumps} == {(0.5 + 0.1 * 3, 0.8), (4.5 - 0.1 * 3, 2.2)}
    assert len(_lines(ax_fit, "pruned")) == 1 and len(_lines(ax_refit, "spawned")) == 1
    assert len(ax_edit.patches) == 4  # one polygon per edit-script span
    paths = save_figure(fig, tmp_path / "edit.png", ["pdf"])
    assert all(p.stat().st_size > 2000 for p in paths)


@pytest.mark.parametrize("width", [7.0, 3.4])
def test_edit_trajectory_titles_do_not_run_into_each_other_with_a_long_start_label(width):
    """A kept fresh start put "re-fit (fresh-near start, grid): ..." over the right panel; centred and wider
    than the panel, it ran over the middle panel's "edit" (rendered "edre-fit")."""
    series = _edit_series()
    series.update(start="fresh-near", start_initializer="grid", old_tokens=[f"t{i}" for i in range(60)],
                  new_tokens=[f"u{i}" for i in range(62)])
    fig = edit_trajectory_figure(series, width=width)
    fig.canvas.draw()
    titles = [ax.title for ax in fig.axes[:3]]
    boxes = [t.get_window_extent() for t in titles]
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, f"titles overlap: {[t.get_text() for t in titles]}"
    for ax, box in zip(fig.axes[:3], boxes):  # each title stays over its own panel
        panel = ax.get_window_extent()
        assert panel.x0 - 0.5 <= box.x0 and box.x1 <= panel.x1 + 0.5
    text = " ".join(titles[2].get_text().split())
    assert text == "re-fit: 3 splats, 62 tokens, acc 50% (fresh-near start, grid)"
    assert titles[1].get_text() == "edit"


def test_edit_trajectory_series_from_a_real_edit_round_trips_through_json(model):
    import splatopt
    from splatopt.plot import edit_trajectory_series

    text = "Return the sum of a and b, rounded down."
    before = splatopt.fit(text, model, n_splats=0.5, steps=4, record_every=2, device="cpu", progress=False)
    after = splatopt.edit(before, text.replace("the sum", "the exact integer sum"), model=model, steps=3, record_every=1,
                          progress=False)
    series = json.loads(json.dumps(edit_trajectory_series(before, after, model)))
    assert series["fit"]["step"] == [0, 2, 4] and series["refit"]["step"] == [0, 1, 2, 3]
    assert len(series["old_tokens"]) == int(before.mask.sum()) and len(series["new_tokens"]) == int(after.mask.sum())
    assert series["spawned"] and len(series["warm"]["mu"]) == len(series["refit"]["mu"][0])
    fig = edit_trajectory_figure(series)
    assert len(_lines(fig.axes[1], "transport")) == len(series["transported"])
    with pytest.raises(ValueError, match="edit record"):
        edit_trajectory_series(before, before)


def test_edit_trajectory_series_takes_one_prompt_of_a_batched_edit_and_names_select_for_more(model):
    """A batched edit's records are a list: the series raised "list indices must be integers" even for
    the one prompt select([b]) leaves."""
    import splatopt
    from splatopt.plot import edit_trajectory_series

    texts = ["Return the sum of a and b.", "Another short prompt here."]
    before = splatopt.fit(texts, model, n_splats=0.5, steps=2, device="cpu", progress=False)
    after = splatopt.edit(before, ["Return the sum of a and c.", "Another short prompt there."], steps=1, progress=False,
                          fresh_start=False, fresh_near=False)
    series = edit_trajectory_series(before.select([1]), after.select([1]), model)
    assert series["new_text"] == "Another short prompt there." and series["old_text"] == texts[1]
    with pytest.raises(ValueError, match=r"`after` holds 2 prompts' edit records: .*after.select\(\[b\]\)"):
        edit_trajectory_series(before.select([0]), after)


def test_recovery_figure_has_one_point_per_prompt():
    sizes = [1, 1, 2, 3, 4, 5, 8, 12, 27]
    steps = [0, 20, None, 35, 60, None, 15, 40, None]
    ops = ["insert", "delete", "replace"] * 3
    fig = recovery_figure(sizes, steps, 60, ops=ops)
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(sizes)
    assert (points[:, 1] > 60).sum() == 3  # the unrecovered row
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4", "5–6", "7–9", "≥10"]
    with pytest.raises(ValueError, match="edit sizes"):
        recovery_figure([1, 2], [3], 60)


def test_mean_ci95_and_curves_figure():
    values = np.array([[0.0, 1.0], [1.0, 1.0]])
    mean, half = mean_ci95(values)
    np.testing.assert_allclose(mean, [0.5, 1.0])
    np.testing.assert_allclose(half, [1.96 * np.sqrt(0.5) / np.sqrt(2), 0.0])
    hist = {"step": torch.tensor([0, 5]), "token_accuracy": torch.tensor(values)}
    fig = curves_figure({"a": hist, "b": hist}, metrics=("token_accuracy",))
    assert len(fig.axes[0].lines) == 2


def test_curves_figure_cuts_a_bounded_metrics_band_at_its_bounds_and_names_the_relative_field_error():
    """The 95 % band of a token accuracy near 100 % reached 105 %, a mean no fit can have; the field error's
    axis said "field error" without saying it is relative to the target's norm."""
    values = np.array([[0.5, 0.9, 1.0], [0.8, 1.0, 1.0]])  # [S, B]: intervals that pass 1.0 at both steps
    hist = {"step": torch.tensor([0, 5]), "token_accuracy": torch.tensor(values), "field_error": torch.rand(2, 3)}
    fig = curves_figure({"a": hist})
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() <= 1.0 and band.min() >= 0.0
    assert fig.axes[1].get_ylabel() == "relative field error"


def test_curves_figure_refuses_a_metric_no_run_recorded():
    """An unknown metric name drew an empty panel, as if the runs had recorded nothing."""
    hist = {"step": torch.tensor([0, 5]), "token_accuracy": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"no run recorded \['token_acc'\]; the runs hold \['token_accuracy'\]"):
        curves_figure({"a": hist}, metrics=("token_acc",))


def test_field_figure_refuses_fields_of_other_shapes_or_token_counts():
    from splatopt.plot import field_figure

    target = torch.zeros(5, 8)
    with pytest.raises(ValueError, match=r"target \(5, 8\) and rendered \(4, 8\) must be one prompt's fields"):
        field_figure(target, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"target \(1, 5, 8\)") as err:
        field_figure(target[None], target[None])
    # the recipe it gives runs: the message named result.target, which a FitResult does not have
    assert "model.encode(model.tokenize([result.input_texts[b]]))[0]" in str(err.value) and "result.target" not in str(err.value)
    with pytest.raises(ValueError, match="3 tokens for a field of 5 positions"):
        field_figure(target, target, tokens=["a", "b", "c"])


def test_trajectory_figure_of_a_fit_recorded_at_one_step_names_record_every(model):
    """record_every=0 keeps the splats of one step: the plot had a singular x axis and one dot per splat."""
    import splatopt
    from splatopt.plot import trajectory_figure

    result = splatopt.fit("Return the sum of a and b.", model, n_splats=0.5, steps=2, record_every=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"recorded its splats at 1 step\(s\) only.*record_every > 0"):
        trajectory_figure(result)


def test_cli_refuses_plot_with_record_every_0_before_fitting(monkeypatch, tmp_path, capsys):
    import splatopt
    from splatopt.cli import main

    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted before refusing the plot"))
    assert main(["fit", "Some text.", "--record-every", "0", "--plot", str(tmp_path / "t.png"), "--device", "cpu"]) == 2
    assert "--record-every 0 records only the last step" in capsys.readouterr().err


@pytest.mark.parametrize("out, plot", [("same.png", "same.png"), ("fig.png", "fig")])
def test_cli_refuses_out_and_plot_naming_one_file_before_fitting(out, plot, monkeypatch, tmp_path, capsys):
    """The figure would replace the saved fit (a plot without a suffix is written as .png)."""
    import splatopt
    from splatopt.cli import main

    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted before refusing the outputs"))
    args = ["fit", "Some text.", "--out", str(tmp_path / out), "--plot", str(tmp_path / plot), "--device", "cpu"]
    assert main(args) == 2
    assert "the figure would replace the fit; give them different names" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_cli_refuses_an_output_under_a_file_before_fitting(option, monkeypatch, tmp_path, capsys):
    import splatopt
    from splatopt.cli import main

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(splatopt, "fit", lambda *a, **k: pytest.fail("fitted before refusing the output"))
    assert main(["fit", "Some text.", option, str(tmp_path / "afile" / "run.png"), "--device", "cpu"]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_trajectory_figure_title_says_1_splat_not_1_splats():
    import splatopt

    field = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    result = splatopt.fit(field, n_splats=1, steps=2, record_every=1, objective="mse", device="cpu", progress=False)
    from splatopt.plot import trajectory_figure

    assert trajectory_figure(result).axes[0].get_title() == "1 splat, 3 tokens"
