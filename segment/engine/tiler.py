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
from monai.data.utils import compute_importance_map
from torch import Tensor, nn

from segment.data.mirror import mirror_indices
from segment.errors import GeometryError


def reflect_pad(x: Tensor, before: Sequence[int], after: Sequence[int]) -> Tensor:
    """Mirror-pad the spatial axes of (N, C, *spatial) by the training pipeline's rule (`segment.data.mirror`):
    pads larger than the volume are mirrored repeatedly, a one-voxel axis is repeated."""
    for axis, (b, a) in enumerate(zip(before, after)):
        if b or a:
            idx = torch.from_numpy(mirror_indices(x.shape[2 + axis], b, a)).to(x.device)
            x = x.index_select(2 + axis, idx)
    return x


def window_geometry(model: nn.Module, patch_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(input window, output window, alignment step): the largest allowed input not above `patch_size`."""
    n = len(patch_size)  # per axis where the network has per-axis strides (anisotropic plans)
    steps = tuple(model.size_multiples()) if hasattr(model, "size_multiples") else (int(model.size_multiple()),) * n
    lows = tuple(model.min_input_sizes()) if hasattr(model, "min_input_sizes") else (int(model.min_input_size()),) * n
    win_in = tuple(lo + st * max(0, (int(p) - lo) // st) for p, lo, st in zip(patch_size, lows, steps))
    return win_in, tuple(model.output_size(win_in)), max(steps)  # starts on multiples of every axis's step


def grown_window(model: nn.Module, patch_size: Sequence[int], spatial: Sequence[int], grow: float = 2.0) -> tuple[int, ...]:
    """An input window for predicting a volume of size `spatial`: as large as covers the volume in one window, within
    `grow` times the voxels of `patch_size`, and never smaller than `window_geometry`'s (an allowed size throughout).

    A valid net's output window is the training patch less the margin (a 71^3 input gives 18^3), so tiling a volume
    with it runs many mostly-overlapping windows; a forward pass without gradients holds far less than a training
    step, so `sliding_logits` (validation and prediction) tiles with this larger window. With batch norm (eval) the logits are those of the
    training-size windows (shift-equivariance: both equal one whole pass); instance norm normalises each window over
    its own region, so a larger window sees statistics over more context than the training patches did.
    """
    win_in, _, _ = window_geometry(model, patch_size)
    steps = tuple(model.size_multiples())
    full = [max(w, f) for w, f in zip(win_in, model.input_size_for(spatial))]
    budget = max(math.prod(win_in), grow * math.prod(int(p) for p in patch_size))
    while math.prod(full) > budget:
        axis = max(range(len(full)), key=lambda a: full[a] - win_in[a])
        if full[axis] == win_in[axis]:
            break
        full[axis] -= steps[axis]
    return tuple(full)


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
