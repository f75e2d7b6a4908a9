"""Read and write medical images so that the voxel grid (affine, shape, orientation) is never lost.

Every reader returns the voxels *and* a `Geometry`; every writer takes that `Geometry` back and checks what it wrote.
NIfTI is read with nibabel; NRRD/MHA/MHD files and DICOM series folders are read with SimpleITK and converted to the
same RAS+ affine and (x, y, z) index order, so the rest of the code never sees ITK's LPS / (z, y, x) conventions.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from segment.errors import GeometryError, InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a voxel grid sits in the world: travels from the reader to the writer so outputs land where inputs were."""

    affine: np.ndarray
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: tuple[str, ...]
    dtype: str
    source: str

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(f"{self.source}: affine must be a finite 4x4 matrix, got {affine.shape}")
        affine.setflags(write=False)  # a shared geometry must not be edited in place
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "orientation", tuple(str(c) for c in self.orientation))
        object.__setattr__(self, "dtype", str(self.dtype))
        object.__setattr__(self, "source", str(self.source))

    @classmethod
    def from_affine(
        cls, affine: np.ndarray, shape: tuple[int, ...], dtype: str = "float32", source: str = ""
    ) -> Geometry:
        """Build a geometry whose spacing and orientation are derived from the affine (they cannot disagree)."""
        affine = np.asarray(affine, dtype=np.float64)
        spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        return cls(affine, tuple(shape), spacing, tuple(nib.aff2axcodes(affine)), dtype, source)

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
            parts.append(f"affine differs by up to {dev:.4g} (spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}, "
                         f"orientation {''.join(self.orientation)} vs {''.join(other.orientation)}, "
                         f"origin {_fmt(self.affine[:3, 3])} vs {_fmt(other.affine[:3, 3])})")
        return "; ".join(parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (np.array_equal(self.affine, other.affine) and self.shape == other.shape and self.dtype == other.dtype
                and self.spacing == other.spacing and self.orientation == other.orientation)

    __hash__ = None  # type: ignore[assignment]  # holds an array; equality is by value


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _check_exists(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    return path


def _itk_affine(image: Any) -> np.ndarray:
    """ITK (LPS, origin/spacing/direction) -> nibabel RAS+ affine for (x, y, z) voxel indices."""
    dim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64)[:3])
    affine[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)[:3]
    return affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Read any SimpleITK format (or a DICOM series folder) as ((x, y, z) array, RAS affine, on-disk dtype)."""
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{path}: folder holds no DICOM series (expected a .nii.gz file or a DICOM folder)")
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            if len(series) > 1:
                warnings.warn(f"{path}: {len(series)} DICOM series found, reading the largest ({len(files)} files)")
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"{path}: not a readable image ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() < 3:
        raise InputError(f"{path}: {image.GetDimension()}D image, expected a 3D volume")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) for 3D
    spatial = image.GetDimension()
    array = np.transpose(array, tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim)))
    return array, _itk_affine(image), str(array.dtype)


def _read_raw(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Voxels as stored (scaling applied) plus geometry, checked for what every caller needs: 3D, finite, non-empty."""
    path = _check_exists(path)
    if _is_nifti(path):
        try:
            img = nib.load(str(path))
            array = np.asanyarray(img.dataobj)
        except Exception as err:  # nibabel raises many types for corrupt files
            raise InputError(f"{path}: not a readable NIfTI image ({err})") from None
        affine, dtype = img.affine, img.get_data_dtype().name
    elif path.is_dir() or path.name.lower().endswith(ITK_SUFFIXES) or path.suffix.lower() in (".dcm", ".ima"):
        array, affine, dtype = _read_itk(path)
    else:
        raise InputError(f"{path}: not an image file (expected .nii/.nii.gz, .nrrd, .mha/.mhd or a DICOM folder)")
    array = _check_volume(array, path)
    return array, Geometry.from_affine(affine, array.shape, dtype, str(path))


