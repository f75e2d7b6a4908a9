"""Label maps on the scan's canonical grid without ever holding K x (whole volume) floats (issue 15).

The plain path (`softmax_probabilities` + `restore_probabilities` + argmax) keeps every class probability of the whole
volume twice: at network resolution and again after resizing to the scan's grid; for a 104-class CT at 512x512x600
that is over 60 GB. Here the network grid is cut into slabs along its longest axis. For each slab only the windows of
MONAI's window grid that overlap it are run, and blended exactly as `sliding_window_inference` blends them (a voxel
only ever receives weight from windows that cover it, so the slab's voxels get the same sums); with TTA each mirroring
uses the window grid MONAI would lay on the mirrored image. The slab's probabilities are then resampled (trilinear,
align_corners=False, as `preprocess._resize`) to the canonical rows they feed, a chunk at a time, and reduced to labels
at once. Memory is the label map plus one slab and one chunk, bounded by SLAB_BYTES rather than by the volume.

Windows that straddle a slab border are run once per slab they touch; slabs are never thinner than one patch, so
that costs at most 1.5x the network time (50% overlap), and nothing when one slab holds the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from torch import Tensor, nn

from segment.data.plan import Plan
from segment.engine.sliding import (
    _weight_map,
    flip_sets,
    softmax_probabilities,
    window_batch,
)

SLAB_BYTES = 512 * 2**20  # fp32 class scores held per slab (and per resampled chunk)

Corner = tuple[int, ...]


def num_classes(model: nn.Module, x: Tensor, roi: Sequence[int]) -> int:
    """K from the model's config, else from one forward pass on a window (a bare nn.Module has no config)."""
    k = getattr(getattr(model, "cfg", None), "out_channels", None)
    if k is not None:
        return int(k)
    return int(model(_crop(x, (0,) * len(roi), roi)).shape[1])


def window_corners(shape: Sequence[int], roi: Sequence[int], overlap: float, flipped: Sequence[int] = ()) -> list[Corner]:
    """MONAI's window grid for the image mirrored along `flipped` (spatial axes), as corners in the unmirrored image.

    `sliding_window_inference` pads an image smaller than the window (half before, the rest after) and lays windows
    from `dense_patch_slices`; a corner is negative where a window starts in that padding.
    """
    padded = [max(int(n), int(r)) for n, r in zip(shape, roi)]
    interval = [r if r == p else max(1, int(r * (1 - overlap))) for r, p in zip(roi, padded)]
    corners = []
    for window in dense_patch_slices(padded, list(roi), interval):
        corner = []
        for axis, (s, n, r, p) in enumerate(zip(window, shape, roi, padded)):
            before = (p - n) // 2  # MONAI's padding of the (mirrored) image
            corner.append(n - r - s.start + before if axis in flipped else s.start - before)
        corners.append(tuple(corner))
    return corners


def _crop(x: Tensor, corner: Corner, roi: Sequence[int]) -> Tensor:
    """The (N, C, *roi) window at `corner`, zero where it leaves the image (MONAI pads with constant 0)."""
    src = tuple(slice(max(c, 0), min(c + r, n)) for c, r, n in zip(corner, roi, x.shape[2:]))
    window = x[(slice(None), slice(None), *src)]
    if tuple(window.shape[2:]) == tuple(roi):
        return window
    out = x.new_zeros((*x.shape[:2], *roi))
    out[(slice(None), slice(None), *(slice(s.start - c, s.stop - c) for s, c in zip(src, corner)))] = window
    return out


def _overlap(corner: Corner, roi: Sequence[int], shape: Sequence[int], axis: int, lo: int,
             hi: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slab slices, window slices) of the part of a window inside the image and inside rows [lo, hi) of `axis`."""
    dst, src = [], []
    for d, (c, r, n) in enumerate(zip(corner, roi, shape)):
        start, stop, offset = max(c, 0), min(c + r, n), 0
        if d == axis:
            start, stop, offset = max(start, lo), min(stop, hi), lo
        dst.append(slice(start - offset, stop - offset))
        src.append(slice(start - c, stop - c))
    return tuple(dst), tuple(src)


def _softmax_(logits: Tensor) -> Tensor:
    """Softmax over axis 0 in place: a slab's logits are the biggest tensor here, so no second copy is made."""
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


