"""Figures from plain arrays and logs (contours, boundary error, training curves, gradient norms), for reports and runs.

Every function writes one PNG and returns its path, so a report can embed it by relative path.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy.ndimage import distance_transform_edt  # noqa: E402

from segment.errors import GeometryError, InputError, SegmentError  # noqa: E402

REF_COLOUR = "yellow"
PRED_COLOURS = ("red", "cyan", "magenta", "orange", "lime", "deepskyblue")
DPI = 100


def _save(fig: Any, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _pick_slices(masks: list[np.ndarray], n_slices: int) -> list[int]:
    """Evenly spaced axial slices inside the reference structure (or any mask when the reference is empty)."""
    for m in masks:
        zs = np.flatnonzero(m.any(axis=(0, 1)))
        if zs.size:
            pos = np.linspace(zs.min(), zs.max(), n_slices + 2)[1:-1]
            return sorted(set(int(round(p)) for p in pos))
    depth = masks[0].shape[2]
    return sorted(set(int(round(p)) for p in np.linspace(0, depth - 1, n_slices + 2)[1:-1]))


def _zoom_box(masks: list[np.ndarray], shape: tuple[int, ...]) -> tuple[slice, slice]:
    """In-plane bounding box of every boundary, with a margin of a quarter of its size (at least 4 voxels)."""
    union = np.any([m.any(axis=2) for m in masks], axis=0)
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    idx = np.argwhere(union)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    margin = np.maximum((hi - lo) // 4, 4)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, shape[:2])
    return slice(lo[0], hi[0]), slice(lo[1], hi[1])


def plot_contours(image: np.ndarray, ref: np.ndarray, preds: dict[str, np.ndarray], out: Path, *, n_slices: int = 3,
                  zoom: bool = True, title: str = "", spacing: Sequence[float] | None = None) -> Path:
    """Axial slices (last axis) with the reference and each prediction's contours, one colour per source.

    Each label value gets its own contour, so adjacent classes stay distinguishable. `spacing` only sets the
    in-plane aspect ratio. Seeing where contours part is what a Dice number cannot show.
    """
    image, ref = np.asarray(image, dtype=float), np.asarray(ref)
    if image.ndim == 2:
        image, ref, preds = image[..., None], ref[..., None], {k: np.asarray(v)[..., None] for k, v in preds.items()}
    bad = [k for k, v in preds.items() if np.shape(v) != image.shape] + (["reference"] if ref.shape != image.shape else [])
    if bad:
        raise GeometryError(f"plot_contours: {', '.join(bad)} not on the image grid {image.shape}")
    masks = [ref > 0] + [np.asarray(p) > 0 for p in preds.values()]
    slices = _pick_slices(masks, max(1, n_slices))
    box = _zoom_box(masks, image.shape) if zoom else (slice(None), slice(None))
    labels = [int(v) for v in np.unique(np.concatenate([np.unique(ref)] + [np.unique(p) for p in preds.values()])) if v]
    aspect = float(spacing[1]) / float(spacing[0]) if spacing is not None else 1.0
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.6), squeeze=False)
    crop = image[box]
    vmin, vmax = np.percentile(crop, [1, 99]) if crop.size else (0.0, 1.0)
    for ax, z in zip(axes[0], slices):
        ax.imshow(image[box][:, :, z].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect)
        sources = [(ref, REF_COLOUR, 3.0)] + [(p, PRED_COLOURS[i % len(PRED_COLOURS)], 1.2)
                                            for i, p in enumerate(preds.values())]
        for lab_map, colour, width in sources:
            for lab in labels:
                m = (np.asarray(lab_map)[box][:, :, z] == lab).T.astype(float)
                if m.any() and not m.all():
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=width)
        ax.set_title(f"slice {z}", fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([], [], color=REF_COLOUR, lw=3, label="reference")]
    handles += [Line2D([], [], color=PRED_COLOURS[i % len(PRED_COLOURS)], lw=1.2, label=k) for i, k in enumerate(preds)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return _save(fig, out)


def worst_boundary_error(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[tuple[int, ...], float]:
    """The voxel where the prediction is furthest from the reference surface, and that distance in mm.

    Among the voxels whose label differs (`pred != ref`), the one furthest (`distance_transform_edt` with
    `sampling=spacing`) from the reference boundary: a false positive far outside or a miss deep inside. With an
    empty reference, distances are to the prediction's boundary; with no disagreement, the centre of the reference
    (or of the volume) and 0.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or len(spacing) != ref.ndim:
        raise GeometryError(f"worst_boundary_error: shapes {pred.shape}/{ref.shape} and spacing {tuple(spacing)} "
                            "must match")
    wrong = pred != ref
    anchor = ref > 0 if (ref > 0).any() else pred > 0
    if not wrong.any() or not anchor.any():
        fg = np.argwhere(anchor)
        centre = fg.mean(axis=0).round().astype(int) if fg.size else np.array(ref.shape) // 2
        return tuple(int(v) for v in centre), 0.0
    sp = np.asarray(spacing, dtype=float)
    dist = np.maximum(distance_transform_edt(~anchor, sampling=sp), distance_transform_edt(anchor, sampling=sp))
    idx = np.argwhere(wrong)
    k = int(np.argmax(dist[tuple(idx.T)]))
    return tuple(int(v) for v in idx[k]), float(dist[tuple(idx[k])])


