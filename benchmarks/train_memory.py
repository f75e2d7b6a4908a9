"""Peak memory and time to the first step of `segment train` on 20 vs 80 synthetic CT cases, RAM vs disk cache (issue 15).

Synthetic CT: int16 volumes of SIZE^3 voxels at 1 mm (air -1000 HU around an ellipsoid body of ~40 HU with noise, an
"organ" sphere of ~80 HU labelled 1 and a "lesion" inside it labelled 2), uncompressed NIfTI in a temporary folder, so
generating them is cheap and reading them is not the bottleneck. Every cell is `segment train` in a fresh subprocess
(its VmHWM is its own): a small network (features 4-8-16-32, patch 64^3, batch 2), STEPS training steps, one epoch,
the last 2 cases validated (`--split`), fp32 on the CPU. "first step" is the wall time from the start of `train()` to
the first training step: reading and checking every case, planning, and filling the cache (cold) or finding it (warm).

    python benchmarks/train_memory.py                       # 20 and 80 cases of 256^3 (about 15 minutes on 2 cores)
    python benchmarks/train_memory.py --size 128 --cases 20 80

A RAM cell whose estimated cache exceeds 40% of the free memory is not run (it would push the machine into swap or the
OOM killer); the table gives the estimate instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATCH = 64
FEATURES = [4, 8, 16, 32]
N_VAL = 2


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def make_case(i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT (int16 HU) and its label map (uint8), cheap to make."""
    rng = np.random.default_rng(i)
    z, y, x = np.ogrid[:size, :size, :size]
    c = size / 2
    body = ((x - c) / (0.42 * size)) ** 2 + ((y - c) / (0.32 * size)) ** 2 + ((z - c) / (0.47 * size)) ** 2 <= 1
    image = np.full((size, size, size), -1000, np.int16)
    image[body] = 40
    image += rng.integers(-25, 26, size=image.shape, dtype=np.int16)
    label = np.zeros(image.shape, np.uint8)
    centre = c + rng.uniform(-0.15, 0.15, 3) * size
    r = size * rng.uniform(0.08, 0.14)
    organ = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= r**2
    lesion = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2] - r / 3) ** 2 <= (r / 3) ** 2
    label[organ] = 1
    label[lesion] = 2
    image[organ] += 40
    image[lesion] -= 30
    return image, label


def generate(root: Path, n: int, size: int) -> Path:
    import nibabel as nib

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(n):
        target = root / "labels" / f"ct_{i:03d}.nii"
        if target.exists():
            continue
        image, label = make_case(i, size)
        for folder, data in (("images", image), ("labels", label)):
            img = nib.Nifti1Image(data, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, root / folder / f"ct_{i:03d}.nii")
    return root


def child(data: Path, n: int, mode: str, cache_dir: Path, out: Path, steps: int) -> None:
    """One cell: `train()` on the first n cases; prints a JSON line."""
    t0 = time.perf_counter()
    from segment.train import module

    first: dict[str, float] = {}
    step = module.SegmentationModule.training_step

    def timed_step(self, batch, batch_idx):
        if not first:
            first.update(first_step_s=time.perf_counter() - t0, rss_first_step_mb=_status_mb("VmRSS"))
        return step(self, batch, batch_idx)

    module.SegmentationModule.training_step = timed_step
    from segment.config import load_config
    from segment.train.runner import train

    names = sorted(p.name.removesuffix(".nii") for p in (data / "images").iterdir())[:n]
    split = {"train": names[:-N_VAL], "val": names[-N_VAL:]}
    cfg = load_config(overrides=[
        f"data.root={data}", f"data.max_cases={n}", f"data.cache={mode}", f"data.cache_dir={cache_dir}",
        "data.modality=ct", f"model.features={FEATURES}", f"data.patch_size=[{PATCH},{PATCH},{PATCH}]",
        "data.batch_size=2", f"train.steps_per_epoch={steps}", "train.max_epochs=1", "train.precision=32",
        "train.accelerator=cpu", "data.augment.rotate_prob=0",
    ])
    result = train(cfg, output=out, split=split)
    print(json.dumps({"cases": n, "mode": mode, "steps": result.steps, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(_status_mb("VmHWM")), **{k: round(v, 1) for k, v in first.items()}}))


def _run_cell(args: argparse.Namespace, data: Path, n: int, mode: str, cache_dir: Path, work: Path, tag: str) -> dict:
    out = work / f"run-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--cases", str(n), "--mode", mode,
           "--cache-dir", str(cache_dir), "--out", str(out), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"cell {tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    row["tag"] = tag
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="edge of the synthetic volumes (voxels)")
    parser.add_argument("--cases", type=int, nargs="+", default=[20, 80])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["disk", "ram"])
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and caches here (default: a temp folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--mode")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.data, args.cases[0], args.mode, args.cache_dir, args.out, args.steps)
        return

    from segment.device import available_memory_bytes

    work = args.workdir or Path(tempfile.mkdtemp(prefix="train-memory-"))
    t0 = time.perf_counter()
    data = generate(work / f"ct{args.size}", max(args.cases), args.size)
    gen_s = time.perf_counter() - t0
    print(f"generated {max(args.cases)} cases of {args.size}^3 in {gen_s:.0f} s under {data}", flush=True)
    rows = []
    voxels = args.size**3
    for n in args.cases:
        for mode in args.modes:
            if mode == "disk":
                cache = work / f"cache-{n}"
                shutil.rmtree(cache, ignore_errors=True)
                rows.append(_run_cell(args, data, n, mode, cache, work, f"disk-{n}-cold"))
                rows.append(_run_cell(args, data, n, mode, cache, work, f"disk-{n}-warm"))
                continue
            need = (n - N_VAL) * voxels * (4 + 16) + N_VAL * voxels * 12  # see segment.data.cache.estimate_ram_bytes
            free = available_memory_bytes() or 0
            if need > 0.4 * free:
                row = {"tag": f"ram-{n}", "cases": n, "mode": "ram", "skipped": True,
                       "estimate_mb": round(need / 2**20), "free_mb": round(free / 2**20)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            rows.append(_run_cell(args, data, n, mode, work / "unused", work, f"ram-{n}"))
    print(f"\n{len(rows)} cells, {args.size}^3, {time.perf_counter() - t0:.0f} s in all (generation {gen_s:.0f} s)\n")
    print("| cases | cache | peak RSS MiB | RSS at first step MiB | time to first step s | total s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['cases']} | ram | not run: needs ~{r['estimate_mb']:,} MiB (free {r['free_mb']:,}) | | | |")
            continue
        label = r["tag"].split("-", 2)
        kind = "disk, " + label[2] if label[0] == "disk" else "ram"
        print(f"| {r['cases']} | {kind} | {r['peak_rss_mb']:,} | {r.get('rss_first_step_mb', 0):,.0f} | "
              f"{r.get('first_step_s', float('nan'))} | {r['seconds']} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
