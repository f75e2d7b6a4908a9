"""After `segment train --folds K`: each fold scores its own validation cases in their original geometry.

Every validation case is predicted by the fold that did not train on it (exactly as `segment predict` would write it,
on the scan's own grid) and scored with `segment.evaluation.metrics` (Dice, HD95, NSD in mm, mean over the foreground
classes). The run folder gets cv_cases.csv (one row per case), cv.csv (per fold and the mean of the folds) and
confidence.json: the "check this case" threshold, the confidence score below which the worst
`FLAG_QUANTILE` of the validation cases lie (each fold folder gets the same file).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from segment.config import Config
from segment.errors import InputError
from segment.io.files import replaced_atomically
from segment.run_folder import RunFolder
from segment.train.folds import FoldsResult, train_folds

console = Console(stderr=True)
COLUMNS = ("dice", "hd95", "nsd", "confidence")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def score_fold(run: RunFolder, fold: int, dataset: Any, device: str = "auto") -> list[dict[str, Any]]:
    """One row per validation case of a fold: mean foreground Dice, HD95, NSD and the confidence score."""
    return score_validation(run.fold(fold), dataset, device, fold=fold)


def score_validation(member: RunFolder, dataset: Any, device: str = "auto", fold: int = 0) -> list[dict[str, Any]]:
    """One row per validation case of one trained run (a fold, or a plain run: fold 0), predicted as `segment predict`
    would from the run's chosen checkpoint: mean foreground Dice, HD95, NSD and the confidence score."""
    from segment.evaluation.evaluate import class_names, read_case_arrays
    from segment.evaluation.metrics import case_metrics
    from segment.data.labels import encode_labels
    from segment.inference.confidence import ConfidenceStats
    from segment.inference.predictor import Predictor

    split = member.read_split()
    if split is None:
        raise InputError(f"{member.path}: no {member.SPLIT}; not a training run folder")
    predictor = Predictor.from_checkpoint(member.path, device)
    classes = class_names(predictor)
    cfg = predictor.config.evaluate
    rows = []
    for case in [c for c in dataset.cases if c.name in set(split["val"])]:
        channels, geometry, ref = read_case_arrays(case)
        stats = ConfidenceStats()
        pred = predictor.predict_labels(channels, geometry, stats=stats)[0]
        metrics = case_metrics(pred, encode_labels(ref, predictor.plan, case.label), geometry.spacing, classes,
                               cfg.nsd_tolerance_mm, cfg.hd_percentile)
        rows.append({"fold": fold, "case": case.name, "confidence": stats.score(),
                     **{m: _nanmean([r[m] for r in metrics]) for m in ("dice", "hd95", "nsd")}})
    return rows


