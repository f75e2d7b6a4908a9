#!/usr/bin/env python3
"""Ensemble of K folds vs one model, at equal total training time, on MSD Hippocampus.

A fixed test set (the last --test cases by name) is held out of both. On the remaining cases:

  single    `segment train` with the whole budget (its own seeded 80/20 split for validation)
  ensemble  `segment train --folds K` with the same budget in total (budget / K per fold)

Both are then scored on the test cases (mean foreground Dice per case, in each scan's own geometry; the ensemble
averages its folds' probabilities). Also scored: fold 0 of the ensemble alone (one fold at 1/K of the time).

usage: python benchmarks/folds.py [--budget 30m] [--folds 5] [--test 40] [--out runs/bench-folds] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def training_copy(out: Path, n_test: int) -> tuple[Path, list[str]]:
    """An MSD folder of links to every case but the last `n_test` (by name), and those test case names."""
    names = sorted(p.name.removesuffix(".nii.gz") for p in (DATA / "labelsTr").glob("*.nii.gz"))
    train, test = names[:-n_test], names[-n_test:]
    root = out / "train_data"
    if root.exists():
        shutil.rmtree(root)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for n in train:
            (root / sub / f"{n}.nii.gz").symlink_to(DATA / sub / f"{n}.nii.gz")
    meta = json.loads((DATA / "dataset.json").read_text())
    meta["training"] = [e for e in meta.get("training", []) if Path(e["label"]).name.removesuffix(".nii.gz") in train]
    meta["numTraining"] = len(train)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root, test


def score(model: Path, test: list[str], device: str) -> dict:
    from segment.data.labels import encode_labels
    from segment.inference.predictor import Predictor
    from segment.io.case import read_case

    predictor = Predictor.from_checkpoint(model, device)
    k = int(predictor.config.model.out_channels)
    dice, conf, t0 = [], [], time.monotonic()
    for name in test:
        label = DATA / "labelsTr" / f"{name}.nii.gz"
        case = read_case([DATA / "imagesTr" / f"{name}.nii.gz"], label)
        from segment.inference.confidence import ConfidenceStats

        stats = ConfidenceStats()
        pred = predictor.predict_labels(case.channels, case.geometry, stats=stats)[0]
        ref = encode_labels(case.label, predictor.plan, label)
        per = [1.0 if not ((pred == c).any() or (ref == c).any()) else
               2 * float(((pred == c) & (ref == c)).sum()) / float((pred == c).sum() + (ref == c).sum())
               for c in range(1, k)]
        dice.append(float(np.mean(per)))
        conf.append(stats.score())
    return {"dice": dice, "confidence": conf,
            "dice_mean": float(np.mean(dice)), "dice_std": float(np.std(dice)), "confidence_mean": float(np.mean(conf)),
            "members": len(predictor.members), "predict_s": round(time.monotonic() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="30m", help="total training time of each contender")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-folds")
    parser.add_argument("--device", default="auto", help="prediction device")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()

    from segment.config import load_config
    from segment.experiments.crossval import run_folds
    from segment.train.runner import train

    args.out.mkdir(parents=True, exist_ok=True)
    data, test = training_copy(args.out, args.test)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(overrides=[f"data.root={data}", f"train.max_time={args.budget}", *args.overrides])
    t0 = time.monotonic()
    single = train(cfg, output=args.out / f"single-{stamp}").run_dir
    single_s = time.monotonic() - t0
    t0 = time.monotonic()
    ensemble = run_folds(cfg, args.folds, output=args.out / f"folds{args.folds}-{stamp}").run_dir
    ensemble_s = time.monotonic() - t0
    results = {
        "single": {**score(single, test, args.device), "train_s": round(single_s, 1)},
        f"ensemble_{args.folds}": {**score(ensemble, test, args.device), "train_s": round(ensemble_s, 1)},
        "fold_0_alone": score(ensemble / "fold_0", test, args.device),
    }
    print(f"\n{len(test)} held-out Hippocampus cases; budget {args.budget} per contender (ensemble: in total)")
    print(f"{'model':<14} {'members':>7} {'Dice':>14} {'confidence':>10} {'train s':>8} {'predict s':>9}")
    for name, r in results.items():
        print(f"{name:<14} {r['members']:>7} {r['dice_mean']:>7.4f} ± {r['dice_std']:.3f} {r['confidence_mean']:>10.3f} "
              f"{r.get('train_s', '-'):>8} {r['predict_s']:>9}")
    from segment.evaluation.stats import paired_bootstrap

    ens = results[f"ensemble_{args.folds}"]
    for ref in ("single", "fold_0_alone"):  # paired over the held-out cases
        d = paired_bootstrap(np.array(results[ref]["dice"]), np.array(ens["dice"]))
        results[f"ensemble_minus_{ref}"] = d
        print(f"ensemble_{args.folds} - {ref}: Dice {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] (paired bootstrap, "
              f"{d['n']} cases)")
    (args.out / f"folds-{stamp}.json").write_text(json.dumps({"budget": args.budget, "folds": args.folds,
                                                               "test": test, "results": results}, indent=1))


if __name__ == "__main__":
    main()
