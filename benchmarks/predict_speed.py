"""How fast is `segment predict` against plain MONAI `sliding_window_inference` with the same network and settings?

Both sides get the same preprocessed tensor, network, patch, overlap, window batch and Gaussian blending, and both
map probabilities back to the scan's grid, under the same autocast dtype (bf16 where our predictor measured it
faster, else fp32) and the same mirrorings for TTA (the axes the model was trained to mirror). MONAI runs the usual way
(`torch.no_grad`, one call per mirroring); ours uses the Predictor as `segment predict` does (inference mode; mirrorings
batched together on a GPU, one at a time on a CPU). Also reported: how many voxels get the same label from both.

    python benchmarks/predict_speed.py                      # random-weight hippocampus-sized U-Net, a few minutes
    python benchmarks/predict_speed.py --model runs/NAME    # a trained run
    python benchmarks/predict_speed.py --quick              # a smoke run (about a minute on 2 busy cores)
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from rich.console import Console
from rich.table import Table

from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.data.preprocess import prepare_image, restore_probabilities, to_source_grid
from segment.inference.predictor import Predictor
from segment.engine.sliding import flip_sets, window_batch
from segment.io.image import Geometry, read_image
from segment.nets import build_model

HIPPOCAMPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hippocampus"


def default_predictor(device: str, tta: bool) -> Predictor:
    """A random-weight U-Net like the default hippocampus model (weights do not change the speed)."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(features=[16, 32, 64, 128], out_channels=3))
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[40, 56, 40], batch_size=8, features=[16, 32, 64, 128],
                modality="mri", channels=1, labels={0: "background", 1: "anterior", 2: "posterior"})
    return Predictor(build_model(cfg.model), plan, cfg, device=device, tta=tta)


def monai_labels(p: Predictor, image: np.ndarray, geometry: Geometry, tta: bool) -> np.ndarray:
    """The plain MONAI way: no_grad, one sliding_window_inference per mirroring, under the same autocast as ours."""
    x = prepare_image([image], geometry, p.plan)[None].to(p.device)
    flips = flip_sets(3, p.plan.tta_axes()) if tta else [()]
    total = None
    autocast = torch.autocast(p.device.type, dtype=p.dtype) if p.dtype is not None else nullcontext()
    with torch.no_grad(), autocast:
        for f in flips:
            xin = x.flip(f) if f else x
            logits = sliding_window_inference(xin, p.plan.patch_size, window_batch(p.config.predict.sw_batch_size, p.device), p.model,
                                              overlap=p.overlap, mode=p.config.predict.blend)
            probs = torch.softmax(logits.float(), 1)
            probs = probs.flip(f) if f else probs
            total = probs if total is None else total + probs
        canon = restore_probabilities(total[0] / len(flips), geometry)
    return to_source_grid(canon.argmax(0).to(torch.uint8).cpu().numpy(), geometry)


def _timed(fn, *args) -> tuple[float, np.ndarray]:  # noqa: ANN001, ANN002
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def compare(p: Predictor, volumes: list[tuple[np.ndarray, Geometry]], tta: bool) -> dict[str, float]:
    """Seconds for both over all volumes (after one warm-up each; mean of two runs each), and label agreement."""
    p.tta = tta
    warm, warm_geometry = synthetic(tuple(int(n) for n in p.plan.patch_size), p.plan.spacing)  # one window
    p.predict_labels([warm], warm_geometry)
    monai_labels(p, warm, warm_geometry, tta)
    ours_s = base_s = 0.0
    same = voxels = 0
    for image, geometry in volumes:
        # A-B-B-A: whichever runs second on a volume was measured ~2-5% faster (warm allocator/caches), so each side
        # runs once first and once second, and the two times are added
        t_ours1, (ours, _) = _timed(p.predict_labels, [image], geometry)
        t_base1, base = _timed(monai_labels, p, image, geometry, tta)
        t_base2, _ = _timed(monai_labels, p, image, geometry, tta)
        t_ours2, _ = _timed(p.predict_labels, [image], geometry)
        ours_s, base_s = ours_s + (t_ours1 + t_ours2) / 2, base_s + (t_base1 + t_base2) / 2
        same, voxels = same + int((ours == base).sum()), voxels + image.size
    return {"ours": ours_s, "monai": base_s, "voxels": voxels, "agree": same / voxels}


def synthetic(shape: tuple[int, ...], spacing: list[float]) -> tuple[np.ndarray, Geometry]:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, shape).astype(np.float32)
    return image, Geometry.from_affine(np.diag([*spacing, 1.0]), shape, source=f"synthetic {shape}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run folder or .ckpt (default: random-weight [16,32,64,128] U-Net)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cases", type=int, default=40, help="last N hippocampus cases")
    ap.add_argument("--size", default="256,256,128", help="synthetic volume size")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--cpu-tta", action="store_true", help="also time TTA on the large synthetic volume on a CPU")
    args = ap.parse_args()
    start = time.perf_counter()
    size = (64, 64, 32) if args.quick else tuple(int(s) for s in args.size.split(","))
    n_cases = 3 if args.quick else args.cases
    p = Predictor.from_checkpoint(args.model, args.device) if args.model else default_predictor(args.device, False)
    console = Console(width=max(130, Console().width))
    console.print(f"device {p.device}, autocast {p.dtype or 'off (fp32)'}, patch {p.plan.patch_size}, "
                  f"overlap {p.overlap}, sw_batch_size {window_batch(p.config.predict.sw_batch_size, p.device)}, threads {torch.get_num_threads()}")
    sets = {f"synthetic {'x'.join(map(str, size))}": [synthetic(size, p.plan.spacing)]}
    files = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[-n_cases:] if HIPPOCAMPUS.is_dir() else []
    if files:
        sets[f"hippocampus, last {len(files)} cases"] = [read_image(f) for f in files]
    table = Table("volumes", "TTA", "ours s", "ours voxels/s", "MONAI s", "MONAI voxels/s", "speed-up", "same label")
    for name, volumes in sets.items():
        for tta in (False, True):
            if tta and name.startswith("synthetic") and p.device.type == "cpu" and not (args.cpu_tta or args.quick):
                table.add_row(name, "yes", "skipped (CPU)", "--cpu-tta", *[""] * 4)
                continue
            r = compare(p, volumes, tta)
            table.add_row(name, "yes" if tta else "no", f"{r['ours']:.2f}", f"{r['voxels'] / r['ours']:.3g}",
                          f"{r['monai']:.2f}", f"{r['voxels'] / r['monai']:.3g}", f"{r['monai'] / r['ours']:.2f}x",
                          f"{100 * r['agree']:.2f}%")
    console.print(table)
    console.print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
