"""The one case reader: a case's intensity channels, its optional label map and their shared geometry, all checked.

Training (`segment.data.preprocess.load_case`), prediction and evaluation read cases only through `read_case`, so the
rules — channels may come one file each (nnU-Net `_0000`, `_0001`) or as the volumes of one 4D file (MSD), every
channel and the label share one voxel grid, degenerate headers stop before any compute — hold everywhere alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segment.errors import GeometryError, InputError
from segment.io.geometry import Geometry
from segment.io.image import read_channels, read_label


@dataclass
class CaseData:
    """What a case holds once read: float32 channels (x, y, z) on `geometry`'s grid, and the label map if given."""

    channels: list[np.ndarray]
    geometry: Geometry
    label: np.ndarray | None = None


def read_case(images: Sequence[str | Path], label: str | Path | None = None, *, expected_channels: int | None = None,
              series: str | None = None) -> CaseData:
    """Read every channel file of a case (and its label), checking that they share one voxel grid.

    `expected_channels` (the model's) turns a wrong channel count into one line naming the first file.
    `series` picks one series where a channel is a DICOM folder holding several.
    """
    paths = [Path(p) for p in images]
    if not paths:
        raise InputError("a case needs at least one image file")
    channels: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in paths:
        arrays, g = read_channels(path, series=series)
        if geometry is not None and not geometry.same_grid(g):
            raise GeometryError(f"{path}: channel grid differs from {paths[0]} ({geometry.difference(g)})")
        geometry = geometry or g
        channels += arrays
    assert geometry is not None
    if expected_channels is not None and len(channels) != expected_channels:
        raise InputError(f"{paths[0]}: case has {len(channels)} channel(s) in {len(paths)} file(s), the model expects "
                         f"{expected_channels} (one file per channel, named case_0000, case_0001, ..., or one 4D file)")
    labels = read_label(label, reference=geometry) if label is not None else None
    return CaseData(channels, geometry, labels)
