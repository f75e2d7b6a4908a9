#!/usr/bin/env python3
"""Anisotropic planning on thick-slice data: MSD Hippocampus resampled to 1 x 1 x 4 mm, planned the nnU-Net way
(`data.anisotropic=true`: per-axis strides and kernels) vs the old way (`false`: every axis pooled at every level).

1. Copies ../shared/data/hippocampus into a temporary folder (or --work) with every image and label resampled along
   the down-up axis (file axis 2, S in these RAS files) from 1 mm to 4 mm slices: slice k covers the old slices
   4k..4k+3, its centre is old coordinate 4k + 1.5; images are linearly interpolated there (the mean of old slices
   4k+1 and 4k+2), labels take the nearest old slice (4k+2, ties upward; clamped at the end). The affine's third
   column is scaled by 4 and the origin moved by 1.5 old slices, so every new voxel sits where it claims to be.
2. Trains both variants at the same time, one thread each, with the same wall-clock budget, seed and split (the last
   --val cases by name are validation, as benchmarks/train_hippocampus.py), so both share the machine equally.
3. Scores the final weights (last.ckpt) on the validation cases in their own (1 x 1 x 4 mm) geometry: Dice and HD95
   per case (mean over the two labels), and paired bootstrap 95% intervals of `anisotropic - isotropic`.

usage: python benchmarks/anisotropic.py [--budget 8] [--val 40] [--out runs/bench-aniso] [--work DIR] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
FACTOR, AXIS = 4, 2


def thick_slices(image: np.ndarray, affine: np.ndarray, *, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Resample file axis `AXIS` from 1 to `FACTOR` voxels per slice; returns the array and its affine."""
    n = image.shape[AXIS]
    m = math.ceil(n / FACTOR)
    centres = FACTOR * np.arange(m) + (FACTOR - 1) / 2  # old-voxel coordinate of each new slice centre
    if label:
        idx = np.minimum(np.floor(centres + 0.5).astype(int), n - 1)
        out = np.take(image, idx, axis=AXIS)
    else:
        lo = np.clip(np.floor(centres).astype(int), 0, n - 1)
        hi = np.clip(lo + 1, 0, n - 1)
        w = (centres - np.floor(centres)).reshape([-1 if a == AXIS else 1 for a in range(image.ndim)])
        data = image.astype(np.float32)
        out = (1 - w) * np.take(data, lo, axis=AXIS) + w * np.take(data, hi, axis=AXIS)
    step = np.eye(4)
    step[AXIS, AXIS] = FACTOR
    step[AXIS, 3] = (FACTOR - 1) / 2
    return out, affine @ step


def make_thick_copy(dest: Path) -> Path:
    """The anisotropic copy of the hippocampus dataset (dataset.json kept: it is MRI)."""
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((DATA / sub).glob("*.nii.gz")):
            img = nib.load(path)
            label = sub == "labelsTr"
            data = np.asarray(img.dataobj)
            out, affine = thick_slices(np.rint(data).astype(np.uint8) if label else data, img.affine, label=label)
            header = img.header.copy()
            header.set_data_dtype(np.uint8 if label else np.float32)
            nib.save(nib.Nifti1Image(out.astype(np.uint8 if label else np.float32), affine, header), dest / sub / path.name)
    shutil.copy(DATA / "dataset.json", dest / "dataset.json")
    return dest


def fixed_split(root: Path, n_val: int) -> dict[str, list[str]]:
    names = sorted(p.name.removesuffix(".nii.gz") for p in (root / "labelsTr").glob("*.nii.gz"))
    return {"train": names[:-n_val], "val": names[-n_val:]}


