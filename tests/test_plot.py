"""``fnlight plot RUN [RUN ...]``: several runs in one figure, read back as a PNG and as the figure drawn."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from fnlight.cli import main
from fnlight.train.rundir import read_resumes

pytest.importorskip("matplotlib")

SMALL = ("--set", "hidden=16")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short digits runs; the first was stopped after 1 epoch and resumed to 3."""
    root = tmp_path_factory.mktemp("plot")
    for args in (("--max-epochs", "1", "--run-dir", root / "a"), ("--max-epochs", "3", "--run-dir", root / "a"),
                 ("--max-epochs", "3", "--set", "lr=0.01", "--run-dir", root / "b"),
                 ("--max-epochs", "2", "--set", "lr=0.05", "--run-dir", root / "c")):
        res = invoke("fit", *SMALL, *args)
        assert res.exit_code == 0, res.output
    return [root / "a", root / "b", root / "c"]


def rgb(hex_colour: str):
    return [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]


@pytest.mark.slow
def test_several_runs_in_one_png_one_colour_each(runs, tmp_path):
    import matplotlib.image
    import numpy as np

    out = tmp_path / "abc.png"
    res = subprocess.run([sys.executable, "-m", "fnlight.cli", "plot", *map(str, runs), "--metric", "loss",
                          "--metric", "acc", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"plot: {out}"
    img = matplotlib.image.imread(out)
    # 4 panels (loss, acc, and their per-step panels) in 3 columns and 2 rows of 4.5 x 3.2 in (+ 0.3 in for
    # the title naming the runs) at 100 dpi
    assert img.shape == (670, 1350, 4)
    pixels = img[..., :3].reshape(-1, 3)
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # matplotlib's C0, C1, C2: one per run
        near = np.abs(pixels - rgb(colour)).max(axis=1) < 0.05
        assert near.sum() > 200, (colour, near.sum())
    near = np.abs(pixels - rgb("#d62728")).max(axis=1) < 0.05  # C3: no fourth run, no fourth colour
    assert near.sum() < 20


@pytest.mark.slow
def test_the_figure_has_panels_legends_whole_epoch_ticks_and_resume_marks(runs):
    from fnlight._cli_files import figure

    a, b, c = runs
    assert [(r["step"], r["epoch"]) for r in read_resumes(a)] == [(23, 1)]
    assert read_resumes(b) == read_resumes(c) == []
    fig = figure(runs, ["loss", "acc"])
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "acc", "loss per step", "acc per step"]
    loss, _, loss_steps, _ = axes
    labels = loss.get_legend().get_texts()
    assert [t.get_text() for t in labels] == ["a: train/loss", "a: val/loss", "b: train/loss", "b: val/loss",
                                              "c: train/loss", "c: val/loss", "resumed"]
    colours = {line.get_label().split(":")[0]: line.get_color() for line in loss.lines if ":" in line.get_label()}
    assert colours == {"a": "C0", "b": "C1", "c": "C2"}
    ticks = [t.get_text() for t in loss.get_xticklabels() if t.get_text()]
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks), ticks  # whole epochs only
    marks = [line for line in loss.lines if line.get_linestyle() == ":"]
    assert [(line.get_xdata()[0], line.get_color()) for line in marks] == [(0.5, "C0")]  # between epochs 0 and 1
    marks = [line for line in loss_steps.lines if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in marks] == [23]


def test_plot_metric_that_no_run_has_is_a_one_line_error(runs):
    res = invoke("plot", *runs, "--metric", "bleu")
    assert res.exit_code == 2 and res.output.strip().startswith("error: no metric 'bleu'"), res.output
    assert "the panels are loss, acc" in res.output and len(res.output.strip().splitlines()) == 1


def test_plot_of_one_run_writes_into_it(runs):
    res = invoke("plot", runs[1])
    assert res.exit_code == 0 and (runs[1] / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", res.output
