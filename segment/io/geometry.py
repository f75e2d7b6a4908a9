"""Where a voxel grid sits in the world, the guards every grid passes, and exact (permute/flip) reorientation.

A `Geometry` travels from the reader to the writer so outputs land where inputs were. Every reader builds it through
`Geometry.from_affine`, so the degenerate-affine checks (NaN/inf, a zero column, a singular matrix) run once, for
training, prediction and evaluation alike, before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from segment.errors import GeometryError, InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK/DICOM patient axes -> nibabel RAS+
MIN_VOXEL_MM = 1e-6  # a column shorter than this (or |det| below its cube) is a degenerate grid, not a tiny voxel


def check_affine(affine: np.ndarray, source: str) -> np.ndarray:
    """The affine as float64, or a one-line GeometryError naming `source`: not 4x4, NaN/inf, zero column, singular."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise GeometryError(f"{source}: affine must be a 4x4 matrix, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise GeometryError(f"{source}: degenerate geometry: the affine holds NaN or infinite values")
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(norms < MIN_VOXEL_MM):
        axis = int(np.argmin(norms))
        raise GeometryError(f"{source}: degenerate geometry: affine column {axis} is zero (voxel size 0 along axis "
                            f"{axis}); the header does not say where voxels are")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(norms)):
        raise GeometryError(f"{source}: degenerate geometry: the affine is singular (its axes are parallel), so voxels "
                            "do not map to distinct points")
    return affine


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a voxel grid sits in the world: travels from the reader to the writer so outputs land where inputs were."""

    affine: np.ndarray
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: tuple[str, ...]
    dtype: str
    source: str
    # the source file's own NIfTI header (qform, sform, codes, units) so a label map can be written with exactly it;
    # None for other formats and for derived grids. Not part of equality or of to_dict.
    header: Any = None

    def __post_init__(self) -> None:
        affine = np.array(check_affine(self.affine, str(self.source)))
        affine.setflags(write=False)  # a shared geometry must not be edited in place
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "orientation", tuple(str(c) for c in self.orientation))
        object.__setattr__(self, "dtype", str(self.dtype))
        object.__setattr__(self, "source", str(self.source))

    @classmethod
    def from_affine(
        cls, affine: np.ndarray, shape: tuple[int, ...], dtype: str = "float32", source: str = "", header: Any = None,
    ) -> Geometry:
        """Build a geometry whose spacing and orientation are derived from the affine (they cannot disagree)."""
        affine = check_affine(affine, source)
        spacing = tuple(float(s) for s in voxel_sizes(affine))
        return cls(affine, tuple(shape), spacing, tuple(nib.aff2axcodes(affine)), dtype, source, header)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel: |det| of the 3x3 part, right for oblique and sheared grids too."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, e.g. for a checkpoint or a sidecar file."""
        return {
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "orientation": list(self.orientation),
            "dtype": self.dtype,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        missing = [k for k in ("affine", "shape", "spacing", "orientation", "dtype", "source") if k not in d]
        if missing:
            raise InputError(f"geometry record is missing {missing}; expected the keys written by Geometry.to_dict")
        return cls(np.array(d["affine"]), tuple(d["shape"]), tuple(d["spacing"]), tuple(d["orientation"]),
                   d["dtype"], d["source"])

    def same_grid(self, other: Geometry, atol: float = 1e-3) -> bool:
        """True when voxel (i, j, k) of both grids is the same point in the world."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol, rtol=0))

    def difference(self, other: Geometry, atol: float = 1e-3) -> str:
        """What differs between two grids, in words for an error message ('' when they match)."""
        parts = []
        if self.shape != other.shape:
            parts.append(f"shape {self.shape} vs {other.shape}")
        if not np.allclose(self.affine, other.affine, atol=atol, rtol=0):
            dev = float(np.abs(self.affine - other.affine).max())
            parts.append(f"affine differs by up to {dev:.4g} "
                         f"(spacing {fmt_values(self.spacing)} vs {fmt_values(other.spacing)}, "
                         f"orientation {''.join(self.orientation)} vs {''.join(other.orientation)}, "
                         f"origin {fmt_values(self.affine[:3, 3])} vs {fmt_values(other.affine[:3, 3])})")
        return "; ".join(parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (np.array_equal(self.affine, other.affine) and self.shape == other.shape and self.dtype == other.dtype
                and self.spacing == other.spacing and self.orientation == other.orientation)

    __hash__ = None  # type: ignore[assignment]  # holds an array; equality is by value


def require_volume(geometry: Geometry) -> None:
    """One line naming the file unless `geometry` is a 3D volume: a single slice cannot go through the 3D network, in
    training (the pre-training check) as in prediction."""
    if len(geometry.shape) != 3 or min(geometry.shape) < 2:
        raise InputError(f"{geometry.source}: image of shape {tuple(geometry.shape)} is 2D (a single slice); "
                         "the model is 3D and needs a volume")


def fmt_values(values: Any) -> str:
    """Numbers as "(a, b, c)", 4 significant digits: spacings, origins and affines in messages."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _orientation(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    n = len(geometry.shape)
    if array.ndim < n:
        raise GeometryError(f"array of shape {array.shape} has fewer axes than the grid {geometry.shape} "
                            f"of {geometry.source}")
    return io_orientation(geometry.affine)


def _apply_spatial(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """apply_orientation on the LAST len(ornt) axes, keeping leading (channel) axes in place."""
    n, lead = len(ornt), array.ndim - len(ornt)
    moved = np.moveaxis(array, list(range(lead, array.ndim)), list(range(n)))
    out = apply_orientation(moved, ornt)
    return np.ascontiguousarray(np.moveaxis(out, list(range(n)), list(range(lead, array.ndim))))


def to_canonical(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """Exact reorientation to the closest RAS axes (permute + flip, no interpolation); leading axes are kept."""
    ornt = _orientation(array, geometry)
    if tuple(array.shape[-len(geometry.shape):]) != geometry.shape:
        raise GeometryError(f"array of shape {array.shape} does not end with the grid {geometry.shape} "
                            f"of {geometry.source}")
    out = _apply_spatial(array, ornt)
    affine = geometry.affine @ inv_ornt_aff(ornt, geometry.shape)
    canonical = Geometry.from_affine(affine, out.shape[-len(geometry.shape):], geometry.dtype, geometry.source)
    return out, canonical


def from_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Exact inverse of `to_canonical`: canonical-grid array -> `geometry`'s own grid (leading axes kept)."""
    ornt = _orientation(array, geometry)
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
    expected = tuple(geometry.shape[int(axis)] for axis, _ in inverse)
    if tuple(array.shape[-len(geometry.shape):]) != expected:
        raise GeometryError(f"array of shape {array.shape} is not on the canonical grid {expected} "
                            f"of {geometry.source}")
    return _apply_spatial(array, inverse)


def canonical_grid(geometry: Geometry) -> Geometry:
    """The Geometry of `geometry`'s voxels after exact reorientation to RAS (no voxels are touched, none allocated)."""
    ornt = io_orientation(geometry.affine)
    shape = [0] * len(geometry.shape)
    for axis, (target, _) in enumerate(ornt):
        shape[int(target)] = geometry.shape[axis]
    affine = geometry.affine @ inv_ornt_aff(ornt, geometry.shape)
    return Geometry.from_affine(affine, tuple(shape), geometry.dtype, geometry.source)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Voxel count along each axis after resampling from `spacing` to `target` (mm), at least 1.

    Halves round up, after rounding away float32 header noise: 101 voxels of 3 mm at 6 mm is 50.5 -> 51, whether
    the header says 3.0 mm or 0.003 m (= 3.00000003 mm). Python's round() would give 50 for one and 51 for the other.
    """
    return tuple(max(1, int(np.floor(round(n * s / t, 4) + 0.5))) for n, s, t in zip(shape, spacing, target))


def itk_affine(image: Any) -> np.ndarray:
    """ITK (LPS, origin/spacing/direction) -> nibabel RAS+ affine for (x, y, z) voxel indices."""
    dim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64)[:3])
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)[:3]
    return affine