def slab_probabilities(model: nn.Module, x: Tensor, roi: Sequence[int], grids: dict[tuple[int, ...], list[Corner]],
                       axis: int, lo: int, hi: int, *, sw_batch_size: int, blend: str) -> Tensor:
    """Probabilities (K, *slab) of rows [lo, hi), averaged over the mirrorings in `grids` (spatial axes -> corners).

    Each mirroring's windows are blended as MONAI blends them on the whole (mirrored) image (a voxel's weights come
    from the windows that cover it), but the window batches are filled across mirrorings, in order: a scan smaller
    than the patch has one window per mirroring, and 8 mirrorings then run as 4 forward passes of 2 windows instead
    of 8 of 1 (2 windows cost 25 ms per window on a 2-core CPU, 1 window 29 ms: BENCHMARKS.md). At most
    `sw_batch_size` mirrorings' blended logits are held at once, plus the sum.
    """
    shape = tuple(x.shape[2:])
    slab = tuple(hi - lo if d == axis else n for d, n in enumerate(shape))
    base = _weight_map(tuple(roi), blend, str(x.device))
    jobs = [(flipped, c) for flipped, corners in grids.items() for c in corners if c[axis] < hi and c[axis] + roi[axis] > lo]
    left = {flipped: sum(1 for f, _ in jobs if f == flipped) for flipped in grids}
    acc: dict[tuple[int, ...], Tensor] = {}
    count: dict[tuple[int, ...], Tensor] = {}
    total: Tensor | None = None
    for k in range(0, len(jobs), sw_batch_size):
        group = jobs[k:k + sw_batch_size]
        batch = torch.cat([_crop(x, c, roi).flip([2 + d for d in f]) if f else _crop(x, c, roi) for f, c in group])
        logits = model(batch).float()
        for (flipped, corner), window in zip(group, logits):
            window = window.flip([1 + d for d in flipped]) if flipped else window  # back to the unmirrored image
            weight = base.flip(list(flipped)) if flipped else base
            if flipped not in acc:
                acc[flipped] = torch.zeros((window.shape[0], *slab), device=x.device, dtype=torch.float32)
                count[flipped] = torch.zeros((1, *slab), device=x.device, dtype=torch.float32)
            dst, src = _overlap(corner, roi, shape, axis, lo, hi)
            acc[flipped][(slice(None), *dst)].addcmul_(window[(slice(None), *src)], weight[src])
            count[flipped][(slice(None), *dst)] += weight[src]
            left[flipped] -= 1
            if not left[flipped]:  # every window of this mirroring is in: its probabilities join the sum
                probs = _softmax_(acc.pop(flipped).div_(count.pop(flipped)))
                total = probs if total is None else total.add_(probs)
    assert total is not None and not acc  # every row lies in some window of every mirroring
    return total.div_(len(grids)) if len(grids) > 1 else total


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weight of each output row of a 1D linear resize, as `F.interpolate(align_corners=False)`."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


