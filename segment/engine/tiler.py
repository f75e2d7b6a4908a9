"""Overlap-tile prediction for valid-padded networks, whose output is smaller than their input.

MONAI's `sliding_window_inference` assumes a window's output covers its input, so it cannot place the smaller
output of a valid-padded U-Net. Here the windows are laid out on the *output* grid: the volume is mirror-padded by
the network's margin, each output window reads the input window around it, and overlapping outputs are blended.

Window starts are multiples of the network's `size_multiple()`: a valid U-Net with stride-2 convs is only
shift-equivariant by that step, so aligned windows give exactly what one forward pass over the whole padded
volume would give (up to floating-point summation order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import Tensor, nn

from segment.errors import GeometryError


def reflect_pad(x: Tensor, before: Sequence[int], after: Sequence[int]) -> Tensor:
    """Mirror-pad the spatial axes of (N, C, *spatial); pads larger than the volume are mirrored repeatedly."""
    before, after = list(before), list(after)
    while any(before) or any(after):
        pads: list[int] = []
        for axis in reversed(range(len(before))):  # F.pad takes the last axis first
            room = x.shape[2 + axis] - 1
            b, a = min(before[axis], room), min(after[axis], room)
            before[axis] -= b
            after[axis] -= a
            pads += [b, a]
        if not any(pads):  # only single-voxel axes are left, and one voxel cannot be mirrored
            return F.pad(x, _flat(before, after), mode="replicate")
        x = F.pad(x, pads, mode="reflect")
    return x


def _flat(before: Sequence[int], after: Sequence[int]) -> list[int]:
    return [v for axis in reversed(range(len(before))) for v in (before[axis], after[axis])]


def window_geometry(model: nn.Module, patch_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(input window, output window, alignment step): the largest allowed input not above `patch_size`."""
    n = len(patch_size)  # per axis where the network has per-axis strides (anisotropic plans)
    steps = tuple(model.size_multiples()) if hasattr(model, "size_multiples") else (int(model.size_multiple()),) * n
    lows = tuple(model.min_input_sizes()) if hasattr(model, "min_input_sizes") else (int(model.min_input_size()),) * n
    win_in = tuple(lo + st * max(0, (int(p) - lo) // st) for p, lo, st in zip(patch_size, lows, steps))
    return win_in, tuple(model.output_size(win_in)), max(steps)  # starts on multiples of every axis's step


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts covering [0, length); `length - window` is a multiple of `stride`'s step by construction."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _windows(out_shape: Sequence[int], win_out: Sequence[int], overlap: float, step: int) -> list[tuple[int, ...]]:
    """All output-window corners; strides are multiples of `step`."""
    strides = [max(step, int(w * (1 - overlap)) // step * step) for w in win_out]
    axes = [_starts(n, w, s) for n, w, s in zip(out_shape, win_out, strides)]
    corners: list[tuple[int, ...]] = [()]
    for starts in axes:
        corners = [c + (s,) for c in corners for s in starts]
    return corners


def _batches(n_images: int, corners: list[tuple[int, ...]], size: int) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
    jobs = [(i, c) for i in range(n_images) for c in corners]
    for k in range(0, len(jobs), size):
        yield jobs[k:k + size]


def tiled_logits(
    model: nn.Module,
    image: Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    blend: str = "gaussian",
) -> Tensor:
    """Logits (N, K, *spatial) of a valid-padded model for an image (N, C, *spatial); every voxel is covered."""
    if not 0 <= overlap < 1:
        raise GeometryError(f"overlap {overlap}: expected a value in [0, 1)")
    spatial = tuple(image.shape[2:])
    win_in, win_out, step = window_geometry(model, patch_size)
    margin = [i - o for i, o in zip(win_in, win_out)]
    # the covered output grid: at least one window, and window-aligned so every start is a multiple of `step`
    out_shape = tuple(w + step * math.ceil(max(0, n - w) / step) for n, w in zip(spatial, win_out))
    before = [m // 2 for m in margin]  # the model centre-crops: output voxel j sits on input voxel j + margin // 2
    after = [m - b + t - n for m, b, t, n in zip(margin, before, out_shape, spatial)]
    padded = reflect_pad(image, before, after)
    weight = compute_importance_map(win_out, mode=blend, sigma_scale=0.125, device=image.device, dtype=torch.float32)
    out: Tensor | None = None
    count = torch.zeros((1, 1, *out_shape), device=image.device, dtype=torch.float32)
    corners = _windows(out_shape, win_out, overlap, step)
    for batch in _batches(image.shape[0], corners, sw_batch_size):
        inputs = torch.stack([padded[i][(slice(None),) + _box(c, win_in)] for i, c in batch])
        logits = model(inputs).float()
        if out is None:
            out = torch.zeros((image.shape[0], logits.shape[1], *out_shape), device=image.device, dtype=torch.float32)
        for (i, c), window in zip(batch, logits):
            out[(i, slice(None)) + _box(c, win_out)] += window * weight
            if i == 0:
                count[(0, slice(None)) + _box(c, win_out)] += weight
    assert out is not None  # at least one window always exists
    return (out / count)[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]


def _box(corner: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(c, c + s) for c, s in zip(corner, size))
