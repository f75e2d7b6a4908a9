"""NIfTI headers the way hospitals write them, and label maps written back with exactly the scan's header.

Reading: nibabel's affine is in the file's own spatial unit; a header saying metres (pixdim 0.001 = 1 mm) or microns
is converted here, so everything downstream works in millimetres. Writing: a label map gets a copy of the scan's own
header — qform and sform matrices *and* codes, `xyzt_units`, pixdim — so it overlays the scan in every viewer (nibabel
reads the sform first, ITK/Slicer/ITK-SNAP the qform); only data type, scaling, intent and description change. The
description marks the file as ours, so `--overwrite` can tell our earlier outputs from files it must never replace.
Writes go to a temporary file in the target folder, are read back and checked, then renamed over the target.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from segment.errors import GeometryError, InputError
from segment.io.files import check_output, replaced_atomically
from segment.io.geometry import Geometry

NIFTI_SUFFIXES = (".nii.gz", ".nii")
UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}
NIFTI1_MAX_AXIS = 32767  # dim[] is int16 in NIfTI-1
MARK = "segment:"  # start of the header description of every file segment writes
LABEL_INTENT = "label"  # NIFTI_INTENT_LABEL (1002)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def spatial_scale(header: nib.Nifti1Header) -> float:
    """Millimetres per file unit from `xyzt_units` (no unit, as most files, means mm)."""
    unit = header.get_xyzt_units()[0] or "unknown"
    return UNIT_TO_MM.get(str(unit), 1.0)


def nifti_geometry(img: nib.Nifti1Image, shape: tuple[int, ...], source: str) -> Geometry:
    """The geometry of a loaded NIfTI image in millimetres, carrying a copy of its header for the writer."""
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, :] *= spatial_scale(img.header)
    return Geometry.from_affine(affine, shape, img.get_data_dtype().name, source, header=img.header.copy())


def is_our_output(path: Path) -> bool:
    """True when `path` is a NIfTI file whose header description says segment wrote it."""
    if not path.is_file() or not is_nifti(path):
        return False
    try:
        descrip = nib.load(str(path)).header["descrip"]
    except Exception:  # an unreadable file is certainly not one we wrote  # noqa: BLE001
        return False
    return bytes(np.asarray(descrip).tobytes()).split(b"\0")[0].decode("ascii", "replace").startswith(MARK)


def _header_for(data: np.ndarray, geometry: Geometry, what: str) -> tuple[type, nib.Nifti1Header]:
    """(image class, header): the source's header when it has one (NIfTI-2 where NIfTI-1 cannot hold the shape)."""
    needs_v2 = max(data.shape) > NIFTI1_MAX_AXIS
    src = geometry.header
    if src is None:  # no NIfTI source (NRRD, DICOM, in memory): a fresh header in mm, scanner coordinates
        hdr = (nib.Nifti2Header if needs_v2 else nib.Nifti1Header)()
        hdr.set_qform(geometry.affine, code=1)
        hdr.set_sform(geometry.affine, code=1)
        hdr.set_xyzt_units("mm")
    else:
        hdr = nib.Nifti2Header.from_header(src) if needs_v2 and not isinstance(src, nib.Nifti2Header) else src.copy()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"], hdr["cal_max"] = 0, 0
    if what == "label map":
        hdr.set_intent(LABEL_INTENT)
    else:
        hdr.set_intent("none")
    hdr["descrip"] = f"{MARK} {what}".encode()[:79]
    klass = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    return klass, hdr


def with_source_axes(data: np.ndarray, geometry: Geometry) -> np.ndarray:
    """`data` in exactly the shape of the source file: a 3D array on a scan stored as (X, Y, Z, 1) or (X, Y, Z, 1, 1)
    gets those trailing size-1 axes back (readers drop them), so the output has the scan's shape and its header's dim
    and pixdim stay the scan's own. A multi-channel scan (X, Y, Z, C) with C > 1 keeps a 3D output: a label map has no
    channel axis. Arrays that are not 3D (probabilities X, Y, Z, K) and sources without a NIfTI header are unchanged."""
    data = np.asarray(data)
    if geometry.header is None or data.ndim != 3:
        return data
    source = tuple(int(s) for s in geometry.header.get_data_shape())
    if len(source) > 3 and source[:3] == data.shape and all(s == 1 for s in source[3:]):
        return data.reshape(source)
    return data