def plot_case_panels(panels: Sequence[dict[str, Any]], out: Path, *, title: str = "") -> Path:
    """One axial slice per panel with reference (yellow) and prediction contours, a cross at `point`.

    Each panel: "image", "ref", "pred" (3D arrays on one grid), "point" (voxel index; its last coordinate is the
    slice), "title", and optional "spacing" (sets the in-plane aspect). Zoomed to the structures on that slice.
    """
    if not panels:
        raise InputError("plot_case_panels: no panels to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        image, ref, pred = (np.asarray(panel[k]) for k in ("image", "ref", "pred"))
        if not image.shape == ref.shape == pred.shape:
            raise GeometryError(f"plot_case_panels: image {image.shape}, reference {ref.shape} and prediction "
                                f"{pred.shape} must share one grid")
        point = [int(v) for v in panel["point"]]
        z = point[2]
        masks = [ref[..., z:z + 1] > 0, pred[..., z:z + 1] > 0]
        box = _zoom_box(masks, image.shape)
        box = tuple(slice(min(b.start, p), max(b.stop, p + 1)) for b, p in zip(box, point[:2]))
        spacing = panel.get("spacing")
        aspect = float(spacing[1]) / float(spacing[0]) if spacing is not None else 1.0
        crop = image[box][:, :, z]
        vmin, vmax = np.percentile(crop, [1, 99]) if crop.size else (0.0, 1.0)
        ax.imshow(crop.T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect)
        labels = [int(v) for v in np.unique(np.concatenate([np.unique(ref), np.unique(pred)])) if v]
        for lab_map, colour, width in ((ref, REF_COLOUR, 3.0), (pred, PRED_COLOURS[0], 1.2)):
            for lab in labels:
                m = (lab_map[box][:, :, z] == lab).T.astype(float)
                if m.any() and not m.all():
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=width)
        ax.plot(point[0] - box[0].start, point[1] - box[1].start, "x", color="white", ms=9, mew=2)
        ax.set_title(str(panel.get("title", f"slice {z}")), fontsize=8)
        ax.set_axis_off()
    handles = [Line2D([], [], color=REF_COLOUR, lw=3, label="reference"),
               Line2D([], [], color=PRED_COLOURS[0], lw=1.2, label="prediction"),
               Line2D([], [], color="white", marker="x", lw=0, mec="black", label="worst boundary error")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.93))
    return _save(fig, out)


def boundary_error_profile(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], max_mm: float = 10.0,
                           bins: int | Sequence[float] | None = None, signed: bool = True) -> dict[str, Any]:
    """Error rate (FP + FN voxels / voxels) against distance from the reference surface, in mm.

    Distance is from a voxel centre to the nearest voxel centre on the other side of the reference boundary
    (`distance_transform_edt` with `sampling=spacing`), less half the finest spacing because the surface lies between
    the two centres; negative = inside the reference when `signed`. Masks are
    binarised with `> 0`. Returns raw `errors` and `counts` per bin so the caller can pool cases by summing them
    (`pool_profiles`); `rate` is their ratio, NaN where a bin is empty. An empty or full reference adds nothing.
    """
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if pred.shape != ref.shape or len(spacing) != ref.ndim:
        raise GeometryError(f"boundary_error_profile: shapes {pred.shape}/{ref.shape} and spacing {tuple(spacing)} "
                            "must match")
    if bins is None:
        bins = int(round(2 * max_mm)) if signed else int(round(max_mm))
    edges = np.linspace(-max_mm if signed else 0.0, max_mm, bins + 1) if isinstance(bins, int) else np.asarray(bins, float)
    errors, counts = np.zeros(edges.size - 1), np.zeros(edges.size - 1)
    if ref.any() and not ref.all():
        sp = np.asarray(spacing, dtype=float)
        idx = np.argwhere(ref)
        margin = np.ceil(max_mm / sp).astype(int) + 1
        lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + margin + 1, ref.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        r, p = ref[box], pred[box]
        dist = distance_transform_edt(~r, sampling=sp) - distance_transform_edt(r, sampling=sp)
        dist = np.sign(dist) * (np.abs(dist) - sp.min() / 2)  # the surface lies half a voxel from the centres
        dist = dist if signed else np.abs(dist)
        counts = np.histogram(dist, bins=edges)[0].astype(float)
        errors = np.histogram(dist[p != r], bins=edges)[0].astype(float)
    return _with_rate({"edges": edges, "errors": errors, "counts": counts, "signed": signed})


