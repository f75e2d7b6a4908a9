"""Label maps from one network or the mean of several (the folds of a k-fold run), slab-streamed, with a confidence score.

The slab loop of `segment.engine.stream.predict_canonical_labels`, with the members' probabilities averaged per slab:
for each slab of the network grid every member computes its softmax probabilities (after its own TTA mirrorings) with
the engine's `slab_probabilities`, they are summed one member at a time into one (K, *slab) buffer, divided by the
number of members, scored (`ConfidenceStats`) and handed to the engine's `CanonicalWriter`. Memory is that of a single
model's streamed prediction plus one more slab; the members share the input, since they share one plan.

Valid-padded networks give whole-grid probabilities (as in the engine): these are summed member by member at network
resolution (one K x network-grid buffer) and written once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from segment.data.plan import Plan
from segment.engine.sliding import flip_sets, softmax_probabilities, window_batch
from segment.engine.stream import CanonicalWriter, num_classes, slab_probabilities, slab_rows, window_corners
from segment.inference.confidence import ConfidenceStats


def _mean_into(total: Tensor | None, probs: Tensor) -> Tensor:
    return probs if total is None else total.add_(probs)


def ensemble_canonical_labels(
    members: Sequence[nn.Module],
    x: Tensor,
    plan: Plan,
    out_shape: Sequence[int],
    *,
    overlap: float,
    sw_batch_size: int | None,
    blend: str,
    tta: bool,
    mirror_axes: Sequence[int] | None,
    stats: ConfidenceStats | None = None,
    slab_voxels: int | None = None,
    want_probabilities: bool = False,
    probability_dtype: type = np.uint8,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and, if asked, probabilities) on the canonical grid from the mean of the members' probabilities.

    Arguments as `segment.engine.stream.predict_canonical_labels`; `stats` collects the confidence score on the way.
    With one member the labels are exactly that function's.
    """
    roi = tuple(int(p) for p in plan.patch_size)
    grid = tuple(int(n) for n in x.shape[2:])
    axis = int(np.argmax(grid))
    want = np.dtype(probability_dtype) if want_probabilities else None
    batch = window_batch(sw_batch_size, x.device)
    n = len(members)
    if any(getattr(getattr(m, "cfg", None), "padding", "same") == "valid" for m in members):
        total: Tensor | None = None
        for model in members:
            total = _mean_into(total, softmax_probabilities(model, x, roi, overlap=overlap, sw_batch_size=batch,
                                                            blend=blend, tta=tta, mirror_axes=mirror_axes).float())
        assert total is not None
        total = total.div_(n) if n > 1 else total
        if stats is not None:
            stats.add(total)
        writer = CanonicalWriter(total.shape[0], grid, out_shape, axis, probabilities=want)
        with torch.autocast(x.device.type, enabled=False):
            writer.add(total, 0)
        return writer.labels, writer.probabilities
    flips = flip_sets(len(grid), mirror_axes) if tta else [()]
    grids = {tuple(d - 2 for d in f): window_corners(grid, roi, overlap, [d - 2 for d in f]) for f in flips}
    k = num_classes(members[0], x, roi)
    step = max(1, int(roi[axis] * (1 - overlap)))
    copies = (1 if len(grids) == 1 else 2) + (1 if n > 1 else 0)  # the members' sum is one more slab
    rows = slab_rows(k, grid, roi, axis, copies=copies, step=step, slab_voxels=slab_voxels)
    writer = CanonicalWriter(k, grid, out_shape, axis, probabilities=want)
    for lo in range(0, grid[axis], rows):
        hi = min(grid[axis], lo + rows)
        probs: Tensor | None = None
        for model in members:  # one member at a time into the running sum
            probs = _mean_into(probs, slab_probabilities(model, x, roi, grids, axis, lo, hi, sw_batch_size=batch,
                                                         blend=blend))
        assert probs is not None
        probs = probs.div_(n) if n > 1 else probs
        if stats is not None:
            stats.add(probs)
        with torch.autocast(x.device.type, enabled=False):
            writer.add(probs, lo)
        del probs
    return writer.labels, writer.probabilities
