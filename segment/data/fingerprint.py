"""A dataset's fingerprint: shapes and spacings from the headers, foreground intensities of a sample of cases, and the
axes along which labels keep a fixed order (reported before mirroring is planned). `make_plan` plans from it; the run
folder keeps it as fingerprint.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segment.data.profile import profile_of, scan_statistics
from segment.io.case import read_case
from segment.io.dataset import Dataset
from segment.io.geometry import canonical_grid
from segment.io.image import Geometry, read_channel_geometry


def _canonical_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing in canonical (RAS) axis order, from the header only."""
    grid = canonical_grid(read_channel_geometry(path)[0])  # a 4D (multi-channel) file has the grid of its volumes
    return grid.shape, grid.spacing


def label_centroids(label: np.ndarray, geometry: Geometry) -> dict[int, list[float]]:
    """Centroid (canonical RAS voxel axes, mm) of every foreground label present in a label map."""
    from segment.io.image import to_canonical

    from scipy import ndimage

    canon, grid = to_canonical(label, geometry)
    values = [int(v) for v in np.unique(canon) if v != 0]
    # one pass over the volume for all labels (a CT label map may hold ~100 of them)
    centres = ndimage.center_of_mass(np.ones(canon.shape, np.uint8), labels=canon, index=values)
    return {v: (np.asarray(c) * np.asarray(grid.spacing)).tolist() for v, c in zip(values, centres)}


def ordered_axes(centroids: list[dict[int, list[float]]], agreement: float = 0.9, min_cases: int = 3,
                 min_mm: float = 1.0) -> dict[int, str]:
    """Axes along which some pair of labels keeps the same order in (nearly) every case, e.g. "1 before 2".

    Mirroring along such an axis shows the network anatomy that never occurs (the anterior hippocampus behind the
    posterior one, the left kidney on the right). Planning reports these axes; it does not drop them. Returns {axis: reason}.
    """
    labels = sorted({k for c in centroids for k in c})
    found: dict[int, str] = {}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            diffs = np.array([np.subtract(c[b], c[a]) for c in centroids if a in c and b in c])
            if len(diffs) < min_cases:
                continue
            for axis in range(diffs.shape[1]):
                d = diffs[:, axis]
                same_sign = max((d > 0).mean(), (d < 0).mean())
                if same_sign >= agreement and abs(np.median(d)) >= min_mm and axis not in found:
                    found[axis] = f"label {b} is {'after' if np.median(d) > 0 else 'before'} label {a} in {same_sign:.0%} of cases"
    return found


def fingerprint(dataset: Dataset, max_intensity_cases: int = 20, intensity_channels: Sequence[int] = (0,)) -> dict:
    """Spacings, shapes (canonical axes), foreground intensity statistics and label layout of a dataset, and the scan
    profile (`segment.data.profile`) of the cases it reads.

    The intensity statistics pool the foreground voxels of `intensity_channels` (the CT channels, whose normalisation
    uses them; channel 0 when there are none).
    """
    shapes, spacings = zip(*(_canonical_header(c.images[0]) for c in dataset.cases))
    fg: list[np.ndarray] = []
    centroids: list[dict[int, list[float]]] = []
    stats: list[dict] = []
    step = max(1, len(dataset.cases) // max_intensity_cases)
    for case in dataset.cases[::step][:max_intensity_cases]:
        if case.label is None:
            continue
        data = read_case(case.images, case.label)
        lab, geom = data.label, data.geometry
        assert lab is not None
        stats.append(scan_statistics(data.channels, geom))
        mask = lab > 0
        vals = np.concatenate([data.channels[c][mask] for c in intensity_channels if c < len(data.channels)])
        if vals.size:
            fg.append(np.random.default_rng(0).choice(vals, size=min(vals.size, 10000), replace=False))
        if lab.ndim == 3:
            centroids.append(label_centroids(lab, geom))
    fg_all = np.concatenate(fg) if fg else np.zeros(1, np.float32)
    ordered = ordered_axes(centroids)
    return {
        "ordered_axes": {str(k): v for k, v in ordered.items()},
        "shapes": [list(s) for s in shapes],
        "spacings": [list(s) for s in spacings],
        "median_spacing": np.median(np.array(spacings), axis=0).tolist(),
        "fg_percentiles": [float(np.percentile(fg_all, q)) for q in (0.5, 50, 99.5)],
        "fg_mean": float(fg_all.mean(dtype=np.float64)),
        "fg_std": float(fg_all.std(dtype=np.float64) + 1e-8),  # in float32 the squares overflow for values past 1e19
        "fg_channels": [int(c) for c in intensity_channels],
        # the out-of-distribution profile of the same cases (scan_profile.json; not part of fingerprint.json)
        "scan_profile": profile_of(stats) if stats else None,
    }
