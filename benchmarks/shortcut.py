#!/usr/bin/env python3
"""Residual shortcut where the resolution changes: strided 1x1 conv (`conv`) vs avgpool + 1x1 conv (`avgpool`, ResNet-D).

Both variants are trained on MSD Hippocampus with one plan (spacing, patch, batch, widths), one split and the same
wall-clock budget per run (`--budget`; the epoch cap is lifted, so time ends every run), one after the other on this
machine, for each seed in `--seeds` (the seed sets initialisation and sampling; the split stays that of the config's
seed). Each run's final weights (last.ckpt: best.ckpt was picked on these same validation cases) are scored on the
validation cases in their own geometry: Dice, HD95, ASSD and NSD per case (mean over classes). With several seeds a
case's value is its mean over seeds. The table gives each variant's mean over cases and the paired bootstrap interval
of `avgpool - conv` (segment.evaluation.stats.paired_bootstrap; pairs with a missing distance are dropped and counted).

usage: python benchmarks/shortcut.py [--budget 25m] [--seeds 0,1] [--cases N] [--out runs/bench-shortcut]
           [--set key=value ...]
smoke: python benchmarks/shortcut.py --budget 20s --cases 8 --set train.val_every=1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
VARIANTS = ("conv", "avgpool")  # the first is the reference: differences are `avgpool - conv`
TIME_LIMITED_EPOCHS = 100_000


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="25m", help="training wall time of every run (e.g. 25m, 90s)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1")
    ap.add_argument("--cases", type=int, default=None, help="use only the first N cases by name (smoke runs)")
    ap.add_argument("--data", type=Path, default=DATA, help="dataset folder (default ../shared/data/hippocampus)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / time.strftime("bench-shortcut-%Y%m%d-%H%M%S"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every run")
    return ap.parse_args()


def shared_config(args: argparse.Namespace):  # -> segment.config.Config
    from segment.config import load_config, parse_duration

    parse_duration(args.budget)  # a one-line ConfigError for e.g. "20 minutes"
    values = {"data.root": str(args.data), "train.max_time": args.budget, "train.max_epochs": TIME_LIMITED_EPOCHS}
    if args.cases:
        values["data.max_cases"] = args.cases
    return load_config(overrides=args.overrides, values=values)


def train_or_reuse(cfg, run_dir: Path, plan, split: dict[str, list[str]]) -> dict:
    """Train one run into `run_dir`, or reuse a finished one on the same split (a crashed benchmark continues)."""
    from segment.run_folder import RunFolder
    from segment.train.runner import train

    run = RunFolder(run_dir)
    summary = run.read_summary()
    if summary is None or run.read_split() != split or not run.last_checkpoint.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            sys.exit(f"{run_dir}: holds an unfinished run or one on another split; delete it or choose another --out")
        train(cfg, output=run_dir, plan=plan, split=split)
        summary = run.read_summary()
    return {"steps": int(summary["steps"]), "seconds": float(summary["seconds"]), "ckpt": run.last_checkpoint}


def main() -> None:
    args = parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: this benchmark needs ../shared/data/hippocampus beside the checkout")
    from segment.config import validate
    from segment.data.pipeline import make_split
    from segment.device import training_accelerator
    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.evaluation.metrics import HIGHER_IS_BETTER, LABELS, METRICS
    from segment.evaluation.stats import paired_bootstrap, per_case_values
    from segment.train.plan_valid import plan_run
    from segment.train.setup import load_dataset

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cfg = shared_config(args)
    dataset = load_dataset(cfg)
    split = make_split([c.name for c in dataset.cases], cfg.seed, cfg.data.val_fraction, cfg.data.folds, cfg.data.fold)
    plan, _ = plan_run(dataset, cfg, device=training_accelerator(cfg.train.accelerator))
    args.out.mkdir(parents=True, exist_ok=True)
    by_name = {c.name: c for c in dataset.cases}
    val_cases = [by_name[n] for n in split["val"]]

    runs: dict[tuple[str, int], dict] = {}
    for seed in seeds:
        for variant in VARIANTS:
            raw = cfg.model_dump(mode="json")
            raw["seed"], raw["model"]["shortcut"] = seed, variant
            run = train_or_reuse(validate(raw, f"shortcut={variant}"), args.out / "runs" / f"{variant}-seed{seed}", plan, split)
            run["rows"] = score_cases(load_predictor(run["ckpt"]), val_cases, cfg.evaluate)
            runs[variant, seed] = run

    # per variant and metric: {case: mean over seeds}
    values = {v: {m: {} for m in METRICS} for v in VARIANTS}
    for v in VARIANTS:
        for m in METRICS:
            seed_values = [per_case_values(runs[v, s]["rows"], m) for s in seeds]
            values[v][m] = {c: float(np.mean([sv[c] for sv in seed_values])) for c in split["val"]}
    cases = list(split["val"])
    result: dict = {"variants": {}, "difference": {}}
    for v in VARIANTS:
        result["variants"][v] = {m: float(np.nanmean([values[v][m][c] for c in cases])) for m in METRICS}
        result["variants"][v]["steps"] = [runs[v, s]["steps"] for s in seeds]
        result["variants"][v]["minutes"] = [round(runs[v, s]["seconds"] / 60, 2) for s in seeds]
    for m in METRICS:
        a = np.array([values["conv"][m][c] for c in cases])
        b = np.array([values["avgpool"][m][c] for c in cases])
        result["difference"][m] = paired_bootstrap(a, b, n=cfg.evaluate.bootstrap, seed=0)

    import torch

    machine = f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    head = [f"Shortcut ablation on {args.data.name}: {len(split['train'])} train / {len(cases)} val cases, budget "
            f"{args.budget} per run, seeds {seeds}, plan patch {plan.patch_size} batch {plan.batch_size} features "
            f"{plan.features}; {machine}",
            "| variant | " + " | ".join(f"{LABELS[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓ (mm)'}" for m in METRICS)
            + " | steps | minutes |",
            "|---" * (len(METRICS) + 3) + "|"]
    for v in VARIANTS:
        r = result["variants"][v]
        head.append(f"| {v} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS)
                    + f" | {', '.join(map(str, r['steps']))} | {', '.join(map(str, r['minutes']))} |")
    cells = []
    for m in METRICS:
        d = result["difference"][m]
        dropped = f" ({d['n_dropped']} dropped)" if d["n_dropped"] else ""
        cells.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]{dropped}")
    head.append("| avgpool − conv, 95% CI | " + " | ".join(cells) + " | | |")
    table = "\n".join(head)
    print(table)
    (args.out / "result.md").write_text(table + "\n")
    (args.out / "result.json").write_text(json.dumps({**result, "split": split, "seeds": seeds, "budget": args.budget,
                                                      "machine": machine}, indent=1))
    print(f"written: {args.out / 'result.md'}, {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
