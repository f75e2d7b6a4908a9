"""Peak memory and time of streamed prediction against the all-classes path (issue 15), one fresh process per cell.

The all-classes path is what `Predictor` did before `segment.engine.stream`: MONAI `sliding_window_inference`
for the whole volume, softmax, all K probabilities resized to the scan's canonical grid, argmax. The streamed path
(`predict_canonical_labels`) runs the same windows slab by slab and keeps only labels. Both start from the same
preprocessed network input of a synthetic scan, with a random-weight U-Net (features 8, 16, 32, 64); weights change
neither time nor memory. Each cell runs in its own subprocess, so its peak RSS (VmHWM) is its own; "extra" is that
peak minus the RSS just before predicting (the input, model and libraries). The parent also reports how many voxels
got the same label from both paths.

    python benchmarks/predict_memory.py           # 3 classes 35x50x36, 104 classes 256x256x128 (a few minutes on 2 cores)
    python benchmarks/predict_memory.py --big     # also 104 classes 512x512x600 at 0.8x0.8x1.5 mm (streamed only)
    python benchmarks/predict_memory.py --device cuda --big   # on a GPU; adds the peak GPU memory of each cell
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS: dict[str, dict] = {
    "small": {"classes": 3, "shape": (35, 50, 36), "spacing": (1.0, 1.0, 1.0), "plan": 1.0, "patch": [40, 56, 40]},
    "ct": {"classes": 104, "shape": (256, 256, 128), "spacing": (1.5, 1.5, 1.5), "plan": 1.5, "patch": [64, 64, 64]},
    "big": {"classes": 104, "shape": (512, 512, 600), "spacing": (0.8, 0.8, 1.5), "plan": 1.5, "patch": [64, 64, 64]},
}
FEATURES = [8, 16, 32, 64]


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS now, VmHWM the peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(row: str, path: str, out: Path, device: str) -> None:
    """One cell: preprocess, then time one prediction to canonical labels; prints a JSON line."""
    import torch

    from segment.config import ModelConfig
    from segment.data.plan import Plan
    from segment.data.preprocess import canonical_grid, prepare_image, restore_probabilities
    from segment.engine.sliding import softmax_probabilities
    from segment.engine.stream import predict_canonical_labels
    from segment.io.image import Geometry
    from segment.nets import build_model

    spec = ROWS[row]
    torch.manual_seed(0)
    model = build_model(ModelConfig(features=FEATURES, out_channels=spec["classes"])).eval().to(device)
    plan = Plan(spacing=[spec["plan"]] * 3, patch_size=spec["patch"], batch_size=2, features=FEATURES, modality="mri",
                channels=1, labels={i: f"c{i}" for i in range(spec["classes"])})
    geometry = Geometry.from_affine(np.diag([*spec["spacing"], 1.0]), spec["shape"], source=row)
    image = np.random.default_rng(0).normal(size=spec["shape"]).astype(np.float32)
    x = prepare_image([image], geometry, plan)[None].to(device)
    del image
    out_shape = canonical_grid(geometry).shape
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode():
        if path == "stream":
            labels, _ = predict_canonical_labels(model, x, plan, out_shape, overlap=0.5, sw_batch_size=None,
                                                 blend="gaussian", tta=False, mirror_axes=None)
        else:
            probs = softmax_probabilities(model, x, plan.patch_size, overlap=0.5, blend="gaussian")
            labels = restore_probabilities(probs, geometry).argmax(0).to(torch.uint8).cpu().numpy()
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if x.is_cuda else None
    np.save(out, labels)
    print(json.dumps({"seconds": seconds, "peak_mb": _status_mb("VmHWM"), "before_mb": before, "gpu_mb": gpu_mb,
                      "grid": list(x.shape[2:]), "out": list(out_shape)}))


def old_path_bytes(spec: dict) -> int:
    """What the all-classes path holds at once: fp32 logits and probabilities on the network grid, then resized ones."""
    grid = [max(1, round(n * s / spec["plan"])) for n, s in zip(spec["shape"], spec["spacing"])]
    resized = math.prod(spec["shape"]) if list(spec["shape"]) != grid else 0
    return 4 * spec["classes"] * (2 * math.prod(grid) + resized)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_cell(row: str, path: str, folder: Path, device: str = "cpu") -> dict:
    out = folder / f"{row}_{path}.npy"
    done = subprocess.run([sys.executable, __file__, "--child", row, path, str(out), "--device", device],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"labels": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", choices=sorted(ROWS), help="only these rows (default: small, ct[, big])")
    ap.add_argument("--big", action="store_true", help="add the 104-class 512x512x600 CT (streamed path only if the "
                                                       "all-classes one does not fit in memory)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then the GPU peak is reported too)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), args.device)
        return
    rows = args.rows or (["small", "ct"] + (["big"] if args.big else []))
    header = f"{'case':<56} {'path':<12} {'seconds':>8} {'peak RSS MB':>12} {'extra MB':>9} {'same labels':>12}"
    header += f" {'GPU MB':>8}" if args.device.startswith("cuda") else ""
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            spec = ROWS[row]
            name = (f"{spec['classes']} classes, {'x'.join(map(str, spec['shape']))} @ "
                    f"{'x'.join(f'{s:g}' for s in spec['spacing'])} mm (plan {spec['plan']:g} mm)")
            cells = {"stream": run_cell(row, "stream", Path(tmp), args.device)}
            need = old_path_bytes(spec)
            if need < 0.8 * available_bytes():  # on a GPU, running out of its memory shows as an error line
                cells["all-classes"] = run_cell(row, "all-classes", Path(tmp), args.device)
            else:
                cells["all-classes"] = {"error": f"not run: needs ~{need / 2**30:.0f} GiB, "
                                                 f"{available_bytes() / 2**30:.0f} GiB available"}
            same = ""
            if all("labels" in c for c in cells.values()):
                a, b = (np.load(c["labels"]) for c in cells.values())
                same = f"{100 * float((a == b).mean()):.4f}%"
            for path, c in cells.items():
                if "error" in c:
                    print(f"{name:<56} {path:<12} {c['error']}")
                else:
                    gpu = f" {c['gpu_mb']:>8.0f}" if c.get("gpu_mb") is not None else ""
                    print(f"{name:<56} {path:<12} {c['seconds']:>8.1f} {c['peak_mb']:>12.0f} "
                          f"{c['peak_mb'] - c['before_mb']:>9.0f} {same:>12}{gpu}")
                name = ""
            sys.stdout.flush()


if __name__ == "__main__":
    main()
