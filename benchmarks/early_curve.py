#!/usr/bin/env python3
"""How fast a recipe starts: per-class validation Dice every 40 steps over the first N steps on MSD Hippocampus.

The first 40 cases, 32 training / 8 validation (the slow test's set-up), batch 4, fp32, one torch thread per run, a
fixed number of steps (not time: the question is how many steps a recipe needs before it segments every structure).
Each variant is a name and config overrides; `--seeds` repeats every variant with other seeds (in `segment` the seed
also draws the split). Runs go two at a time (`--jobs`), each with one thread.

    python benchmarks/early_curve.py --steps 240 --seeds 0,1 \\
        --variant default= --variant residual-8=model.encoder_block=residual

Prints one row per run: `step:anterior/posterior` Dice at every validation.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=override[;override...] (NAME= alone: the defaults)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=240, help="training steps (a multiple of 40)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-early")
    return ap.parse_args()


def run(args: argparse.Namespace, name: str, overrides: list[str], seed: int) -> str:
    out = args.out / f"{name}-seed{seed}"
    sets = ["data.max_cases=40", f"train.max_epochs={args.steps // 40}", "train.steps_per_epoch=40",
            "data.batch_size=4", "train.threads=1", "train.precision=32", f"seed={seed}", *overrides]
    cmd = [sys.executable, "-m", "segment.cli", "train", "--data", str(args.data), "-o", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return f"| {name} | {seed} | failed: {proc.stderr.strip().splitlines()[-1:]} |"
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("val_dice_mean")]
    curve = " ".join(f"{int(r['step']) + 1}: {float(r['val_dice_Anterior']):.2f}/{float(r['val_dice_Posterior']):.2f}"
                     for r in rows)
    return f"| {name} | {seed} | {curve} |"


def main() -> None:
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = []
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        jobs += [(name, [o for o in rest.split(";") if o], seed) for seed in seeds]
    print(f"Hippocampus, first 40 cases (32 train / 8 val), batch 4, fp32, 1 thread per run, {args.steps} steps")
    print("| variant | seed | step: Dice anterior/posterior |")
    print("|---|---|---|")
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda j: run(args, *j), jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
