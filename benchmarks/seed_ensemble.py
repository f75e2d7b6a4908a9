"""Does averaging models trained with different seeds on one split beat one of them? Scores each run alone and the
ensemble (probabilities averaged, as `segment predict` averages the folds of a k-fold run) on the split's validation
cases, in each scan's own geometry, with paired bootstrap 95% intervals of `ensemble − member` over the cases.

    # train two more seeds on the split of an existing run, one thread each, side by side (2 cores):
    python benchmarks/seed_ensemble.py --train --split runs/bench-recipe/NAME/a/split.json --seeds 1 2 \\
        --budget 20m --out runs/ens
    # then score: the run of seed 0 (the recipe study's arm A) and the two new ones
    python benchmarks/seed_ensemble.py runs/bench-recipe/NAME/a runs/ens/seed1 runs/ens/seed2

Every run must have the same split and plan (checked). Members are scored one thread each, final weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def train(args: argparse.Namespace) -> None:
    procs = []
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        cmd = [sys.executable, "-c", "from segment.cli import app; app()", "train", "--data", str(args.data), "--split", str(args.split),
               "--set", f"seed={seed}", "--set", "train.threads=1", "--set", f"train.max_time={args.budget}",
               "--set", "train.max_epochs=100000", "-o", str(out)]
        procs.append(subprocess.Popen(cmd))
    if any(p.wait() for p in procs):
        sys.exit("a training run failed (see its output above)")


def score(runs: list[Path], data: Path) -> None:
    import torch

    from segment.evaluation.evaluate import choose_cases, score_cases
    from segment.evaluation.stats import paired_bootstrap, per_case_values
    from segment.inference.loading import load_checkpoint
    from segment.inference.predictor import Predictor
    from segment.io.dataset import discover

    torch.set_num_threads(1)
    splits = [json.loads((r / "split.json").read_text()) for r in runs]
    plans = [json.loads((r / "plan.json").read_text()) for r in runs]
    if any(s != splits[0] for s in splits) or any(p != plans[0] for p in plans):
        sys.exit("the runs do not share one split and plan")
    cases = choose_cases(discover(data), "val", runs[0], runs[0])
    loaded = [load_checkpoint(r / "checkpoints" / "last.ckpt") for r in runs]

    def dice(members: tuple[int, ...]) -> dict[str, float]:
        model, plan, cfg = loaded[members[0]]
        pred = Predictor(model, plan, cfg, device="cpu", members=[loaded[i][0] for i in members])
        return per_case_values(score_cases(pred, cases, cfg.evaluate), "dice")

    alone = {i: dice((i,)) for i in range(len(runs))}
    names = sorted(alone[0])
    print(f"{len(cases)} validation cases of {runs[0]}; mean foreground Dice per case\n")
    print("| model | Dice | ensemble − this member (95% CI) |")
    print("|---|---|---|")
    for i, r in enumerate(runs):
        print(f"| {r} | {np.mean(list(alone[i].values())):.4f} | |")
    for k in range(2, len(runs) + 1):
        for members in itertools.combinations(range(len(runs)), k):
            ens = dice(members)
            diffs = []
            for i in members:
                res = paired_bootstrap(np.array([alone[i][c] for c in names]), np.array([ens[c] for c in names]))
                diffs.append(f"vs {i}: {res['mean']:+.4f} [{res['lo']:+.4f}, {res['hi']:+.4f}]")
            label = " + ".join(str(i) for i in members)
            print(f"| ensemble {label} | {np.mean(list(ens.values())):.4f} | {'; '.join(diffs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run folders to score alone and together")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--train", action="store_true", help="train --seeds on --split first (one thread each, at once)")
    ap.add_argument("--split", type=Path, help="split.json to train on")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ens")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: the hippocampus data is missing (../shared/data/hippocampus)")
    if args.train:
        if args.split is None:
            sys.exit("--train needs --split (the split.json of the run to ensemble with)")
        train(args)
    if len(args.runs) >= 2:
        score(args.runs, args.data)
    elif not args.train:
        sys.exit("give two or more run folders to score")


if __name__ == "__main__":
    main()