def score(run_dir: Path, root: Path, names: list[str]) -> list[dict]:
    """Metric rows (segment.evaluation) of the final weights on the named cases, in their own geometry."""
    from segment.config import EvaluateConfig
    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.io.dataset import discover

    predictor = load_predictor(run_dir / "checkpoints" / "last.ckpt", device="cpu")
    cases = [c for c in discover(root).cases if c.name in set(names)]
    return score_cases(predictor, cases, EvaluateConfig())


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
                  .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    import torch

    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=8.0, help="training minutes for each variant (run side by side)")
    ap.add_argument("--val", type=int, default=40, help="last N cases (sorted) are the validation split")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / time.strftime("bench-aniso-%Y%m%d-%H%M%S"))
    ap.add_argument("--work", type=Path, default=None, help="where the 1x1x4 mm copy goes (default: a temp folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both variants")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data/hippocampus beside the checkout")
    args.out.mkdir(parents=True, exist_ok=False)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="hippo-1x1x4-")
    root = make_thick_copy((args.work or Path(tmp.name)) / "hippocampus_1x1x4")
    split = fixed_split(root, args.val)
    (args.out / "split.json").write_text(json.dumps(split, indent=1))

    procs = {}
    for name, flag in (("anisotropic", "true"), ("isotropic", "false")):
        cmd = [sys.executable, "-m", "segment.cli", "train", "--data", str(root), "--max-time", f"{args.budget}m",
               "--split", str(args.out / "split.json"), "-o", str(args.out / name), "--set", "train.max_epochs=10000",
               "--set", "train.threads=1", "--set", f"data.anisotropic={flag}"]
        for o in args.overrides:
            cmd += ["--set", o]
        log = (args.out / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"{name}: segment train failed (exit {proc.returncode}); see {args.out / f'{name}.log'}")

    from segment.evaluation.stats import compare, per_case_values

    rows, info = {}, {}
    for name in procs:
        rows[name] = score(args.out / name, root, split["val"])
        plan = json.loads((args.out / name / "plan.json").read_text())
        summary = json.loads((args.out / name / "summary.json").read_text())
        info[name] = {"steps": summary["steps"], "seconds": summary["seconds"], "patch": plan["patch_size"],
                      "features": plan["features"], "strides": plan.get("strides"), "kernels": plan.get("kernels"),
                      "spacing": plan["spacing"], "batch": plan["batch_size"]}
    lines = [(f"Hippocampus resampled to 1 x 1 x 4 mm, {len(split['train'])} train / {len(split['val'])} val cases, "
              f"{args.budget:g} min per variant side by side (1 thread each), {machine()}"),
             "| plan | steps | patch | features | strides | Dice anterior | Dice posterior | Dice mean | HD95 mm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in procs:
        r, i = rows[name], info[name]
        dice = {n: np.nanmean(list(per_case_values(r, "dice", n).values())) for n in ("Anterior", "Posterior", "all")}
        hd = np.nanmean(list(per_case_values(r, "hd95", "all").values()))
        strides = " ".join("x".join(map(str, s)) for s in i["strides"]) if i["strides"] else "2x2x2 at every level"
        lines.append(f"| {name} | {i['steps']} | {i['patch']} | {i['features']} | {strides} | {dice['Anterior']:.4f} | "
                     f"{dice['Posterior']:.4f} | {dice['all']:.4f} | {hd:.2f} |")
    lines += ["", "| anisotropic - isotropic (paired bootstrap over cases, 95%) | mean | CI | pairs |", "|---|---|---|---|"]
    comps = {}
    for metric in ("dice", "hd95"):
        c = compare(rows["isotropic"], rows["anisotropic"], metric)
        comps[metric] = c
        lines.append(f"| {metric} (mean over labels per case) | {c['mean']:+.4f} | [{c['lo']:+.4f}, {c['hi']:+.4f}] | "
                     f"{c['n']} (+{c['n_dropped']} dropped) |")
    table = "\n".join(lines)
    print(table)
    (args.out / "result.md").write_text(table + "\n")
    (args.out / "result.json").write_text(json.dumps({"info": info, "rows": rows, "compare": comps}, indent=1, default=float))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
