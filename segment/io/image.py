"""Read medical images so that the voxel grid (affine, shape, orientation, units) is never lost.

Every reader returns the voxels *and* a `Geometry` (in millimetres); writers (`segment.io.nifti`) take that `Geometry`
back. NIfTI is read with nibabel (units converted to mm, the header kept for the writer); NRRD/MHA/MHD files with
SimpleITK and DICOM series folders with the checked reader in `segment.io.dicom`, all converted to the same RAS+ affine
and (x, y, z) index order, so the rest of the code never sees ITK's LPS / (z, y, x) conventions.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np

from segment.errors import GeometryError, InputError
from segment.io.geometry import Geometry, check_affine, from_canonical, itk_affine, to_canonical
from segment.io.nifti import is_nifti as _is_nifti
from segment.io.nifti import nifti_geometry, write_image, write_label

__all__ = ["Geometry", "check_affine", "from_canonical", "read_channel_geometry", "read_channels", "read_geometry",
           "read_image", "read_label", "to_canonical", "write_image", "write_label"]

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _check_exists(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    return path


def _read_itk(path: Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Read any SimpleITK format (or a DICOM series folder) as ((x, y, z) array, RAS affine, on-disk dtype)."""
    import SimpleITK as sitk

    if path.is_dir():  # checked reader: refuses several series, gantry tilt, missing or mixed slices
        from segment.io.dicom import read_dicom_series

        return read_dicom_series(path, series)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"{path}: not a readable image ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() < 3:
        raise InputError(f"{path}: {image.GetDimension()}D image, expected a 3D volume")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) for 3D
    spatial = image.GetDimension()
    array = np.transpose(array, tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim)))
    return array, itk_affine(image), str(array.dtype)


_reading = threading.local()  # the file this thread is loading, for the notes nibabel logs about its header


class _NameTheFile(logging.Filter):
    """Prefix nibabel's header notes ("pixdim[1,2,3] should be non-zero; setting 0 dims to 1") with the file they are
    about: in a batch of hundreds of scans an anonymous note is no use. Thread-safe (the dataset check reads in threads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = getattr(_reading, "path", None)
        if path is not None:
            record.msg, record.args = f"{path}: header fixed on reading: {record.getMessage()}", None
        return True


_NIBABEL_LOG = logging.getLogger("nibabel.global")
if not any(isinstance(f, _NameTheFile) for f in _NIBABEL_LOG.filters):
    _NIBABEL_LOG.addFilter(_NameTheFile())


def _load_nifti(path: Path) -> nib.Nifti1Image:
    _reading.path = path
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt files  # noqa: BLE001
        raise _unreadable(path, err) from None
    finally:
        _reading.path = None


def _unreadable(path: Path, err: Exception) -> InputError:
    """One line for a NIfTI file nibabel cannot read: at its header (corrupt), its voxels (truncated), or not at all
    (no permission to read it: said as such, not as a corrupt file)."""
    if isinstance(err, PermissionError) or (Path(path).is_file() and not os.access(path, os.R_OK)):
        return InputError(f"{path}: cannot read this file (permission denied)")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return InputError(f"{path}: not a readable NIfTI image ({reason})")


def _read_raw(path: str | Path, series: str | None = None, channels: bool = False) -> tuple[np.ndarray, Geometry]:
    """Voxels as stored (scaling applied) plus geometry, checked for what every caller needs: 3D (or, with `channels`,
    3D + a trailing channel axis), scalar, finite, non-empty. The geometry is checked before any voxel is read."""
    path = _check_exists(path)
    if _is_nifti(path):
        img = _load_nifti(path)
        shape = _spatial_shape(tuple(img.shape), path, channels)
        geometry = nifti_geometry(img, shape, str(path))  # degenerate affines stop here, before the voxels are read
        try:
            array = np.asanyarray(img.dataobj)
        except Exception as err:  # a truncated file fails only here  # noqa: BLE001
            raise _unreadable(path, err) from None
    elif path.is_dir() or path.name.lower().endswith(ITK_SUFFIXES) or path.suffix.lower() in (".dcm", ".ima"):
        array, affine, dtype = _read_itk(path, series)
        geometry = Geometry.from_affine(affine, _spatial_shape(array.shape, path, channels), dtype, str(path))
    else:
        raise InputError(f"{path}: not an image file (expected .nii/.nii.gz, .nrrd, .mha/.mhd or a DICOM folder)")
    return _check_volume(array, path, channels), geometry


def _spatial_shape(shape: tuple[int, ...], path: Path, channels: bool) -> tuple[int, ...]:
    """The three spatial axes of `shape`; trailing size-1 axes are dropped, a 4th axis is allowed only as channels."""
    if 0 in shape:
        raise InputError(f"{path}: empty image (shape {shape})")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4 and channels:
        return shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: {len(shape)}D image of shape {shape}, expected a 3D volume"
                         + (" (a 4D file holds one volume per channel)" if len(shape) == 4 else ""))
    return shape


def _check_volume(array: np.ndarray, path: Path, channels: bool = False) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        kind = "RGB/vector" if array.dtype.names else {"c": "complex"}.get(array.dtype.kind, str(array.dtype))
        raise InputError(f"{path}: {kind} voxels ({array.dtype}); expected one scalar intensity per voxel")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 and not (channels and array.ndim == 4):
        raise InputError(f"{path}: {array.ndim}D image of shape {array.shape}, expected a 3D volume")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{path}: {int((~np.isfinite(array)).sum())} voxels are NaN or infinite")
    return array


def read_geometry(path: str | Path) -> Geometry:
    """Header-only geometry (fast): for pairing checks and planning without loading voxels. 3D only, so a 4D label
    map is refused; image files that may hold channels go through `read_channel_geometry`."""
    return _header_geometry(path, channels=False)[0]


def read_channel_geometry(path: str | Path) -> tuple[Geometry, int]:
    """Header-only grid of an image file and its channel count: 1 for a 3D volume, the length of the 4th axis for a 4D
    file (MSD multi-modal: one volume per channel)."""
    return _header_geometry(path, channels=True)


def _header_geometry(path: str | Path, channels: bool) -> tuple[Geometry, int]:
    """(geometry, channel count) from a NIfTI header alone; other formats are read once through the checked reader."""
    path = _check_exists(path)
    if not _is_nifti(path):
        array, geometry = _read_raw(path, channels=channels)
        return geometry, (array.shape[3] if array.ndim == 4 else 1)
    img = _load_nifti(path)
    spatial = _spatial_shape(tuple(img.shape), path, channels)  # at most one non-trivial axis after the three
    return nifti_geometry(img, spatial, str(path)), int(np.prod(img.shape[3:], dtype=np.int64))


def read_image(path: str | Path, *, series: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Intensity volume as float32 (whatever the on-disk dtype) with its geometry; `series` picks a DICOM series."""
    array, geometry = _read_raw(path, series)
    return _as_float32(array, path), geometry


def read_channels(path: str | Path, *, series: str | None = None) -> tuple[list[np.ndarray], Geometry]:
    """Intensity channels of one file: a 3D volume is one channel, a 4D file (MSD multi-modal) one per last-axis volume."""
    array, geometry = _read_raw(path, series, channels=True)
    out = _as_float32(array, path)
    return ([out] if out.ndim == 3 else [np.ascontiguousarray(out[..., c]) for c in range(out.shape[-1])]), geometry


def _as_float32(array: np.ndarray, path: str | Path) -> np.ndarray:
    out = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{path}: intensities overflow float32")
    return out


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


