"""Per-case, per-class segmentation metrics in millimetres: Dice, HD95, ASSD and normalised surface Dice (NSD).

The numbers come from MONAI (`compute_dice`, `compute_hausdorff_distance`, `compute_average_surface_distance`,
`compute_surface_dice`), always with the voxel spacing, so distances are in mm whatever the grid. Surfaces are
MONAI's: the mask voxels removed by one binary erosion; a surface distance is from a surface voxel's centre to
the nearest surface voxel centre of the other mask. HD95 is MONAI's: the 95th percentile of each direction's
distances, then the larger of the two.

Empty-mask conventions (the same for every class):

* reference and prediction both empty: Dice 1, NSD 1, HD95 0, ASSD 0 (nothing to find, nothing found);
* exactly one empty: Dice 0, NSD 0, HD95 and ASSD NaN. A distance to nothing is undefined, so it is reported as
  missing (an empty CSV cell) and counted as `n_missing` in summaries, never silently averaged in as 0 or inf.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segment.errors import GeometryError, InputError

if TYPE_CHECKING:
    from rich.table import Table

    from segment.config import EvaluateConfig

METRICS: tuple[str, ...] = ("dice", "hd95", "assd", "nsd")
HIGHER_IS_BETTER: dict[str, bool] = {"dice": True, "hd95": False, "assd": False, "nsd": True}
UNITS: dict[str, str] = {"dice": "", "hd95": "mm", "assd": "mm", "nsd": ""}
LABELS: dict[str, str] = {"dice": "Dice", "hd95": "HD95", "assd": "ASSD", "nsd": "NSD"}


def _check_inputs(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    """Fail with a message a user can act on instead of a MONAI shape error deep inside."""
    if pred.shape != ref.shape:
        raise GeometryError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}: "
                            "they must be on the same voxel grid")
    if pred.ndim not in (2, 3):
        raise GeometryError(f"expected a 2D or 3D label map, got {pred.ndim} dimensions (shape {pred.shape})")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise GeometryError(f"spacing {tuple(spacing)} must be {pred.ndim} positive numbers (mm), one per axis")
    return sp


def _crop_union(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their union's bounding box plus one voxel: same metrics, far less memory on big CTs."""
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return p[box], r[box]


def _binary_metrics(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tol: float, pct: float) -> dict[str, float]:
    """Metrics of one binary mask pair, with the documented empty-mask conventions."""
    if not p.any() and not r.any():
        return {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if not p.any() or not r.any():
        return {"dice": 0.0, "hd95": math.nan, "assd": math.nan, "nsd": 0.0}
    import torch
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_surface_dice)

    p, r = _crop_union(p, r)
    yp = torch.from_numpy(p[None, None].astype(np.float32))
    y = torch.from_numpy(r[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; both are non-empty here
        dice = compute_dice(yp, y, include_background=True, ignore_empty=False)
        hd = compute_hausdorff_distance(yp, y, include_background=True, percentile=pct, spacing=spacing)
        assd = compute_average_surface_distance(yp, y, include_background=True, symmetric=True, spacing=spacing)
        nsd = compute_surface_dice(yp, y, class_thresholds=[tol], include_background=True, spacing=spacing)
    return {"dice": float(dice[0, 0]), "hd95": float(hd[0, 0]), "assd": float(assd[0, 0]), "nsd": float(nsd[0, 0])}


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], classes: dict[int, str],
                 nsd_tolerance_mm: float = 1.0, hd_percentile: float = 95.0) -> list[dict[str, Any]]:
    """One row per foreground class of one case: Dice, HD95 (mm), ASSD (mm), NSD and both voxel counts.

    `pred` and `ref` are integer label maps on the same grid; `spacing` is the voxel size in mm per axis.
    The `hd95` key holds the `hd_percentile` Hausdorff distance (95 unless configured otherwise).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    sp = _check_inputs(pred, ref, spacing)
    if nsd_tolerance_mm <= 0 or not 0 < hd_percentile <= 100:
        raise InputError(f"nsd_tolerance_mm={nsd_tolerance_mm} must be > 0 and hd_percentile={hd_percentile} in (0, 100]")
    rows = []
    for idx, name in classes.items():
        if idx == 0:
            continue  # background is not a structure
        p, r = pred == idx, ref == idx
        vals = _binary_metrics(p, r, sp, nsd_tolerance_mm, hd_percentile)
        rows.append({"class": int(idx), "name": str(name), **vals,
                     "ref_voxels": int(r.sum()), "pred_voxels": int(p.sum())})
    return rows


def evaluate_cases(cases: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[float]]], classes: dict[int, str],
                   cfg: EvaluateConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Metrics for many `(case_id, pred, ref, spacing)` tuples, with a progress bar; rows gain a "case" key."""
    from rich.progress import track

    total = len(cases) if isinstance(cases, Sized) else None
    rows: list[dict[str, Any]] = []
    for case_id, pred, ref, spacing in track(cases, description="Evaluating", total=total, disable=not progress,
                                             transient=True):
        try:
            case_rows = case_metrics(pred, ref, spacing, classes, cfg.nsd_tolerance_mm, cfg.hd_percentile)
        except GeometryError as err:
            raise GeometryError(f"case {case_id}: {err}") from None
        rows.extend({"case": case_id, **row} for row in case_rows)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write metric rows as CSV; NaN (missing) becomes an empty cell so spreadsheets and pandas read it as missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return path


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per class and metric: mean, std (sample, ddof=1), median, n (cases with a value) and n_missing (NaN)."""
    out = []
    names = list(dict.fromkeys(row["name"] for row in rows))
    for name in names:
        for metric in METRICS:
            vals = np.array([row[metric] for row in rows if row["name"] == name], dtype=float)
            ok = vals[~np.isnan(vals)]
            n = int(ok.size)
            out.append({"name": name, "metric": metric, "n": n, "n_missing": int(vals.size - n),
                        "mean": float(ok.mean()) if n else math.nan,
                        "std": float(ok.std(ddof=1)) if n > 1 else (0.0 if n else math.nan),
                        "median": float(np.median(ok)) if n else math.nan})
    return out


def fmt_value(value: float, metric: str) -> str:
    """A metric value with the precision that matters for it: 3 decimals for overlaps, 2 for millimetres."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if metric in ("dice", "nsd") else f"{value:.2f}"


def summary_table(rows: list[dict[str, Any]], title: str = "Segmentation metrics (mean ± std over cases)") -> Table:
    """A rich table, one line per class, one column per metric; missing values are counted, not hidden."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class")
    for metric in METRICS:
        unit = f" ({UNITS[metric]})" if UNITS[metric] else ""
        table.add_column(LABELS[metric] + unit, justify="right")
    table.add_column("cases", justify="right")
    by_key = {(s["name"], s["metric"]): s for s in summarize(rows)}
    for name in dict.fromkeys(row["name"] for row in rows):
        cells = []
        for metric in METRICS:
            s = by_key[(name, metric)]
            cell = f"{fmt_value(s['mean'], metric)} ± {fmt_value(s['std'], metric)}"
            cells.append(cell + (f" [{s['n_missing']} missing]" if s["n_missing"] else ""))
        n_cases = by_key[(name, "dice")]["n"] + by_key[(name, "dice")]["n_missing"]
        table.add_row(name, *cells, str(n_cases))
    return table