def _with_rate(profile: dict[str, Any]) -> dict[str, Any]:
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(profile["counts"] > 0, profile["errors"] / profile["counts"], np.nan)
    return {**profile, "rate": rate}


def pool_profiles(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-case profiles (same bins) into one: pooled error counts over pooled voxel counts."""
    if not profiles:
        raise InputError("pool_profiles: no profiles to pool")
    edges = profiles[0]["edges"]
    if any(not np.array_equal(p["edges"], edges) for p in profiles):
        raise InputError("pool_profiles: profiles use different bins")
    return _with_rate({"edges": edges, "errors": sum(p["errors"] for p in profiles),
                       "counts": sum(p["counts"] for p in profiles), "signed": profiles[0]["signed"]})


def plot_boundary_error(profiles: dict[str, dict[str, Any]], out: Path) -> Path:
    """One error-rate curve per variant: where near the boundary each model goes wrong."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    signed = True
    for i, (name, prof) in enumerate(profiles.items()):
        centres = (prof["edges"][:-1] + prof["edges"][1:]) / 2
        ax.plot(centres, prof["rate"], marker="o", ms=3, color=f"C{i}", label=name)
        signed = signed and bool(prof.get("signed", True))
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("distance from reference surface (mm)" + (", negative = inside" if signed else ""))
    ax.set_ylabel("error rate (FP + FN fraction)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def _read_metrics_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a Lightning CSVLogger metrics.csv as float arrays; blank or non-numeric cells become NaN."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training log not found (expected a Lightning CSVLogger metrics.csv)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    def num(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    cols = rows[0].keys() if rows else []
    return {c: np.array([num(r.get(c)) for r in rows]) for c in cols}


LOSS_STYLES = ("-", "--", ":", "-.")
DICE_STYLES = ("s--", "^:", "d-.", "v-", "P--", "X:", "*-.", "h-")  # per class; the mean is a bold "o-"
MEAN_DICE = ("val_dice_mean", "val_dice")  # the logged mean over classes (either name), drawn bold
NAMED_CLASSES = 8  # up to this many per-class Dice curves are drawn and named one by one; beyond it see below
WORST_NAMED = 5  # with more classes: the mean, these worst classes by name, the rest as thin unnamed lines
LEGEND_INSIDE = 6  # a legend with more entries goes beside the plot, not over the curves


def _plot_series(ax: Any, x: np.ndarray, y: np.ndarray, label: str | None, colour: str, style: str,
                 **kwargs: Any) -> bool:
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.any():
        ax.plot(x[ok], y[ok], style, color=colour, label=label, ms=3, **kwargs)
    return bool(ok.any())


def _last_value(y: np.ndarray) -> float:
    finite = y[np.isfinite(y)]
    return float(finite[-1]) if finite.size else math.inf


def _plot_dice(ax: Any, name: str, epoch: np.ndarray, cols: dict[str, np.ndarray], colour: str) -> bool:
    """One variant's validation Dice: every class by name when there are few; with many (a 117-class CT) the mean in
    bold, the `WORST_NAMED` classes with the lowest last Dice by name and the others as thin unnamed lines, so the
    figure stays readable at any number of classes."""
    mean_cols = [c for c in cols if c in MEAN_DICE]
    class_cols = [c for c in cols if c.startswith("val_dice") and c not in MEAN_DICE]
    drawn = False
    for col in mean_cols:
        drawn |= _plot_series(ax, epoch, cols[col], f"{name}: {col}", colour, "o-", lw=2.2, zorder=3)
    if len(class_cols) <= NAMED_CLASSES:
        for k, col in enumerate(class_cols):
            drawn |= _plot_series(ax, epoch, cols[col], f"{name}: {col}", colour, DICE_STYLES[k % len(DICE_STYLES)])
        return drawn
    if not mean_cols:  # no logged mean: draw the mean of the per-class curves
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rows without validation (training steps) are all NaN
            mean = np.nanmean(np.stack([cols[c] for c in class_cols]), axis=0)
        drawn |= _plot_series(ax, epoch, mean, f"{name}: mean of {len(class_cols)} classes", colour, "o-", lw=2.2,
                              zorder=3)
    ranked = sorted(class_cols, key=lambda c: _last_value(cols[c]))  # stable: ties keep the log's column order
    named, others = ranked[:WORST_NAMED], ranked[WORST_NAMED:]
    for k, col in enumerate(named):
        drawn |= _plot_series(ax, epoch, cols[col], f"{name}: {col} (worst)", colour, DICE_STYLES[k % len(DICE_STYLES)],
                              lw=1.0)
    for col in others:
        drawn |= _plot_series(ax, epoch, cols[col], None, colour, "-", lw=0.6, alpha=0.25)
    if others:
        ax.plot([], [], "-", color=colour, lw=0.6, alpha=0.25, label=f"{name}: {len(others)} other classes")
    return drawn


def training_curves_figure(csv_files: dict[str, Path]) -> Any:
    """The figure of `plot_training_curves`, not saved (the caller closes it): loss by step on the left, validation
    Dice by epoch on the right, one colour per variant."""
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        _draw_training_curves(fig, ax_loss, ax_dice, csv_files)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw_training_curves(fig: Any, ax_loss: Any, ax_dice: Any, csv_files: dict[str, Path]) -> None:
    drawn = {ax_loss: False, ax_dice: False}
    for i, (name, path) in enumerate(csv_files.items()):
        cols = _read_metrics_csv(path)
        n = len(next(iter(cols.values()))) if cols else 0
        step = cols.get("step", np.arange(n, dtype=float))
        epoch = cols.get("epoch", step)
        loss_cols = [c for c in cols if "loss" in c]
        for k, col in enumerate(loss_cols):
            drawn[ax_loss] |= _plot_series(ax_loss, step, cols[col], f"{name}: {col}", f"C{i}",
                                           LOSS_STYLES[k % len(LOSS_STYLES)])
        drawn[ax_dice] |= _plot_dice(ax_dice, name, epoch, cols, f"C{i}")
    outside = False
    for ax, xlabel, ylabel in ((ax_loss, "step", "loss"), (ax_dice, "epoch", "validation Dice")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[1])
        if drawn[ax] and entries > LEGEND_INSIDE:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
            outside = True
        elif drawn[ax]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} logged", ha="center", va="center", transform=ax.transAxes)
    if outside:  # room on the right of each axis for its legend
        fig.set_size_inches(15, 4.5)
        fig.set_layout_engine("constrained")
    else:
        fig.tight_layout()


def plot_training_curves(csv_files: dict[str, Path], out: Path) -> Path:
    """Training loss (columns containing "loss") by step and validation Dice ("val_dice*") by epoch, per variant.

    Any number of classes plots: up to `NAMED_CLASSES` per-class curves are named one by one, beyond that the mean,
    the worst classes and the rest unnamed (see `_plot_dice`). A user-facing error (a missing log) is raised as it is;
    any other failure as a RuntimeError whose message always says what went wrong (the error's type when it has no
    text, as StopIteration has none), because callers print only str(err).
    """
    fig = None
    try:
        fig = training_curves_figure(csv_files)
        return _save(fig, out)
    except SegmentError:
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise RuntimeError(f"{out}: could not draw the training curves ({reason})") from err
    finally:
        if fig is not None:
            plt.close(fig)


def plot_gradient_norms(norms: dict[str, list[float]], out: Path) -> Path:
    """Gradient norm per encoder depth (0 = highest resolution) per variant: do deep stages still learn without skips?"""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values = [v for vals in norms.values() for v in vals if v is not None and math.isfinite(v)]
    for i, (name, vals) in enumerate(norms.items()):
        y = np.array([math.nan if v is None else v for v in vals], dtype=float)
        ax.plot(np.arange(y.size), y, "o-", color=f"C{i}", label=name)
    if values and min(values) > 0:
        ax.set_yscale("log")
    depth = max((len(v) for v in norms.values()), default=0)
    ax.set_xticks(range(depth))
    ax.set_xlabel("encoder depth (0 = highest resolution)")
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    if norms:
        ax.legend()
    fig.tight_layout()
    return _save(fig, out)
