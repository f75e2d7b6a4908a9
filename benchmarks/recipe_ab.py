#!/usr/bin/env python3
"""One recipe comparison at equal wall time on MSD Hippocampus: arm A vs arm B, each a list of config overrides.

Both arms get one split, each arm the plan its overrides give (the same plan unless they change patch, batch or widths), and the same `--budget`; with `--parallel` they train at the same time, one torch
thread each (on a 2-core machine: one core each, the same conditions for both). Final weights (last.ckpt) are scored
on the validation cases in each scan's own geometry (Dice, HD95, ASSD, NSD; mean over classes per case) and `B − A`
is given with paired bootstrap 95% intervals over the cases.

    python benchmarks/recipe_ab.py --name deep-supervision --a model.deep_supervision=false \\
        --b model.deep_supervision=true --budget 8m --parallel
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="what is compared (output folder name)")
    ap.add_argument("--a", action="append", default=[], help="override of arm A (repeatable)")
    ap.add_argument("--b", action="append", default=[], help="override of arm B (repeatable)")
    ap.add_argument("--budget", default="8m")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-recipe")
    ap.add_argument("--holdout", action="store_true",
                    help="score on the split's validation cases as a test set no arm sees; both arms train on the "
                    "other cases, split again 80/20 (an arm with data.train_on_all=true trains on all of them)")
    ap.add_argument("--parallel", action="store_true", help="train both arms at once, one thread each")
    ap.add_argument("--only", choices=["a", "b"], help=argparse.SUPPRESS)  # a child of --parallel
    return ap.parse_args()


def arm_config(args: argparse.Namespace, arm: str):
    from segment.config import load_config

    overrides = (args.a if arm == "a" else args.b) + (["train.threads=1"] if args.parallel or args.only else [])
    values = {"data.root": str(args.data), "train.max_time": args.budget, "train.max_epochs": 100_000}
    return load_config(overrides=overrides, values=values)


def setup(args: argparse.Namespace):
    from segment.data.pipeline import make_split
    from segment.device import training_accelerator
    from segment.train.plan_valid import plan_run
    from segment.train.setup import load_dataset

    cfg = arm_config(args, "a")
    dataset = load_dataset(cfg)
    split = make_split([c.name for c in dataset.cases], cfg.seed, cfg.data.val_fraction, cfg.data.folds, cfg.data.fold)
    # one plan per arm: an arm that changes the patch, batch or widths gets them (the same plan when it does not)
    plans = {arm: plan_run(dataset, arm_config(args, arm), device=training_accelerator(cfg.train.accelerator))[0]
             for arm in ("a", "b")}
    # what the arms train on: the same split, or with --holdout the training half split again (the test set unseen)
    inner = make_split(split["train"], cfg.seed, cfg.data.val_fraction, cfg.data.folds, None) if args.holdout else split
    return dataset, split, inner, plans


def train_arm(args: argparse.Namespace, arm: str, plan, split) -> Path:
    from segment.run_folder import RunFolder
    from segment.train.runner import train

    run_dir = args.out / args.name / arm
    if RunFolder(run_dir).read_summary() is None:
        train(arm_config(args, arm), output=run_dir, plan=plan, split=split)
    return run_dir


def main() -> None:
    args = parse_args()
    dataset, split, inner, plans = setup(args)
    if args.only:
        train_arm(args, args.only, plans[args.only], inner)
        return
    if args.parallel:
        cmd = [sys.executable, __file__, *sys.argv[1:]]
        children = [subprocess.Popen([*cmd, "--only", arm]) for arm in ("a", "b")]
        if any(c.wait() != 0 for c in children):
            sys.exit("an arm failed; see its output above")
    runs = {arm: train_arm(args, arm, plans[arm], inner) for arm in ("a", "b")}

    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.evaluation.metrics import METRICS
    from segment.evaluation.stats import paired_bootstrap, per_case_values
    from segment.run_folder import RunFolder

    by_name = {c.name: c for c in dataset.cases}
    val = [by_name[n] for n in split["val"]]
    rows, info = {}, {}
    for arm, run_dir in runs.items():
        run = RunFolder(run_dir)
        rows[arm] = score_cases(load_predictor(run.last_checkpoint), val, arm_config(args, arm).evaluate)
        info[arm] = run.read_summary()
    lines = [f"{args.name}: A = {args.a or ['defaults']}, B = {args.b or ['defaults']}, budget {args.budget} each"
             + (", in parallel, one thread each" if args.parallel else "")
             + (f"; scored on {len(val)} held-out cases no arm trained on" if args.holdout else ""),
             "| arm | steps | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    means = {}
    for arm in ("a", "b"):
        vals = {m: per_case_values(rows[arm], m) for m in METRICS}
        means[arm] = vals
        lines.append(f"| {arm.upper()} | {info[arm]['steps']} | "
                     + " | ".join(f"{np.nanmean(list(vals[m].values())):.4f}" for m in METRICS) + " |")
    cells = []
    for m in METRICS:
        cases = [c for c in split["val"] if c in means["a"][m] and c in means["b"][m]]
        d = paired_bootstrap(np.array([means["a"][m][c] for c in cases]), np.array([means["b"][m][c] for c in cases]))
        cells.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
    lines.append("| B − A | | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    (args.out / args.name / "result.md").write_text(text + "\n")
    (args.out / args.name / "result.json").write_text(json.dumps({"a": args.a, "b": args.b, "budget": args.budget,
                                                                  "steps": {k: v["steps"] for k, v in info.items()},
                                                                  "table": text}, indent=1))


if __name__ == "__main__":
    main()
