#!/usr/bin/env python3
"""Train on MSD Hippocampus under a wall-clock budget, side by side with the MONAI peer, and print one table.

Both get the same data, the same fixed split (the last N cases by name are validation, as the peer script does) and the
same budget, one after the other on the same machine. Ours is scored like the peer: per-case Dice per class, mean over
validation cases, on labels predicted in each scan's own geometry by `segment predict`'s Predictor.

usage: python benchmarks/train_hippocampus.py [--budget 30] [--val 40] [--out runs/bench-hippo] [--skip-peer]
           [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
PEER = ROOT.parent / "shared" / "peers" / "monai_unet_baseline.py"


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run a command, log its output; return exit code, wall seconds and its peak RSS in MiB (os.wait4)."""
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - t0, usage.ru_maxrss / 1024


def fixed_split(n_val: int) -> dict[str, list[str]]:
    names = sorted(p.name.removesuffix(".nii.gz") for p in (DATA / "labelsTr").glob("*.nii.gz"))
    return {"train": names[:-n_val], "val": names[-n_val:]}


def score(run_dir: Path, split: dict[str, list[str]], tta: bool = False) -> dict:
    """Per-case Dice per class (mean over cases) and inference time, predicting in each scan's own geometry.

    Scores the *final* weights (last.ckpt), as the peer does: best.ckpt was picked on these same validation cases.
    """
    import numpy as np

    from segment.inference.predictor import Predictor
    from segment.io.image import read_image, read_label

    predictor = Predictor.from_checkpoint(run_dir / "checkpoints" / "last.ckpt", device="cpu", tta=tta)
    dice: dict[int, list[float]] = {1: [], 2: []}
    seconds = 0.0
    for name in split["val"]:
        image, geometry = read_image(DATA / "imagesTr" / f"{name}.nii.gz")
        ref = read_label(DATA / "labelsTr" / f"{name}.nii.gz")
        t0 = time.perf_counter()
        pred = predictor.predict_probabilities([image], geometry).argmax(0)
        seconds += time.perf_counter() - t0
        for c in dice:
            hit, truth = pred == c, ref == c
            dice[c].append(float(2 * (hit & truth).sum() / max(1, hit.sum() + truth.sum())))
    return {"class1": float(np.mean(dice[1])), "class2": float(np.mean(dice[2])),
            "mean": float(np.mean(dice[1] + dice[2])), "infer_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=30.0, help="training minutes for each method")
    ap.add_argument("--val", type=int, default=40, help="last N cases (sorted) are the validation split")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / time.strftime("bench-hippo-%Y%m%d-%H%M%S"))
    ap.add_argument("--skip-peer", action="store_true", help="run only segment")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for segment")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data/hippocampus beside the checkout")
    args.out.mkdir(parents=True, exist_ok=False)
    split = fixed_split(args.val)
    (args.out / "split.json").write_text(json.dumps(split, indent=1))

    rows = []
    run_dir = args.out / "segment"
    cmd = [sys.executable, "-m", "segment.cli", "train", "--data", str(DATA), "--max-time", f"{args.budget}m",
           "--split", str(args.out / "split.json"), "-o", str(run_dir), "--set", "train.max_epochs=10000"]
    for o in args.overrides:
        cmd += ["--set", o]
    code, wall, rss = run_measured(cmd, args.out / "segment.log")
    if code != 0:
        sys.exit(f"segment train failed (exit {code}); see {args.out / 'segment.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    note = f"patch {plan['patch_size']} batch {plan['batch_size']} features {plan['features']}"
    common = {"steps": summary["steps"], "train_s": summary["seconds"],
              "s_per_it": summary["seconds"] / max(1, summary["steps"]), "peak_mib": rss}
    rows.append({"method": "segment train", **common, **score(run_dir, split), "note": note})
    rows.append({"method": "segment train, predict --tta", **common, **score(run_dir, split, tta=True),
                 "note": "same model, mirror test-time augmentation"})

    if not args.skip_peer and PEER.is_file():
        peer_dir = args.out / "peer"
        code, wall, rss = run_measured(
            [sys.executable, str(PEER), str(DATA), str(args.budget), str(peer_dir), "--val", str(args.val)],
            args.out / "peer.log")
        text = (peer_dir / "result.txt").read_text() if code == 0 else ""
        vals = dict(re.findall(r"(\w+)=([\d.]+)", text))
        if vals:
            rows.append({"method": "MONAI UNet peer", "steps": int(vals["iters"]), "train_s": float(vals["train_s"]),
                         "s_per_it": float(vals["train_s"]) / max(1, int(vals["iters"])), "peak_mib": rss,
                         "class1": float(vals["class1"]), "class2": float(vals["class2"]), "mean": float(vals["mean"]),
                         "infer_s": float(vals.get(f"infer_s_{args.val}cases", "nan")), "note": "peers/monai_unet_baseline.py"})

    import torch

    machine = f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    lines = [f"Hippocampus, {len(split['train'])} train / {len(split['val'])} val cases, budget {args.budget:g} min, {machine}",
             "| method | steps | train s | s/it | peak MiB | Dice anterior | Dice posterior | mean | inference s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['train_s']:.0f} | {r['s_per_it']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['class1']:.4f} | {r['class2']:.4f} | {r['mean']:.4f} | {r['infer_s']:.1f} | {r['note']} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "result.md").write_text(table + "\n")
    (args.out / "result.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
