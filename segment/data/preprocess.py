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

from segment.data.labels import encode_labels
from segment.data.plan import Plan
from segment.errors import GeometryError
from segment.io.case import read_case
from segment.io.geometry import Geometry, canonical_grid, from_canonical, resampled_shape, to_canonical


def _resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Resize a (C, *spatial) tensor; a no-op when the size already matches (the common 'same spacing' case)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    kwargs = {"align_corners": False} if mode in ("trilinear", "bilinear") else {}
    return F.interpolate(x[None].float(), size=tuple(size), mode=mode, **kwargs)[0]


def _linear_mode(ndim: int) -> str:
    return "trilinear" if ndim == 3 else "bilinear"


def normalise(image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per-channel intensity normalisation by each channel's modality (`plan.channel_modalities`; None = every channel
    is `plan.modality`): CT channels are clipped to `plan.ct_clip` and z-scored with the dataset's foreground mean and
    std, every other channel (MRI, PET, ...) is z-scored over its own volume."""
    from segment.errors import InputError

    kinds = plan.channel_modalities or [plan.modality] * int(image.shape[0])
    if len(kinds) != image.shape[0]:
        raise InputError(f"image has {image.shape[0]} channel(s), but the plan normalises {len(kinds)} "
                         f"({', '.join(kinds)})")
    out = []
    for c, kind in enumerate(kinds):
        channel = image[c:c + 1]
        if kind == "ct":
            lo, hi = plan.ct_clip
            done = NormalizeIntensity(subtrahend=plan.ct_mean, divisor=plan.ct_std)(channel.clamp(lo, hi))
        else:
            done = NormalizeIntensity(channel_wise=True)(channel)
        out.append(torch.as_tensor(done.as_tensor() if hasattr(done, "as_tensor") else done))
    return out[0] if len(out) == 1 else torch.cat(out)


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
        item["label"] = prepare_label(encode_labels(case.label, plan, label), case.geometry, plan)
    return item