def _check_volume(array: np.ndarray, path: Path) -> np.ndarray:
    if array.size == 0:
        raise InputError(f"{path}: empty image (shape {array.shape})")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{path}: {array.ndim}D image of shape {array.shape}, expected a 3D volume")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{path}: {int((~np.isfinite(array)).sum())} voxels are NaN or infinite")
    return array


def read_geometry(path: str | Path) -> Geometry:
    """Header-only geometry (fast): for pairing checks and planning without loading voxels."""
    path = _check_exists(path)
    if not _is_nifti(path):
        return _read_raw(path)[1]
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise InputError(f"{path}: not a readable NIfTI image ({err})") from None
    shape = tuple(img.shape)
    if 0 in shape:
        raise InputError(f"{path}: empty image (shape {shape})")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{path}: {len(shape)}D image of shape {img.shape}, expected a 3D volume")
    return Geometry.from_affine(img.affine, shape, img.get_data_dtype().name, str(path))


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Intensity volume as float32 (whatever the on-disk dtype) with its geometry."""
    array, geometry = _read_raw(path)
    out = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{path}: intensities overflow float32")
    return out, geometry


def read_label(path: str | Path, reference: Geometry | None = None) -> np.ndarray:
    """Integer label map; refuses non-integer or negative values and, given `reference`, a grid that differs from it."""
    array, geometry = _read_raw(path)
    if reference is not None and not geometry.same_grid(reference):
        raise GeometryError(f"label {path} does not share the voxel grid of image {reference.source}: "
                            f"{geometry.difference(reference)}")
    if array.dtype.kind not in "iub":
        rounded = np.round(array)
        if not np.all(np.abs(array - rounded) < 1e-3):
            bad = array[np.abs(array - rounded) >= 1e-3].flat[0]
            raise InputError(f"{path}: label map holds non-integer values (e.g. {bad:g}); "
                             "expected class indices 0, 1, 2...")
        array = rounded
    if array.min() < 0:
        raise InputError(f"{path}: label map holds negative values (min {array.min():g}); expected class indices >= 0")
    return array.astype(np.int16 if array.max() < 2**15 else np.int32)


def _target(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if not _is_nifti(path):
        raise InputError(f"{path}: outputs are written as NIfTI; use a .nii.gz (or .nii) file name")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: file exists; pass overwrite=True (--overwrite) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{path.parent}: cannot create output folder ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path.parent}: output folder is not writable")
    return path


def _write(data: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write atomically (temp file + rename), then re-read the header: a wrong grid must never reach the user."""
    img = nib.Nifti1Image(data, geometry.affine)
    img.set_sform(geometry.affine, code=1)
    img.set_qform(geometry.affine, code=1)
    img.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        written = nib.load(tmp)
        if tuple(written.shape) != data.shape or not np.allclose(written.affine, geometry.affine, rtol=1e-6, atol=1e-4):
            raise GeometryError(f"{path}: written header does not match {geometry.source} "
                                f"(shape {written.shape} vs {data.shape}); nothing was written")
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_label(labels: np.ndarray, geometry: Geometry, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a label map on `geometry`'s grid as uint8 (uint16 when more than 255 classes)."""
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise GeometryError(f"{path}: labels of shape {labels.shape} do not match the grid {geometry.shape} "
                            f"of {geometry.source}; map them back to the source grid first")
    if labels.dtype.kind not in "iub" and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{path}: labels must be integer class indices, got non-integer {labels.dtype} values")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high >= 2**16:
        raise InputError(f"{path}: label values must lie in 0..65535, got {low}..{high}")
    return _write(labels.astype(np.uint8 if high < 256 else np.uint16), geometry, _target(path, overwrite))


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a float32 map (e.g. probabilities); a trailing channel axis (X, Y, Z, C) gives a 4D NIfTI."""
    array = np.asarray(array)
    if array.shape[:3] != geometry.shape or array.ndim not in (3, 4):
        raise GeometryError(f"{path}: array of shape {array.shape} does not match the grid {geometry.shape} "
                            f"of {geometry.source} (expected X,Y,Z or X,Y,Z,C)")
    return _write(array.astype(np.float32), geometry, _target(path, overwrite))


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