class CanonicalWriter:
    """Takes network-grid probabilities slab by slab (in order along `axis`) and fills the canonical label map.

    A canonical row is written once both network rows it interpolates between have arrived; the last network row
    of a slab is carried over to the next, so no slab needs a margin.
    """

    def __init__(self, k: int, grid: Sequence[int], out_shape: Sequence[int], axis: int, *,
                 probabilities: np.dtype | None = None) -> None:
        self.k, self.grid, self.out_shape, self.axis = k, tuple(grid), tuple(int(n) for n in out_shape), axis
        self.labels = np.zeros(self.out_shape, np.uint8 if k < 256 else np.int16)
        self.probabilities = None if probabilities is None else np.zeros((k, *self.out_shape), probabilities)
        self.i0, self.i1, self.lam = linear_taps(self.grid[axis], self.out_shape[axis])
        self.cross = tuple(n for d, n in enumerate(self.out_shape) if d != axis)
        cross_in = math.prod(n for d, n in enumerate(self.grid) if d != axis)
        self.chunk = max(1, SLAB_BYTES // (4 * k * (3 * cross_in + math.prod(self.cross))))
        self.done, self.carry = 0, None  # next canonical row; last network row seen, as a (K, ..., 1, ...) tensor

    def add(self, probs: Tensor, lo: int) -> None:
        """Network rows [lo, lo + n) of the probabilities (K, *slab); writes every canonical row they complete."""
        a = 1 + self.axis
        hi = lo + probs.shape[a]
        end = self.out_shape[self.axis] if hi == self.grid[self.axis] else int(np.searchsorted(self.i1, hi))
        for j0 in range(self.done, end, self.chunk):
            self._write(probs, lo, j0, min(end, j0 + self.chunk))
        self.done, self.carry = end, probs.narrow(a, probs.shape[a] - 1, 1).clone()

    def _take(self, probs: Tensor, rows: np.ndarray) -> Tensor:
        """Rows of the slab along its axis (sorted, relative to the slab; -1 is the carried row before it)."""
        a = 1 + self.axis
        carried = int((rows < 0).sum())
        taken = probs.index_select(a, torch.as_tensor(rows[carried:], device=probs.device))
        if not carried:
            return taken
        assert self.carry is not None
        size = [carried if d == a else -1 for d in range(probs.ndim)]
        return torch.cat([self.carry.expand(size), taken], dim=a)

    def _write(self, probs: Tensor, lo: int, j0: int, j1: int) -> None:
        a = 1 + self.axis
        p = self._take(probs, self.i0[j0:j1] - lo)
        if self.lam[j0:j1].any():  # no resize along the slab axis: every weight is 0
            lam = torch.as_tensor(self.lam[j0:j1], device=probs.device).view([-1 if d == a else 1 for d in range(p.ndim)])
            p = p.mul_(1 - lam).add_(self._take(probs, self.i1[j0:j1] - lo).mul_(lam))
        p = p.movedim(a, 0)  # (rows, K, *cross): the two other axes are resized together, bilinearly
        if tuple(p.shape[2:]) != self.cross:
            p = F.interpolate(p, size=self.cross, mode="bilinear", align_corners=False)
        index = tuple(slice(j0, j1) if d == self.axis else slice(None) for d in range(len(self.out_shape)))
        self.labels[index] = p.argmax(1).movedim(0, self.axis).cpu().numpy()
        if self.probabilities is not None:
            q = p.movedim(0, a)
            if self.probabilities.dtype == np.uint8:
                q = q.mul(255).round_().to(torch.uint8)
            self.probabilities[(slice(None), *index)] = q.cpu().numpy()


def slab_rows(k: int, grid: Sequence[int], roi: Sequence[int], axis: int, *, copies: int = 1, step: int = 1,
              slab_voxels: int | None = None) -> int:
    """Rows per slab: as many as keep `copies` fp32 K-class slabs under SLAB_BYTES, but at least one patch.

    A window crossing a slab border is run for each slab it touches: with windows `step` rows apart, a slab of
    m * step rows starting on the window grid meets m + 1 rows of windows where one pass would run m, an unaligned
    slab about m + 2, so rows are rounded down to a multiple of `step`. Slabs thinner than a patch would re-run
    windows more often than the memory they save is worth (at 50% overlap: 2x the network time at half a patch, at
    most 1.5x from one patch up); so with many classes and a wide cross-section a slab can exceed SLAB_BYTES.
    `slab_voxels` overrides the budget and the floor (tests).
    """
    cross = math.prod(n for d, n in enumerate(grid) if d != axis)
    if slab_voxels is not None:
        return max(1, min(grid[axis], int(slab_voxels) // cross))
    rows = max(SLAB_BYTES // (4 * k * cross * copies), int(roi[axis]))
    if rows >= grid[axis]:
        return grid[axis]
    return rows // step * step if rows >= step else rows


def _mean_into(total: Tensor | None, probs: Tensor) -> Tensor:
    return probs if total is None else total.add_(probs)


def predict_canonical_labels(
    model: nn.Module | Sequence[nn.Module],
    x: Tensor,
    plan: Plan,
    out_shape: Sequence[int],
    *,
    overlap: float,
    sw_batch_size: int | None,
    blend: str,
    tta: bool,
    mirror_axes: Sequence[int] | None,
    slab_voxels: int | None = None,
    want_probabilities: bool = False,
    probability_dtype: type = np.uint8,
    on_probabilities: Callable[[Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels on the canonical grid `out_shape` (uint8, int16 from 256 classes) for the network input x (1, C, *grid),
    from one network or the mean of several (the folds of a k-fold run, which share one plan).

    With several members, every slab's softmax probabilities (after each member's own TTA mirrorings) are summed one
    member at a time into one (K, *slab) buffer and divided by their number: memory is a single model's streamed
    prediction plus one slab. `on_probabilities` sees every slab's (K, *slab) probabilities on the network grid (the
    per-case confidence score is collected this way). With `want_probabilities`, also the probabilities
    (K, *out_shape) as uint8 (p = value / 255), or as `probability_dtype` float32 where exact values are needed. Call
    under `torch.inference_mode()` (and autocast, if any); resampling and argmax run in fp32 whatever the autocast.
    """
    members = list(model) if isinstance(model, Sequence) else [model]
    n = len(members)
    roi = tuple(int(p) for p in plan.patch_size)
    grid = tuple(int(v) for v in x.shape[2:])
    axis = int(np.argmax(grid))  # the longest axis: the thinnest cross-section, so the most rows per slab
    want = np.dtype(probability_dtype) if want_probabilities else None
    batch = window_batch(sw_batch_size, x.device)
    if any(getattr(getattr(m, "cfg", None), "padding", "same") == "valid" for m in members):
        # Valid-padded networks place their smaller outputs on their own tiling (segment.engine.tiler), which
        # this module does not slab yet: their probabilities come whole at network resolution (K x network grid),
        # summed member by member, and only the resize to the scan's grid (the larger half) is streamed.
        total: Tensor | None = None
        for member in members:
            total = _mean_into(total, softmax_probabilities(member, x, roi, overlap=overlap, sw_batch_size=batch,
                                                            blend=blend, tta=tta, mirror_axes=mirror_axes).float())
        assert total is not None
        total = total.div_(n) if n > 1 else total
        if on_probabilities is not None:
            on_probabilities(total)
        writer = CanonicalWriter(total.shape[0], grid, out_shape, axis, probabilities=want)
        with torch.autocast(x.device.type, enabled=False):
            writer.add(total, 0)
        return writer.labels, writer.probabilities
    flips = flip_sets(len(grid), mirror_axes) if tta else [()]
    grids = {tuple(d - 2 for d in f): window_corners(grid, roi, overlap, [d - 2 for d in f]) for f in flips}
    k = num_classes(members[0], x, roi)
    step = max(1, int(roi[axis] * (1 - overlap)))  # MONAI's window interval
    # the sum of the mirrorings, plus up to a window batch of mirrorings being blended; the members' sum is one more
    copies = (1 if len(grids) == 1 else 1 + min(batch, len(grids))) + (1 if n > 1 else 0)
    rows = slab_rows(k, grid, roi, axis, copies=copies, step=step, slab_voxels=slab_voxels)
    writer = CanonicalWriter(k, grid, out_shape, axis, probabilities=want)
    for lo in range(0, grid[axis], rows):
        hi = min(grid[axis], lo + rows)
        probs: Tensor | None = None
        for member in members:  # one member at a time into the running sum
            probs = _mean_into(probs, slab_probabilities(member, x, roi, grids, axis, lo, hi, sw_batch_size=batch,
                                                         blend=blend))
        assert probs is not None
        probs = probs.div_(n) if n > 1 else probs
        if on_probabilities is not None:
            on_probabilities(probs)
        with torch.autocast(x.device.type, enabled=False):
            writer.add(probs, lo)
        del probs  # before the next slab is allocated, not after
    return writer.labels, writer.probabilities
