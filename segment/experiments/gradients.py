"""Gradient norm per encoder depth at initialisation: does a stage still get a learning signal without its skip?

Without a long skip connection, the only path from the loss to a high-resolution encoder stage runs through the
whole bottleneck, so its gradient may be much smaller than with the skip. Measuring this at the start of training
(same initial weights, same patches for every variant) shows the effect before optimisation changes the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from segment.errors import InputError


def _network(model_or_module: nn.Module) -> nn.Module:
    """The U-Net itself, whether given directly or wrapped in a SegmentationModule (attribute `model`)."""
    net = getattr(model_or_module, "model", model_or_module)
    if not hasattr(net, "encoder") or not hasattr(net.encoder, "stages"):
        raise InputError(f"encoder_grad_norms: {type(model_or_module).__name__} has no encoder.stages "
                         "(expected a segment UNet or SegmentationModule)")
    return net


def _loss_fn(model_or_module: nn.Module) -> nn.Module:
    """The training loss of a SegmentationModule, or Dice + cross-entropy for a bare network."""
    loss = getattr(model_or_module, "loss_fn", None)
    if loss is not None:
        return loss
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)


def encoder_grad_norms(model_or_module: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """L2 norm of the loss gradient over each encoder stage's parameters (index 0 = highest resolution).

    `batch` holds "image" (B, C, *patch) and "label" (B, 1, *patch). The loss is the training loss of the main output
    (deep-supervision heads left out, so variants compare like with like). The model's gradients are cleared before
    and after, and its train/eval mode is restored, so measuring does not disturb a later training run.
    """
    from segment.nets import center_crop

    net = _network(model_or_module)
    loss_fn = _loss_fn(model_or_module)
    device = next(net.parameters()).device
    image, label = batch["image"].to(device).float(), batch["label"].to(device).long()
    was_training = net.training
    net.train()
    net.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            out = net(image)
            target = center_crop(label, list(out.shape[2:]))  # 'valid' padding: the output is smaller
            loss_fn(out.float(), target).backward()
        norms = []
        for stage in net.encoder.stages:
            grads = [p.grad.detach().float().pow(2).sum() for p in stage.parameters() if p.grad is not None]
            norms.append(float(torch.stack(grads).sum().sqrt()) if grads else 0.0)
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return norms


def mean_encoder_grad_norms(model_or_module: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """`encoder_grad_norms` averaged over several batches (one batch is a noisy estimate)."""
    if not batches:
        raise InputError("mean_encoder_grad_norms: no batches given")
    return [float(v) for v in np.mean([encoder_grad_norms(model_or_module, b) for b in batches], axis=0)]


def _crop_around(array: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(C, *shape) array cropped to `size` around `centre`, zero-padded where the volume is smaller."""
    pad = [(0, 0)] + [(0, max(0, s - n)) for s, n in zip(size, array.shape[1:])]
    array = np.pad(array, pad)
    starts = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, array.shape[1:])]
    return array[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size)))]


def foreground_patches(items: Sequence[dict[str, Any]], patch_size: Sequence[int],
                       batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Deterministic batches: one patch per preprocessed case, centred on its foreground (or its centre).

    `items` are `load_case` dicts ("image" (C, *shape), "label" (1, *shape)); cases are used in order, so every
    variant of an ablation sees exactly the same patches.
    """
    patches = []
    for item in items:
        image, label = np.asarray(item["image"]), np.asarray(item["label"])
        fg = np.argwhere(label[0] > 0)
        centre = fg.mean(axis=0).round().astype(int) if fg.size else np.array(label.shape[1:]) // 2
        patches.append((_crop_around(image, centre, patch_size), _crop_around(label, centre, patch_size)))
    batch_size = max(1, int(batch_size))
    return [{"image": torch.from_numpy(np.stack([p[0] for p in patches[i:i + batch_size]])).float(),
             "label": torch.from_numpy(np.stack([p[1] for p in patches[i:i + batch_size]])).long()}
            for i in range(0, len(patches), batch_size)]
