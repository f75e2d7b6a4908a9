"""Does keeping only the largest connected component per class (`--largest-component`) help a trained model?
Scores each run's validation cases twice, with and without the post-processing (same network, same TTA setting), in
each scan's own geometry, with paired bootstrap 95% intervals of `largest-component − all-components` over the cases.

    python benchmarks/postprocess.py runs/bench-hippo-30m-peer-1202/segment runs/ens/seed1 --tta

One thread per run; runs are scored one after the other. nnU-Net decides the same question per dataset from its
cross-validation predictions; this is that decision, made on the split's validation cases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def score(run: Path, data: Path, tta: bool) -> str:
    from segment.evaluation.evaluate import choose_cases, score_cases
    from segment.evaluation.metrics import METRICS
    from segment.evaluation.stats import compare, per_case_values
    from segment.inference.loading import load_checkpoint
    from segment.inference.predictor import Predictor
    from segment.io.dataset import discover

    cases = choose_cases(discover(data), "val", run, run)
    model, plan, cfg = load_checkpoint(run / "checkpoints" / "last.ckpt")
    rows = {lcc: score_cases(Predictor(model, plan, cfg, device="cpu", tta=tta, largest_component=lcc), cases,
                             cfg.evaluate) for lcc in (False, True)}
    changed = sum(1 for c, v in per_case_values(rows[False], "dice").items()
                  if v != per_case_values(rows[True], "dice")[c])
    means = [f"{np.nanmean(list(per_case_values(rows[lcc], 'dice').values())):.4f}" for lcc in (False, True)]
    cells = []
    for metric in METRICS:
        res = compare(rows[False], rows[True], metric)
        digits = 4 if metric in ("dice", "nsd") else 3
        cells.append(f"{res['mean']:+.{digits}f} [{res['lo']:+.{digits}f}, {res['hi']:+.{digits}f}]")
    return f"| {run} | {len(cases)} | {changed} | {means[0]} / {means[1]} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (their split's validation cases are scored)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False, help="mirror TTA in both arms")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: the hippocampus data is missing (../shared/data/hippocampus)")
    import torch

    torch.set_num_threads(args.threads)
    print(f"TTA {'on' if args.tta else 'off'}; B − A is largest component − all components\n")
    print("| run | cases | cases changed | Dice all / largest | B − A Dice | B − A HD95 mm | B − A ASSD mm | B − A NSD |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(score(run, args.data, args.tta), flush=True)


if __name__ == "__main__":
    main()
