#!/usr/bin/env python3
"""How well does the per-case confidence score rank bad cases? Measured on a trained run's validation cases.

For a k-fold run every case is predicted by the fold that did not train on it; for a single run, its split.json's
validation cases. Per case: mean foreground Dice (in the scan's own geometry) and two candidate scores,

  entropy           the shipped score (segment.inference.confidence): 1 - mean normalised entropy over the predicted
                    foreground and the band where the network hesitates
  fold_agreement    (k-fold runs only) mean Dice between each fold's label map and the ensemble's

Prints the Spearman correlation of each score with Dice, and how many of the worst 10% of cases by Dice fall below the
run's threshold (confidence.json, else the default) and below the score's own 10% quantile.

usage: python benchmarks/confidence.py RUN [--data FOLDER] [--max-cases N] [--device cpu] [--json out.json]
       python benchmarks/confidence.py KFOLD_RUN --held-out LABELLED_FOLDER   (cases no fold trained on)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dice(a: np.ndarray, b: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(1, classes):
        x, y = a == c, b == c
        total = int(x.sum() + y.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((x & y).sum()) / total)
    return float(np.mean(scores))


def validation_cases(run_dir: Path, data: Path | None) -> list[tuple[int | None, object]]:
    """(fold or None, Case) of every validation case of the run."""
    from segment.io.dataset import discover
    from segment.run_folder import RunFolder

    run = RunFolder(run_dir)
    root = data or run.read_config().data.root
    if root is None:
        raise SystemExit(f"{run_dir}: trained on the demo data; pass --data")
    cases = {c.name: c for c in discover(Path(root)).cases}
    if run.is_ensemble():
        folds = int(run.read_ensemble()["folds"])
        return [(k, cases[n]) for k in range(folds) for n in (run.fold(k).read_split() or {"val": []})["val"]
                if n in cases]
    split = run.read_split()
    if split is None:
        raise SystemExit(f"{run_dir}: no split.json")
    return [(None, cases[n]) for n in split["val"] if n in cases]


def measure(run_dir: Path, data: Path | None, max_cases: int | None, device: str) -> dict:
    from scipy.stats import spearmanr

    from segment.data.labels import encode_labels
    from segment.inference.confidence import DEFAULT_THRESHOLD, ConfidenceStats
    from segment.inference.predictor import Predictor
    from segment.io.case import read_case
    from segment.run_folder import RunFolder

    run = RunFolder(run_dir)
    todo = validation_cases(run_dir, data)[: max_cases or None]
    threshold = (run.read_optional_json(run.CONFIDENCE) or {}).get("threshold") or DEFAULT_THRESHOLD
    ensemble = Predictor.from_checkpoint(run_dir, device) if run.is_ensemble() else None
    folds = {}
    rows = []
    t0 = time.monotonic()
    for fold, case in todo:
        key = fold if fold is not None else -1
        if key not in folds:
            folds[key] = Predictor.from_checkpoint(run.fold(fold).path if fold is not None else run_dir, device)
        own = folds[key]
        data_ = read_case(case.images, case.label)
        ref = encode_labels(data_.label, own.plan, case.label)
        k = int(own.config.model.out_channels)
        stats = ConfidenceStats()
        pred = own.predict_labels(data_.channels, data_.geometry, stats=stats)[0]
        row = {"case": case.name, "fold": fold, "dice": _dice(pred, ref, k), "entropy": stats.score()}
        if ensemble is not None:
            joint = ensemble.predict_labels(data_.channels, data_.geometry)[0]
            members = [p.predict_labels(data_.channels, data_.geometry)[0] for p in
                       (Predictor(m, ensemble.plan, ensemble.config, device=device) for m in ensemble.members)]
            row["fold_agreement"] = float(np.mean([_dice(m, joint, k) for m in members]))
        rows.append(row)
    dice = np.array([r["dice"] for r in rows])
    worst = set(np.argsort(dice)[: max(1, math.ceil(0.1 * len(rows)))].tolist())
    result = {"run": str(run_dir), "cases": len(rows), "threshold": threshold, "seconds": round(time.monotonic() - t0, 1),
              "mean_dice": float(dice.mean()), "scores": {}}
    for name in ("entropy", "fold_agreement"):
        if name not in rows[0]:
            continue
        s = np.array([r[name] for r in rows])
        rho = spearmanr(s, dice).statistic if len(rows) > 2 else float("nan")
        own_cut = float(np.quantile(s, 0.1))
        result["scores"][name] = {
            "spearman_with_dice": float(rho),
            "worst10_flagged_at_threshold": int(sum(s[i] < threshold for i in worst)) if name == "entropy" else None,
            "worst10_below_own_10pct": int(sum(s[i] <= own_cut for i in worst)), "worst10": len(worst),
            "flagged_total_at_threshold": int((s < threshold).sum()) if name == "entropy" else None,
        }
    result["rows"] = rows
    return result


def measure_held_out(run_dir: Path, folder: Path, device: str) -> dict:
    """An ensemble on cases none of its folds trained on (a labelled dataset folder): the shipped score (entropy of the
    averaged probabilities) and fold agreement, against the ensemble's own Dice."""
    from scipy.stats import spearmanr

    from segment.data.labels import encode_labels
    from segment.inference.confidence import ConfidenceStats
    from segment.inference.predictor import Predictor
    from segment.io.case import read_case
    from segment.io.dataset import discover

    ensemble = Predictor.from_checkpoint(run_dir, device)
    singles = [Predictor(m, ensemble.plan, ensemble.config, device=device) for m in ensemble.members]
    k = int(ensemble.config.model.out_channels)
    rows, t0 = [], time.monotonic()
    for case in discover(folder).cases:
        data_ = read_case(case.images, case.label)
        stats = ConfidenceStats()
        joint = ensemble.predict_labels(data_.channels, data_.geometry, stats=stats)[0]
        ref = encode_labels(data_.label, ensemble.plan, case.label)
        members = [p.predict_labels(data_.channels, data_.geometry)[0] for p in singles]
        rows.append({"case": case.name, "dice": _dice(joint, ref, k), "entropy": stats.score(),
                     "fold_agreement": float(np.mean([_dice(m, joint, k) for m in members]))})
    dice = np.array([r["dice"] for r in rows])
    worst = set(np.argsort(dice)[: max(1, math.ceil(0.1 * len(rows)))].tolist())
    scores = {}
    for name in ("entropy", "fold_agreement"):
        v = np.array([r[name] for r in rows])
        cut = float(np.quantile(v, 0.1))
        scores[name] = {"spearman_with_dice": float(spearmanr(v, dice).statistic),
                        "worst10_below_own_10pct": int(sum(v[i] <= cut for i in worst)), "worst10": len(worst)}
    return {"run": str(run_dir), "cases": len(rows), "mean_dice": float(dice.mean()), "scores": scores, "rows": rows,
            "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--held-out", type=Path, default=None,
                        help="k-fold runs: a labelled folder of cases no fold trained on (scored by the ensemble)")
    args = parser.parse_args()
    if args.held_out is not None:
        result = measure_held_out(args.run, args.held_out, args.device)
        print(f"{result['cases']} held-out cases, ensemble mean Dice {result['mean_dice']:.3f} ({result['seconds']} s)")
        for name, s in result["scores"].items():
            print(f"{name:<15} Spearman(score, Dice) {s['spearman_with_dice']:.3f}; worst 10% below the score's own 10% "
                  f"quantile: {s['worst10_below_own_10pct']}/{s['worst10']}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    result = measure(args.run, args.data, args.max_cases, args.device)
    print(f"{result['cases']} validation cases of {result['run']}, mean Dice {result['mean_dice']:.3f}, "
          f"threshold {result['threshold']:.3f} ({result['seconds']} s)")
    print("score           Spearman(score, Dice)  worst-10% flagged at threshold  worst-10% below own 10% quantile")
    for name, s in result["scores"].items():
        at = "-" if s["worst10_flagged_at_threshold"] is None else f"{s['worst10_flagged_at_threshold']}/{s['worst10']}"
        print(f"{name:<15} {s['spearman_with_dice']:>21.3f}  {at:>30}  {str(s['worst10_below_own_10pct']) + '/' + str(s['worst10']):>34}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