def _write_csv(rows: list[dict[str, Any]], path: Path, fields: list[str]) -> Path:
    with replaced_atomically(path, suffix=".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                                 (f"{v:.4f}" if isinstance(v, float) else v)) for k, v in r.items()})
    return path


def fold_table(case_rows: list[dict[str, Any]], folds: int) -> list[dict[str, Any]]:
    """Per fold the mean over its validation cases, then the mean of the folds (row "mean")."""
    table = []
    for k in range(folds):
        mine = [r for r in case_rows if r["fold"] == k]
        table.append({"fold": str(k), "cases": len(mine), **{m: _nanmean([r[m] for r in mine]) for m in COLUMNS}})
    table.append({"fold": "mean", "cases": sum(int(r["cases"]) for r in table),
                  **{m: _nanmean([r[m] for r in table]) for m in COLUMNS}})
    return table


def cross_validate(run_dir: Path, dataset: Any, device: str = "auto") -> tuple[list[dict[str, Any]], float | None]:
    """Score every fold on its validation cases; write cv.csv, cv_cases.csv and confidence.json; print the table."""
    from segment.inference.confidence import FLAG_QUANTILE, choose_threshold

    run = RunFolder(run_dir)
    folds = int(run.read_ensemble()["folds"])
    case_rows = [r for k in range(folds) for r in score_fold(run, k, dataset, device)]
    _write_csv(case_rows, run / run.CV_CASES, ["fold", "case", *COLUMNS])
    table = fold_table(case_rows, folds)
    _write_csv(table, run / run.CV_TABLE, ["fold", "cases", *COLUMNS])
    threshold = choose_threshold([r["confidence"] for r in case_rows])
    info = {"threshold": threshold, "quantile": FLAG_QUANTILE, "cases": len(case_rows),
            "chosen_on": "the validation cases of every fold (cv_cases.csv)"}
    for target in [run, *(run.fold(k) for k in range(folds))]:
        target.write_json(run.CONFIDENCE, info)
    shown = Table(title=f"Cross-validation, {folds} folds (validation cases in their own geometry; HD95 in mm)")
    for col in ("fold", "cases", "Dice", "HD95", "NSD", "confidence"):
        shown.add_column(col, justify="right")
    for r in table:
        shown.add_row(r["fold"], str(r["cases"]), *(f"{r[m]:.3f}" if not math.isnan(r[m]) else "-" for m in COLUMNS))
    console.print(shown)
    if threshold is not None:
        console.print(f"confidence threshold {threshold:.3f} (the worst {FLAG_QUANTILE:.0%} of the validation cases "
                      f"lie below it) -> {run / run.CONFIDENCE}; table: {run / run.CV_TABLE}")
    return table, threshold


def trained_dataset(run: RunFolder) -> Any:
    """The cases of the run's data folder (or the demo data), found again without reading every voxel: they were all
    read and checked before training, and only the validation cases named in the run's split are scored."""
    from segment.data.demo import ensure_demo_dataset
    from segment.io.dataset import discover_quietly

    # its warnings (unpaired files, skipped cases) were reported before training
    return discover_quietly(run.read_config().data.root or ensure_demo_dataset(), check=False)[0]


def calibrate_run(run_dir: Path, dataset: Any = None, device: str = "auto") -> float | None:
    """After `segment train` (one model): score its validation cases as `segment predict` would, write val_cases.csv
    and the "check this case" threshold (confidence.json) that `segment predict -m RUN` then uses. Without `dataset`
    the run's own cases (`trained_dataset`)."""
    from segment.inference.confidence import FLAG_QUANTILE, choose_threshold

    run = RunFolder(run_dir)
    if run.read_config().data.train_on_all:
        console.print("no confidence threshold: data.train_on_all trained on the validation cases too, so they cannot "
                      "calibrate it; predict uses the default threshold")
        return None
    dataset = dataset if dataset is not None else trained_dataset(run)
    console.print("scoring the validation cases in their own geometry for the confidence threshold ...")
    rows = score_validation(run, dataset, device)
    _write_csv(rows, run / run.VAL_CASES, ["fold", "case", *COLUMNS])
    threshold = choose_threshold([r["confidence"] for r in rows])
    run.write_json(run.CONFIDENCE, {"threshold": threshold, "quantile": FLAG_QUANTILE, "cases": len(rows),
                                    "chosen_on": f"the run's validation cases ({run.VAL_CASES})"})
    mean = {m: _nanmean([r[m] for r in rows]) for m in COLUMNS}
    console.print(f"validation cases ({len(rows)}, last/best checkpoint as predict uses it): Dice {mean['dice']:.3f}, "
                  f"HD95 {mean['hd95']:.2f} mm, NSD {mean['nsd']:.3f}" + (
                      f"; confidence threshold {threshold:.3f} (the worst {FLAG_QUANTILE:.0%} lie below it) -> "
                      f"{run / run.CONFIDENCE}" if threshold is not None else ""))
    return threshold


def run_folds(cfg: Config, folds: int, output: Path | None = None, resume: bool = False,
              device: str = "auto") -> FoldsResult:
    """`segment train --folds K`: train the folds, then the cross-validation table and the confidence threshold."""
    from segment.device import global_rank

    result = train_folds(cfg, folds, output=output, resume=resume)
    run = RunFolder(result.run_dir)
    if not result.folds and (run / run.CV_TABLE).is_file():
        console.print(f"every fold was finished earlier; cross-validation table: {run / run.CV_TABLE}")
    elif global_rank() == 0:
        cross_validate(result.run_dir, trained_dataset(run), device)
    return result
