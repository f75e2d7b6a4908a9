"""Deterministic preprocessing shared by training and inference, and its exact inverse for predictions.

A scan goes: read (voxels + Geometry) -> canonical RAS orientation (permutation/flips only, exact) -> resample to the
plan's spacing -> normalise. A prediction comes back: resample probabilities to the canonical grid of the *source* scan
-> argmax -> undo the reorientation -> written with the source's own affine and shape. The geometry never passes through
an interpolation, so the output header is the input header by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import NormalizeIntensity

from segment.data.plan import Plan
from segment.errors import GeometryError
from segment.io.case import read_case
from segment.io.image import Geometry, from_canonical, to_canonical


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Voxel count along each axis after resampling from `spacing` to `target` (mm), at least 1.

    Halves round up, after rounding away float32 header noise: 101 voxels of 3 mm at 6 mm is 50.5 -> 51, whether
    the header says 3.0 mm or 0.003 m (= 3.00000003 mm). Python's round() would give 50 for one and 51 for the other.
    """
    return tuple(max(1, int(np.floor(round(n * s / t, 4) + 0.5))) for n, s, t in zip(shape, spacing, target))


def _resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Resize a (C, *spatial) tensor; a no-op when the size already matches (the common 'same spacing' case)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    kwargs = {"align_corners": False} if mode in ("trilinear", "bilinear") else {}
    return F.interpolate(x[None].float(), size=tuple(size), mode=mode, **kwargs)[0]


def _linear_mode(ndim: int) -> str:
    return "trilinear" if ndim == 3 else "bilinear"


def normalise(image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per-channel intensity normalisation: z-score per volume (MRI, other) or clip + dataset z-score (CT)."""
    if plan.modality == "ct":
        lo, hi = plan.ct_clip
        out = NormalizeIntensity(subtrahend=plan.ct_mean, divisor=plan.ct_std)(image.clamp(lo, hi))
    else:
        out = NormalizeIntensity(channel_wise=True)(image)
    return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out)


def canonical_grid(geometry: Geometry) -> Geometry:
    """The Geometry of `geometry`'s voxels after exact reorientation to RAS (no voxels are touched)."""
    return to_canonical(np.zeros(geometry.shape, dtype=np.uint8), geometry)[1]


def prepare_image(channels: Sequence[np.ndarray], geometry: Geometry, plan: Plan) -> torch.Tensor:
    """Voxels on the source grid (one array per channel) -> normalised (C, *spatial) tensor on the plan's grid."""
    canon = [to_canonical(np.asarray(c, dtype=np.float32), geometry)[0] for c in channels]
    canon_geom = canonical_grid(geometry)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(canon)))
    size = resampled_shape(canon_geom.shape, canon_geom.spacing, plan.spacing)
    x = _resize(x, size, _linear_mode(x.ndim - 1))
    return normalise(x, plan).float()


def prepare_label(label: np.ndarray, geometry: Geometry, plan: Plan) -> torch.Tensor:
    """Integer label map on the source grid -> (1, *spatial) int tensor on the plan's grid (nearest neighbour)."""
    canon, canon_geom = to_canonical(np.asarray(label), geometry)
    y = torch.from_numpy(np.ascontiguousarray(canon.astype(np.int64)))[None]
    size = resampled_shape(canon_geom.shape, canon_geom.spacing, plan.spacing)
    return _resize(y.float(), size, "nearest").long()


def restore_probabilities(probs: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(K, *plan grid) class probabilities -> (K, *canonical grid of the source scan), ready for argmax."""
    return _resize(probs.float(), canonical_grid(geometry).shape, _linear_mode(probs.ndim - 1))


def to_source_grid(canonical: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An array on the source's canonical grid (leading channel axes allowed) -> the source's own voxel order."""
    out = from_canonical(canonical, geometry)
    if tuple(out.shape[-len(geometry.shape):]) != tuple(geometry.shape):
        raise GeometryError(
            f"{geometry.source}: restored prediction has shape {out.shape}, the scan has {geometry.shape}; refusing to write"
        )
    return out


def load_case(images: Sequence[Path], label: Path | None, plan: Plan) -> dict:
    """Read and preprocess one case into the dict MONAI transforms expect ('image', optionally 'label', 'name')."""
    case = read_case(images, label, expected_channels=plan.channels)
    item = {"image": prepare_image(case.channels, case.geometry, plan), "name": Path(images[0]).name,
            "geometry": case.geometry.to_dict()}
    if case.label is not None:
        item["label"] = prepare_label(case.label, case.geometry, plan)
    return item
