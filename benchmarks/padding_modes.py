#!/usr/bin/env python3
"""Same vs valid padding (the original U-Net) on MSD Hippocampus at equal wall time, with paired confidence intervals.

Both modes get the same data, the same fixed split (the last N cases by name are validation, as
benchmarks/train_hippocampus.py does), the same training-time budget and whatever else the planner picks for them
(valid: the input patch, output patch and batch of `segment.train.plan_valid`). Both are scored on the same validation
cases in each scan's own geometry with `segment evaluate`'s code (Dice, HD95, ASSD, NSD per class, mean over classes
per case), from the final weights (last.ckpt: best.ckpt was picked on these same cases), and compared with a paired
bootstrap of valid - same (`segment.evaluation.stats.compare`).

usage: python benchmarks/padding_modes.py [--budget 8m] [--val 40] [--max-cases N] [--out DIR] [--tta]
           [--set key=value ...]
smoke run: python benchmarks/padding_modes.py --budget 20s --max-cases 12 --val 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
MODES = ("same", "valid")
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_hippocampus import run_measured  # noqa: E402  (benchmarks/ is not a package)


def fixed_split(n_val: int, max_cases: int | None) -> dict[str, list[str]]:
    """The last `n_val` cases by name for validation; with `max_cases`, only the first `max_cases - n_val` train."""
    names = sorted(p.name.removesuffix(".nii.gz") for p in (DATA / "labelsTr").glob("*.nii.gz"))
    if n_val >= len(names):
        sys.exit(f"--val {n_val}: the dataset has only {len(names)} cases")
    train, val = names[:-n_val], names[-n_val:]
    if max_cases is not None:
        if max_cases <= n_val:
            sys.exit(f"--max-cases {max_cases} must be more than --val {n_val}")
        train = train[:max_cases - n_val]
    return {"train": train, "val": val}


def train_mode(mode: str, args: argparse.Namespace, split_path: Path) -> dict:
    run_dir = args.out / mode
    cmd = [sys.executable, "-m", "segment.cli", "train", "--data", str(DATA), "--max-time", args.budget,
           "--split", str(split_path), "-o", str(run_dir), "--set", "train.max_epochs=100000",
           "--set", f"model.padding={mode}"]
    for o in args.overrides:
        cmd += ["--set", o]
    code, wall, rss = run_measured(cmd, args.out / f"{mode}.log")
    if code != 0:
        sys.exit(f"segment train ({mode} padding) failed (exit {code}); see {args.out / f'{mode}.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    return {"mode": mode, "run_dir": run_dir, "steps": summary["steps"], "train_s": summary["seconds"],
            "peak_mib": rss, "patch": plan["patch_size"], "output": plan.get("output_size") or plan["patch_size"],
            "batch": plan["batch_size"], "features": plan["features"]}


def score_mode(run: dict, val_names: list[str], tta: bool) -> tuple[list[dict], float]:
    """Per-case, per-class metric rows of the final weights, and the prediction seconds."""
    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.io.dataset import discover

    predictor = load_predictor(run["run_dir"] / "checkpoints" / "last.ckpt", device="cpu")
    predictor.tta = tta
    by_name = {c.name: c for c in discover(DATA).cases}
    cases = [by_name[n] for n in val_names]
    t0 = time.perf_counter()
    rows = score_cases(predictor, cases, predictor.config.evaluate)
    return rows, time.perf_counter() - t0


def table(runs: list[dict], rows: dict[str, list[dict]], seconds: dict[str, float], resamples: int) -> list[str]:
    import numpy as np

    from segment.evaluation.metrics import HIGHER_IS_BETTER, LABELS, METRICS, fmt_value
    from segment.evaluation.stats import compare, per_case_values

    lines = ["| padding | steps | train s | input patch | output patch | batch | peak MiB | "
             + " | ".join(LABELS[m] for m in METRICS) + " | predict s |",
             "|---" * (8 + len(METRICS)) + "|"]
    for r in runs:
        means = [float(np.nanmean(list(per_case_values(rows[r["mode"]], m).values()))) for m in METRICS]
        lines.append(f"| {r['mode']} | {r['steps']} | {r['train_s']:.0f} | {r['patch']} | {r['output']} | {r['batch']} | "
                     f"{r['peak_mib']:.0f} | " + " | ".join(fmt_value(v, m) for v, m in zip(means, METRICS))
                     + f" | {seconds[r['mode']]:.1f} |")
    lines += ["", "valid - same, paired over validation cases (mean over classes per case), 95% percentile bootstrap:", "",
              "| metric | mean difference | 95% CI | pairs | dropped (NaN) | better |", "|---|---|---|---|---|---|"]
    for m in METRICS:
        c = compare(rows["same"], rows["valid"], m, n=resamples)
        if np.isnan(c["lo"]) or c["lo"] <= 0 <= c["hi"]:
            better = "neither (CI spans 0)"
        else:
            better = "valid" if (c["mean"] > 0) == HIGHER_IS_BETTER[m] else "same"
        lines.append(f"| {LABELS[m]} | {c['mean']:+.4f} | [{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['n']} | "
                     f"{c['n_dropped']} | {better} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="8m", help="training time for each mode (train.max_time: 8m, 90s, 1h)")
    ap.add_argument("--val", type=int, default=40, help="last N cases (sorted) are the validation split")
    ap.add_argument("--max-cases", type=int, default=None, help="use only this many cases in all (smoke runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / time.strftime("bench-padding-%Y%m%d-%H%M%S"))
    ap.add_argument("--tta", action="store_true", help="score with mirror test-time augmentation")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both modes")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data/hippocampus beside the checkout")
    args.out.mkdir(parents=True, exist_ok=False)
    split = fixed_split(args.val, args.max_cases)
    split_path = args.out / "split.json"
    split_path.write_text(json.dumps(split, indent=1))

    runs = [train_mode(mode, args, split_path) for mode in MODES]
    rows, seconds = {}, {}
    for r in runs:
        rows[r["mode"]], seconds[r["mode"]] = score_mode(r, split["val"], args.tta)

    import torch

    machine = f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    head = (f"Hippocampus, same vs valid padding, {len(split['train'])} train / {len(split['val'])} val cases, "
            f"budget {args.budget} each{', TTA' if args.tta else ''}, {machine}")
    text = "\n".join([head, "", *table(runs, rows, seconds, args.resamples)])
    print(text)
    (args.out / "result.md").write_text(text + "\n")
    (args.out / "metrics.json").write_text(json.dumps(rows, indent=1, default=str))
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
