"""Read a DICOM series folder only when its slices form one regular 3D grid; otherwise refuse in one clear line.

Why a separate reader: a folder exported from a scanner or PACS often holds several series, a gantry-tilted (sheared)
CT stack, a series with a missing slice, or slices of mixed orientation or size. SimpleITK reads most of these without
complaint and returns a volume whose geometry is silently wrong (or picks one of the series for you). Here the headers
are checked with pydicom first; only a regular grid is handed to SimpleITK, whose result is then cross-checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segment.errors import GeometryError, InputError
from segment.io.geometry import itk_affine

_ORIENTATION_TOL = 1e-4  # direction cosines: about 0.006 degrees
_TOL_MM = 0.01  # a slice may sit off the regular grid by max(0.01 mm, 1% of the spacing concerned)
_TOL_REL = 0.01


@dataclass(frozen=True)
class SeriesInfo:
    """One image series in a folder: what the user sees when they must choose, and the files that make it up."""

    uid: str
    description: str
    modality: str
    n_slices: int
    files: list[Path]

    def label(self, index: int) -> str:
        """One-line entry for an error message; `index` is the 1-based number that `series=` accepts."""
        return f'[{index}] {self.uid} "{self.description}" {self.modality} {self.n_slices} slices'


_Found = list[tuple[SeriesInfo, list[Any]]]  # each series with its slices' pydicom headers


def _one_line(value: Any) -> str:
    return " ".join(str(value if value is not None else "").split())


def _scan(folder: Path) -> _Found:
    """Headers of every image file in `folder` (not sub-folders, like GDCM), grouped by series, in a stable order."""
    import pydicom

    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:  # force: files without the 128-byte preamble are still DICOM; anything else lacks the tags below
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            uid = str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds and "Rows" in ds else None
        except Exception:  # not DICOM at all (notes, DICOMDIR quirks, hidden files): GDCM skips these too
            continue
        if uid:
            groups.setdefault(uid, []).append((path, ds))

    def number(members: list[tuple[Path, Any]]) -> int:
        try:
            return int(members[0][1].get("SeriesNumber"))
        except (TypeError, ValueError):  # absent or malformed: list such series last
            return 1 << 30

    out = []
    for uid, members in sorted(groups.items(), key=lambda kv: (number(kv[1]), kv[0])):
        first = members[0][1]
        info = SeriesInfo(uid, _one_line(first.get("SeriesDescription")) or "no description",
                          _one_line(first.get("Modality")) or "?", len(members), [p for p, _ in members])
        out.append((info, [ds for _, ds in members]))
    return out


def list_series(folder: Path) -> list[SeriesInfo]:
    """Every image series in `folder`, numbered (1-based) in this order by `series=` and in error messages."""
    return [info for info, _ in _scan(Path(folder))]


def _select(folder: Path, found: _Found, series: str | None) -> tuple[SeriesInfo, list[Any]]:
    """The one series the user asked for: never a silent choice among several."""
    if not found:
        hint = "; it has sub-folders: point at the one holding the slices" if any(
            p.is_dir() for p in folder.iterdir()) else ""
        raise InputError(f"{folder}: folder holds no DICOM series (expected a .nii.gz file or a DICOM folder){hint}")
    choices = "; ".join(info.label(i) for i, (info, _) in enumerate(found, 1))
    if series is None:
        if len(found) == 1:
            return found[0]
        raise InputError(f"{folder}: {len(found)} DICOM series found; pick one with --series (its number, its "
                         f"SeriesInstanceUID or a unique start or end of it): {choices}")
    key = str(series).strip()
    exact = [entry for entry in found if entry[0].uid == key]
    if exact:
        return exact[0]
    if key.isdigit() and 1 <= int(key) <= len(found):
        return found[int(key) - 1]
    matches = [i for i, (info, _) in enumerate(found) if key and (info.uid.startswith(key) or info.uid.endswith(key))]
    if len(matches) == 1:
        return found[matches[0]]
    if matches:
        raise InputError(f"{folder}: series {key!r} matches {len(matches)} DICOM series, give more of the UID: "
                         + "; ".join(found[i][0].label(i + 1) for i in matches))
    raise InputError(f"{folder}: no DICOM series matches series={key!r}; choose one of: {choices}")


def _floats(ds: Any, keyword: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise InputError(f"{where}: {keyword} is missing or invalid ({_one_line(value)!r}); cannot place the slice")
    return array


def _check_uniform(where: str, files: list[Path], headers: list[Any]) -> np.ndarray:
    """Refuse mixed orientations, sizes or pixel spacings: one series must be one grid. Returns the orientation."""
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in headers):
        raise InputError(f"{where}: multi-frame DICOM is not supported; convert it with dcm2niix or dicom2nifti")
    if len(headers) < 2:
        raise InputError(f"{where}: only {len(headers)} slice, expected a 3D volume of several slices")
    iop = [_floats(ds, "ImageOrientationPatient", 6, f"{where} {f.name}") for f, ds in zip(files, headers, strict=True)]
    size = [(int(ds.Rows), int(ds.get("Columns") or 0)) for ds in headers]
    pixel = [_floats(ds, "PixelSpacing", 2, f"{where} {f.name}") for f, ds in zip(files, headers, strict=True)]
    for k in range(1, len(headers)):
        a, b = files[0].name, files[k].name
        if not np.allclose(iop[k], iop[0], atol=_ORIENTATION_TOL, rtol=0):
            raise InputError(f"{where} mixes slice orientations (ImageOrientationPatient {_vec(iop[0])} in {a} vs "
                             f"{_vec(iop[k])} in {b}); re-export one orientation per series")
        if size[k] != size[0]:
            raise InputError(f"{where} mixes slice sizes (Rows x Columns {size[0][0]}x{size[0][1]} in {a} vs "
                             f"{size[k][0]}x{size[k][1]} in {b}); re-export one size per series")
        if not np.allclose(pixel[k], pixel[0], atol=1e-4, rtol=1e-4):
            raise InputError(f"{where} mixes pixel spacings ({_vec(pixel[0])} mm in {a} vs {_vec(pixel[k])} mm "
                             f"in {b}); re-export one spacing per series")
    return iop[0]


def _vec(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _slice_grid(where: str, files: list[Path], headers: list[Any], iop: np.ndarray) -> tuple[list[Path], float]:
    """Sort slices along the normal; refuse repeats, gantry tilt and uneven spacing. Returns (sorted files, spacing)."""
    normal = np.cross(iop[:3], iop[3:])
    pos = np.stack([_floats(ds, "ImagePositionPatient", 3, f"{where} {f.name}")
                    for f, ds in zip(files, headers, strict=True)])
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    pos, depth, files = pos[order], depth[order], [files[i] for i in order]
    gaps = np.diff(depth)
    spacing = float(np.median(gaps))
    tol = max(_TOL_MM, _TOL_REL * spacing)
    if gaps.min() < tol:
        i = int(np.argmin(gaps))
        raise InputError(f"{where}: {files[i].name} and {files[i + 1].name} lie at the same slice position "
                         f"({depth[i]:.4g} mm along the slice normal); the series holds several volumes (echoes, "
                         "phases or repeats): split it")
    lateral = np.linalg.norm((pos - pos[0]) - np.outer(depth - depth[0], normal), axis=1)
    pixel = float(min(_floats(headers[0], "PixelSpacing", 2, where)))
    if lateral.max() > max(_TOL_MM, _TOL_REL * pixel):
        tilt = float(np.degrees(np.max(np.arctan2(lateral[1:], depth[1:] - depth[0]))))
        raise GeometryError(f"{where} has gantry tilt of {tilt:.3g} degrees (slice positions are not along the slice "
                            "normal) and cannot be read without shearing: resample it with dicom2nifti or re-export "
                            "it untilted")
    bad = np.flatnonzero(np.abs(gaps - spacing) > tol)
    if bad.size:
        i = int(bad[0])
        more = f" and {bad.size - 1} more uneven gap(s)" if bad.size > 1 else ""
        raise GeometryError(f"{where}: uneven slice spacing (missing slice?): expected {spacing:.4g} mm, found "
                            f"{gaps[i]:.4g} mm between {files[i].name} and {files[i + 1].name} (slices {i + 1} and "
                            f"{i + 2} of {len(files)} along the normal, at {depth[i]:.4g} and {depth[i + 1]:.4g} mm)"
                            f"{more}")
    return files, spacing


def _read_checked(where: str, folder: Path, uid: str, files: list[Path], spacing: float) -> Any:
    """Read with SimpleITK in GDCM's order, which must be ours: a disagreement means headers we did not understand."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    gdcm = [Path(f).name for f in reader.GetGDCMSeriesFileNames(str(folder), uid)]
    if gdcm != [f.name for f in files]:
        raise InputError(f"{where}: GDCM orders or groups the {len(files)} slices differently from their positions "
                         f"({len(gdcm)} files from GDCM); the headers are inconsistent, re-export the series")
    reader.SetFileNames([str(folder / name) for name in gdcm])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{where}: not a readable DICOM series ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetSize()[2] != len(files) or not np.isclose(
            image.GetSpacing()[2], spacing, atol=max(_TOL_MM, _TOL_REL * spacing), rtol=0):
        raise GeometryError(f"{where}: SimpleITK read size {image.GetSize()} and spacing {_vec(image.GetSpacing())}, "
                            f"expected {len(files)} slices {spacing:.4g} mm apart; refusing an inconsistent grid")
    return image


def read_dicom_series(folder: Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """One regular DICOM series as ((x, y, z) array, 4x4 RAS+ affine, on-disk dtype name); refuses anything else.

    `series` picks one series when the folder holds several: a 1-based number as listed in the error message, a full
    SeriesInstanceUID, or a unique start or end of one. Rescale slope/intercept are applied (by SimpleITK).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a DICOM series folder)")
    info, headers = _select(folder, _scan(folder), series)
    where = f"{folder}: series {info.uid}"
    iop = _check_uniform(where, info.files, headers)
    files, spacing = _slice_grid(where, info.files, headers, iop)
    image = _read_checked(where, folder, info.uid, files, spacing)
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
    array = np.transpose(array, (2, 1, 0, *range(3, array.ndim)))
    return array, itk_affine(image), str(array.dtype)
