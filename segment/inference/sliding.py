"""Window-wise prediction over a whole volume.

Same-padded networks use MONAI's `sliding_window_inference` (Gaussian blending). Valid-padded networks (output smaller
than input) need overlap-tile prediction, which lives in `segment.inference.tiler`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn


def sliding_logits(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    blend: str = "gaussian",
) -> torch.Tensor:
    """Logits (N, K, *spatial) for an image (N, C, *spatial) of any size, window by window."""
    if getattr(getattr(model, "cfg", None), "padding", "same") == "valid":
        from segment.inference.tiler import tiled_logits

        return tiled_logits(model, image, patch_size, overlap=overlap, sw_batch_size=sw_batch_size, blend=blend)
    return sliding_window_inference(
        image, roi_size=list(patch_size), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap,
        mode=blend, padding_mode="constant",
    )