def to_nifti_image(data: np.ndarray, geometry: Geometry, what: str = "label map") -> nib.Nifti1Image:
    """An in-memory NIfTI image of `data` on `geometry`'s grid, with the source's own header (see `_header_for`) and
    the source's own shape (see `with_source_axes`)."""
    data = with_source_axes(data, geometry)
    klass, hdr = _header_for(data, geometry, what)
    return klass(data, hdr.get_best_affine(), header=hdr)  # nibabel keeps every qform/sform field of `hdr` as it is


def _tolerance(affine: np.ndarray) -> float:
    """What a float32 header field can hold: ~4 ulp of the largest entry (2048.0004 mm is stored as 2048.0005)."""
    return max(1e-4, 4 * float(np.spacing(np.float32(np.abs(affine).max()))))


def check_target(path: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output before any compute: an input, a file we did not write, an existing file, an unwritable folder."""
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: outputs are written as NIfTI; use a .nii.gz (or .nii) file name")
    return check_output(path, overwrite, inputs, is_our_output)


def write_nifti(data: np.ndarray, geometry: Geometry, path: Path, *, what: str, overwrite: bool = False,
                inputs: tuple[Path, ...] = ()) -> Path:
    """Write atomically (temp file, read back, check shape and grid, rename); a failed check leaves the target as it was."""
    path = check_target(path, overwrite, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{path.parent}: cannot create output folder ({err.strerror})") from None
    data = with_source_axes(data, geometry)  # (X, Y, Z, 1) in, (X, Y, Z, 1) out
    img = to_nifti_image(data, geometry, what)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    try:
        with replaced_atomically(path, suffix) as tmp:
            nib.save(img, tmp)
            written = nib.load(tmp)
            grid = nifti_geometry(written, tuple(written.shape[:3]), str(path))
            tol = _tolerance(geometry.affine)
            if tuple(written.shape) != data.shape or not grid.same_grid(geometry, atol=tol):
                raise GeometryError(f"{path}: written header does not match {geometry.source} "
                                    f"({grid.difference(geometry, atol=tol) or 'shape ' + str(written.shape)}); "
                                    "nothing was written")
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from None
    return path


def write_label(labels: np.ndarray, geometry: Geometry, path: str | Path, *, overwrite: bool = False,
                inputs: tuple[Path, ...] = ()) -> Path:
    """Write a label map on `geometry`'s grid as uint8 (uint16 when more than 255 classes), with the scan's header."""
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise GeometryError(f"{path}: labels of shape {labels.shape} do not match the grid {geometry.shape} "
                            f"of {geometry.source}; map them back to the source grid first")
    if labels.dtype.kind not in "iub" and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{path}: labels must be integer class indices, got non-integer {labels.dtype} values")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high >= 2**16:
        raise InputError(f"{path}: label values must lie in 0..65535, got {low}..{high}")
    data = labels.astype(np.uint8 if high < 256 else np.uint16)
    return write_nifti(data, geometry, Path(path), what="label map", overwrite=overwrite, inputs=inputs)


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, *, overwrite: bool = False,
                inputs: tuple[Path, ...] = ()) -> Path:
    """Write a map (e.g. probabilities; a trailing channel axis (X, Y, Z, C) gives a 4D NIfTI) with the scan's header.

    uint8 arrays are written as they are (probabilities scaled 0..255: p = value / 255); anything else as float32.
    """
    array = np.asarray(array)
    if array.shape[:3] != geometry.shape or array.ndim not in (3, 4):
        raise GeometryError(f"{path}: array of shape {array.shape} does not match the grid {geometry.shape} "
                            f"of {geometry.source} (expected X,Y,Z or X,Y,Z,C)")
    data = array if array.dtype == np.uint8 else array.astype(np.float32)
    what = "probabilities x255" if data.dtype == np.uint8 else "map"
    return write_nifti(data, geometry, Path(path), what=what, overwrite=overwrite, inputs=inputs)
