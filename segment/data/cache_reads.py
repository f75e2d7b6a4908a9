"""Reading training and validation data from the disk cache (`segment.data.cache.DiskCache`): whole cases for
validation (`LoadCachedd`) and the foreground-oversampled training patch, read patch-sized from the memory maps
(`CachedPosNegCropd`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms.utils import correct_crop_centers

from segment.data.cache import DiskCache
from segment.data.mirror import mirror_crop, padded_geometry
from segment.io.dataset import Case


class LoadCachedd(mt.Transform):
    """A Case -> its whole preprocessed {'image', 'label', 'name'} from the disk cache (validation)."""

    def __init__(self, cache: DiskCache) -> None:
        self.cache = cache

    def __call__(self, case: Case) -> dict:
        meta, image, label = self.cache.open(case)
        item = {"image": torch.from_numpy(np.array(image, dtype=np.float32)), "name": meta["name"]}
        if label is not None:
            item["label"] = torch.from_numpy(np.asarray(label).astype(np.int64))
        return item


def _crop(array: np.ndarray, starts: Sequence[int], size: Sequence[int], offset: Sequence[int]) -> np.ndarray:
    """The (C, *size) box at `starts` of the array zero-padded by `offset` before each axis: only the box is read."""
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for st, n, off, have in zip(starts, size, offset, array.shape[1:]):
        lo, hi = max(st - off, 0), min(st - off + n, have)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - (st - off), hi - (st - off)))
    out[tuple(dst)] = array[tuple(src)]
    return out


class CachedPosNegCropd(mt.Randomizable, mt.Transform):
    """The patch `SpatialPadd` + `FgBgToIndicesd` + `RandCropByPosNegLabeld(num_samples=1)` would cut, from the cache.

    Same random draws in the same order as MONAI 1.x's `generate_pos_neg_label_crop_centers` (`rand()` for
    foreground-or-background, `randint(n)` for the n-th such voxel in C order of the padded label), so with the same
    random state it returns the same patch as the RAM pipeline. The n-th voxel is found from the per-slice foreground
    counts in meta.json and one label slice; the symmetric zero padding is virtual. Returns a one-element list, like
    `RandCropByPosNegLabeld`. With a `border` ((before, after) voxels per axis, `segment.data.pipeline.valid_border`)
    the case is padded as `MirrorPadd` pads it in the RAM pipeline for valid padding: the image mirrored
    (`mirror_crop` reads only the patch's source voxels), the label with 0; also virtual.
    """

    def __init__(self, cache: DiskCache, spatial_size: Sequence[int], pos: float,
                 border: Sequence[Sequence[int]] | None = None) -> None:
        self.cache = cache
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.pos = float(pos)
        self.mirror = bool(border)
        self.border = [(int(b[0]), int(b[1])) for b in border] if border else [(0, 0)] * len(self.spatial_size)

    def randomize(self, data: Any = None) -> None:  # the draws happen in __call__, where the counts are known
        pass

    def _center(self, meta: dict, label: np.ndarray, padded: tuple[int, ...], offset: tuple[int, ...]) -> tuple:
        shape = tuple(meta["shape"])
        per_slice = np.zeros(padded[0], dtype=np.int64)
        per_slice[offset[0]:offset[0] + shape[0]] = meta["fg_per_slice"]
        inner = int(np.prod(padded[1:]))
        n_fg = int(per_slice.sum())
        n_bg = int(np.prod(padded)) - n_fg
        pos = self.pos
        if n_fg == 0 or n_bg == 0:
            pos = 0 if n_fg == 0 else 1
        use_fg = self.R.rand() < pos
        k = int(self.R.randint(n_fg if use_fg else n_bg))
        counts = per_slice if use_fg else inner - per_slice
        cum = np.cumsum(counts)
        p = int(np.searchsorted(cum, k, side="right"))
        k -= int(cum[p - 1]) if p else 0
        plane = np.zeros(padded[1:], dtype=label.dtype)
        r = p - offset[0]
        if 0 <= r < shape[0]:
            plane[tuple(slice(o, o + s) for o, s in zip(offset[1:], shape[1:]))] = label[0, r]
        j = int(np.flatnonzero(plane != 0 if use_fg else plane == 0)[k])
        center = np.unravel_index(p * inner + j, padded)
        return correct_crop_centers([int(c) for c in center], self.spatial_size, padded, False)

    def __call__(self, case: Case) -> list[dict]:
        meta, image, label = self.cache.open(case)
        shape = tuple(meta["shape"])
        padded, offset = padded_geometry(shape, self.border, self.spatial_size)  # border, then SpatialPadd's symmetric
        center = self._center(meta, label, padded, offset)
        starts = [max(int(c) - s // 2, 0) for c, s in zip(center, self.spatial_size)]
        crop_image = mirror_crop if self.mirror else _crop
        return [{
            "image": torch.from_numpy(crop_image(image, starts, self.spatial_size, offset)),
            "label": torch.from_numpy(_crop(label, starts, self.spatial_size, offset).astype(np.int64)),
            "name": meta["name"],
        }]
