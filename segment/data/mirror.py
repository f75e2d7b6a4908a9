"""Mirror padding: the one rule for what a valid-padded U-Net sees beyond the edge of a scan.

The original U-Net mirrors the image at its border (reflection without repeating the edge voxel, numpy's and torch's
"reflect"), repeatedly where the padding is wider than the scan; an axis of one voxel repeats that voxel. Training
(`MirrorPadd` in the RAM pipeline, `mirror_crop` from the memory-mapped disk cache) and overlap-tile prediction
(`segment.engine.tiler.reflect_pad`) all take their source voxels from `reflect_index`, so a training patch at the
edge of a scan holds the same values as the prediction window at the same place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai import transforms as mt


def reflect_index(coords: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """The voxel in [0, n) that each coordinate of an axis of length `n` reads when the axis is mirrored at both ends,
    again and again (period 2(n - 1)); with n = 1 every coordinate reads voxel 0."""
    coords = np.asarray(coords, dtype=np.int64)
    if n == 1:
        return np.zeros_like(coords)
    period = 2 * (n - 1)
    j = np.mod(coords, period)
    return np.where(j >= n, period - j, j)


def mirror_indices(n: int, before: int, after: int) -> np.ndarray:
    """Source voxels of an axis of length `n` mirror-padded by `before` and `after` voxels."""
    return reflect_index(np.arange(-int(before), int(n) + int(after)), int(n))


def mirror_crop(array: np.ndarray, starts: Sequence[int], size: Sequence[int], offset: Sequence[int]) -> np.ndarray:
    """The (C, *size) box at `starts` of the (C, *spatial) `array` mirror-padded by `offset` voxels before each axis
    (and as far as needed after): only the voxels in the box are read, so a memory map is touched patch-sized."""
    idx = [reflect_index(np.arange(st - off, st - off + s), n)
           for st, s, off, n in zip(starts, size, offset, array.shape[1:])]
    return np.ascontiguousarray(array[(slice(None), *np.ix_(*idx))])


def mirror_pad(array: np.ndarray, before: Sequence[int], after: Sequence[int]) -> np.ndarray:
    """The (C, *spatial) `array` mirror-padded by `before`/`after` voxels per spatial axis."""
    size = [n + b + a for n, b, a in zip(array.shape[1:], before, after)]
    return mirror_crop(array, [0] * len(size), size, before)


def padded_geometry(shape: Sequence[int], border: Sequence[Sequence[int]], patch: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(padded shape, voxels before the scan) of a case grown by `border` ((before, after) per axis), then padded
    symmetrically up to `patch` where still smaller (`SpatialPadd`'s split: the odd voxel after)."""
    grown = [s + b + a for s, (b, a) in zip(shape, border)]
    padded = tuple(max(g, p) for g, p in zip(grown, patch))
    offset = tuple(b + (q - g) // 2 for q, g, (b, _) in zip(padded, grown, border))
    return padded, offset


class MirrorPadd(mt.Transform):
    """Pad a case by `border` and then up to `patch`, as `padded_geometry` places it: the image mirrored
    (`mirror_pad`), the label with 0 (background; foreground crop centres then fall only inside the scan)."""

    def __init__(self, border: Sequence[Sequence[int]], patch: Sequence[int]) -> None:
        self.border = [(int(b), int(a)) for b, a in border]
        self.patch = [int(p) for p in patch]

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        image = np.asarray(item["image"])
        shape = tuple(image.shape[1:])
        padded, offset = padded_geometry(shape, self.border, self.patch)
        after = [q - o - s for q, o, s in zip(padded, offset, shape)]
        out["image"] = torch.from_numpy(mirror_pad(image, offset, after))
        if "label" in item:
            label = np.asarray(item["label"])
            zeros = np.zeros((label.shape[0], *padded), dtype=label.dtype)
            zeros[(slice(None), *(slice(o, o + s) for o, s in zip(offset, shape)))] = label
            out["label"] = torch.from_numpy(zeros)
        return out
