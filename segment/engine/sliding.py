"""Window-wise prediction over a whole volume.

Same-padded networks use MONAI's `sliding_window_inference` (Gaussian blending). Valid-padded networks (output smaller
than input) need overlap-tile prediction, which lives in `segment.engine.tiler`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from torch import nn

MAX_BATCH_ELEMENTS = 2**27  # logits kept at once by mirror TTA (512 MB in fp32): beyond that, flips run in turn


@lru_cache(maxsize=8)
def _weight_map(roi: tuple[int, ...], mode: str, device: str) -> torch.Tensor:
    """MONAI recomputes the Gaussian for every call; a batch of scans shares one."""
    return compute_importance_map(roi, mode=mode, sigma_scale=0.125, device=device, dtype=torch.float32)


def window_batch(requested: int | None, device: torch.device | str) -> int:
    """Windows per forward pass: as configured, else 2 on CPU (batches of 4-8 measured 10-30% slower there) or 4."""
    if requested:
        return int(requested)
    return 2 if torch.device(device).type == "cpu" else 4


def sliding_logits(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int | None = None,
    blend: str = "gaussian",
) -> torch.Tensor:
    """Logits (N, K, *spatial) for an image (N, C, *spatial) of any size, window by window."""
    sw_batch_size = window_batch(sw_batch_size, image.device)
    if getattr(getattr(model, "cfg", None), "padding", "same") == "valid":
        from segment.engine.tiler import grown_window, tiled_logits

        patch_size = grown_window(model, patch_size, image.shape[2:])  # fewer, larger windows than the training patch
        return tiled_logits(model, image, patch_size, overlap=overlap, sw_batch_size=sw_batch_size, blend=blend)
    roi = tuple(int(p) for p in patch_size)
    covers = all(n >= p for n, p in zip(image.shape[2:], roi))
    weight = _weight_map(roi, blend, str(image.device)) if covers else None
    return sliding_window_inference(
        image, roi_size=list(roi), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap,
        mode=blend, padding_mode="constant", roi_weight_map=weight,
    )


def flip_sets(spatial_dims: int, mirror_axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every combination of mirrored spatial axes as tensor dims (2..), the identity first: 8 in 3D, 4 in 2D.

    `mirror_axes` (spatial axes 0..) limits it to the axes the model was trained to mirror.
    """
    axes = [2 + a for a in (range(spatial_dims) if mirror_axes is None else mirror_axes)]
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def softmax_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int | None = None,
    blend: str = "gaussian",
    tta: bool = False,
    mirror_axes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class probabilities (K, *spatial) in fp32 for one image (1, C, *spatial); with `tta`, averaged over mirrorings.

    On a GPU, mirrored copies are stacked along the batch axis so their windows share forward passes, in as many
    chunks as keep the blended logits under MAX_BATCH_ELEMENTS. On a CPU bigger batches are slower, not faster
    (benchmarks/predict_speed.py), so mirrorings run one at a time there.
    """
    flips = flip_sets(image.ndim - 2, mirror_axes) if tta else [()]
    per_copy = 8 * math.prod(image.shape[2:])  # a guess at K; only bounds memory
    chunk = 1 if image.device.type == "cpu" else max(1, min(len(flips), MAX_BATCH_ELEMENTS // max(1, per_copy)))
    total: torch.Tensor | None = None
    for k in range(0, len(flips), chunk):
        group = flips[k:k + chunk]
        batch = torch.cat([image.flip(f) if f else image for f in group])
        logits = sliding_logits(model, batch, patch_size, overlap=overlap, sw_batch_size=sw_batch_size, blend=blend)
        probs = torch.softmax(logits.float(), dim=1)
        for p, f in zip(probs, group):
            p = p.flip([d - 1 for d in f]) if f else p  # one batch axis fewer
            total = p if total is None else total + p
    assert total is not None
    return total / len(flips)
