"""Training curves for any number of classes (a 117-class CT logs one val_dice_* column per class)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from segment import figures
from segment.figures import plot_training_curves, training_curves_figure

EPOCHS = 4


def _class_dice(n_classes: int) -> np.ndarray:
    """(epochs, classes) Dice: class k ends at a distinct value, classes 7, 3, 30, 12, 21 end worst (in that order)."""
    final = np.linspace(0.5, 0.95, n_classes)
    for rank, k in enumerate((7, 3, 30, 12, 21)):
        final[k] = 0.01 * (rank + 1)
    ramp = np.linspace(0.2, 1.0, EPOCHS)[:, None]
    return ramp * final[None, :]


def _write_metrics(path: Path, dice: np.ndarray, with_mean: bool = True) -> Path:
    """A Lightning-style metrics.csv: training rows (loss only) between validation rows (Dice only)."""
    n_classes = dice.shape[1]
    classes = [f"val_dice_class_{k}" for k in range(n_classes)]
    header = ["epoch", "step", "train_loss_step"] + classes + (["val_dice_mean"] if with_mean else [])
    rows = [",".join(header)]
    for e in range(EPOCHS):
        rows.append(",".join([str(e), str(10 * e + 5), f"{1.0 / (e + 1):.4f}"] + [""] * (len(header) - 3)))
        values = [f"{v:.6f}" for v in dice[e]] + ([f"{dice[e].mean():.6f}"] if with_mean else [])
        rows.append(",".join([str(e), str(10 * e + 9), ""] + values))
    path.write_text("\n".join(rows) + "\n")
    return path


def _drawn(ax) -> list:
    """Lines that hold data (legend-only proxies have none)."""
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def _png_width(path: Path) -> int:
    assert path.is_file() and path.stat().st_size > 5_000
    return mpimg.imread(path).shape[1]


@pytest.mark.parametrize("n_classes", [40, 117])
def test_many_classes_plot_the_mean_the_worst_by_name_and_the_rest_unnamed(tmp_path: Path, n_classes: int) -> None:
    dice = _class_dice(n_classes)
    csv = _write_metrics(tmp_path / "metrics.csv", dice)

    out = plot_training_curves({"run": csv}, tmp_path / "curves.png")  # StopIteration before the fix
    assert out == tmp_path / "curves.png" and _png_width(out) == 1500  # widened: the legend sits beside the axes

    fig = training_curves_figure({"run": csv})
    try:
        ax_loss, ax_dice = fig.axes
        labels = ax_dice.get_legend().get_texts()
        worst = [f"run: val_dice_class_{k} (worst)" for k in (7, 3, 30, 12, 21)]
        assert [t.get_text() for t in labels] == (["run: val_dice_mean"] + worst
                                                   + [f"run: {n_classes - 5} other classes"])
        lines = _drawn(ax_dice)
        assert len(lines) == 1 + n_classes  # every class is drawn, only 5 of them named
        by_label = {line.get_label(): line for line in lines}
        np.testing.assert_allclose(by_label["run: val_dice_mean"].get_ydata(), dice.mean(axis=1), atol=1e-6)
        np.testing.assert_allclose(by_label["run: val_dice_mean"].get_xdata(), np.arange(EPOCHS))
        np.testing.assert_allclose(by_label[worst[0]].get_ydata(), dice[:, 7], atol=1e-6)
        assert by_label["run: val_dice_mean"].get_linewidth() > by_label[worst[0]].get_linewidth()
        unnamed = [line for line in lines if line.get_label().startswith("_")]
        assert len(unnamed) == n_classes - 5 and all(line.get_alpha() == pytest.approx(0.25) for line in unnamed)
        assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["run: train_loss_step"]
        np.testing.assert_allclose(_drawn(ax_loss)[0].get_ydata(), [1.0, 0.5, 0.3333, 0.25], atol=1e-4)
    finally:
        plt.close(fig)


def test_many_classes_without_a_logged_mean_draw_the_mean_of_the_classes(tmp_path: Path) -> None:
    dice = _class_dice(40)
    csv = _write_metrics(tmp_path / "metrics.csv", dice, with_mean=False)
    fig = training_curves_figure({"run": csv})
    try:
        by_label = {line.get_label(): line for line in _drawn(fig.axes[1])}
        np.testing.assert_allclose(by_label["run: mean of 40 classes"].get_ydata(), dice.mean(axis=1), atol=1e-6)
    finally:
        plt.close(fig)


def test_two_variants_with_many_classes_keep_one_colour_each(tmp_path: Path) -> None:
    a = _write_metrics(tmp_path / "a.csv", _class_dice(40))
    b = _write_metrics(tmp_path / "b.csv", _class_dice(40) * 0.5)
    assert _png_width(plot_training_curves({"a": a, "b": b}, tmp_path / "t.png")) == 1500
    fig = training_curves_figure({"a": a, "b": b})
    try:
        lines = _drawn(fig.axes[1])
        assert len(lines) == 2 * 41
        assert {line.get_color() for line in lines} == {"C0", "C1"}
        assert len(fig.axes[1].get_legend().get_texts()) == 2 * 7
    finally:
        plt.close(fig)


def test_few_classes_are_all_named_with_distinct_styles_and_the_legend_inside(tmp_path: Path) -> None:
    dice = _class_dice(40)[:, 35:38]  # 3 classes
    csv = _write_metrics(tmp_path / "metrics.csv", dice)
    assert _png_width(plot_training_curves({"run": csv}, tmp_path / "t.png")) == 1000  # the usual 10 x 4 in
    fig = training_curves_figure({"run": csv})
    try:
        ax_dice = fig.axes[1]
        assert [t.get_text() for t in ax_dice.get_legend().get_texts()] == [
            "run: val_dice_mean", "run: val_dice_class_0", "run: val_dice_class_1", "run: val_dice_class_2"]
        styles = {(line.get_linestyle(), line.get_marker()) for line in _drawn(ax_dice)}
        assert len(styles) == 4
    finally:
        plt.close(fig)


def test_a_failure_without_text_is_reported_by_its_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers print `could not plot training curves: {err}`; a bare StopIteration used to leave that reason empty."""
    csv = _write_metrics(tmp_path / "metrics.csv", _class_dice(40))

    def boom(path):
        raise StopIteration

    monkeypatch.setattr(figures, "_read_metrics_csv", boom)
    before = plt.get_fignums()
    with pytest.raises(RuntimeError, match=r"curves\.png: could not draw the training curves \(StopIteration\)$"):
        plot_training_curves({"run": csv}, tmp_path / "curves.png")
    assert plt.get_fignums() == before  # the half-drawn figure is closed
    assert not (tmp_path / "curves.png").exists()
