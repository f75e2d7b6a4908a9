"""DICOM series folders: a regular grid reads with the right voxels and world geometry; anything else is one clear line.

Every series is written here with pydicom (CT image storage, int16, explicit little endian), with file names that do
not follow slice order, so that only the slice positions can put the frames in the right place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from segment.errors import GeometryError, InputError, SegmentError
from segment.io.dicom import list_series, read_dicom_series
from segment.io.image import read_image

SHAPE = (10, 8, 5)  # (x, y, z): 5 slices of Rows=8 x Columns=10
SPACING = (0.7, 0.9, 2.5)  # column spacing, row spacing, slice spacing (mm)
ORIGIN = np.array([-40.5, 12.25, 73.0])  # LPS position of the first slice's first pixel
SLOPE, INTERCEPT = 2.0, -1024.0
UID_A, UID_B = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
Tweak = Callable[[int, dict[str, Any]], None]


def oblique(deg: float) -> np.ndarray:
    """Rotation about an axis that is no coordinate axis: every direction cosine is non-trivial."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def volume(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)


def _ds(values: Any) -> list[str]:
    """Decimal strings within DICOM's 16 characters."""
    return [f"{float(v):.10g}" for v in values]


def write_slice(path: Path, pixels: np.ndarray, tags: dict[str, Any]) -> None:
    """One CT image storage file; works with pydicom 2.4 and 3.x."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def write_series(folder: Path, data: np.ndarray, *, uid: str = UID_A, direction: np.ndarray | None = None,
                 origin: np.ndarray = ORIGIN, spacing: tuple[float, ...] = SPACING, slope: float = SLOPE,
                 intercept: float = INTERCEPT, description: str = "AX CT", number: int = 1, prefix: str = "IM",
                 tweak: Tweak | None = None) -> list[Path]:
    """Write stored values `data` (x, y, z) as a series; returns the files in slice order (names are shuffled).

    `direction` columns are the LPS row, column and slice directions; `tweak(k, slice)` may break slice k.
    """
    direction = np.eye(3) if direction is None else direction
    folder.mkdir(exist_ok=True)
    names = np.random.default_rng(7).permutation(data.shape[2])
    files = []
    for k in range(data.shape[2]):
        s = {"row": direction[:, 0], "col": direction[:, 1], "pixels": data[:, :, k].T,
             "position": origin + direction[:, 2] * spacing[2] * k, "path": folder / f"{prefix}{names[k]:04d}.dcm"}
        if tweak:
            tweak(k, s)
        write_slice(s["path"], s["pixels"], {
            "Modality": "CT", "SeriesInstanceUID": uid, "SeriesDescription": description, "SeriesNumber": number,
            "InstanceNumber": k + 1, "ImagePositionPatient": _ds(s["position"]),
            "ImageOrientationPatient": _ds([*s["row"], *s["col"]]), "PixelSpacing": _ds([spacing[1], spacing[0]]),
            "SliceThickness": _ds([spacing[2]])[0], "RescaleSlope": _ds([slope])[0],
            "RescaleIntercept": _ds([intercept])[0]})
        files.append(s["path"])
    return files


def world(affine: np.ndarray, index: tuple[int, int, int]) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


def refused(err: pytest.ExceptionInfo[SegmentError], folder: Path) -> str:
    """The message a user sees: one line that names the folder."""
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(folder)), text
    return text


# --- a regular grid reads right --------------------------------------------------------------------------------------


def test_axial_series_matches_simpleitk_and_headers(tmp_path: Path) -> None:
    data = volume()
    files = write_series(tmp_path / "ct", data)
    assert sorted(files) != files  # file names do not give the slice order
    array, affine, dtype = read_dicom_series(tmp_path / "ct")
    assert array.shape == SHAPE and dtype == str(array.dtype)
    np.testing.assert_array_equal(array, data * SLOPE + INTERCEPT)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    itk = reader.Execute()
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(affine[:3, 3], np.array(itk.GetOrigin()) * LPS_TO_RAS, atol=1e-6)
    np.testing.assert_allclose(affine[:3, :3], np.diag(LPS_TO_RAS) @ direction @ np.diag(itk.GetSpacing()), atol=1e-6)
    expected = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    expected[:3, 3] = ORIGIN * LPS_TO_RAS
    np.testing.assert_allclose(affine, expected, atol=1e-6)
    image, geom = read_image(tmp_path / "ct")  # the same reader behind read_image
    np.testing.assert_array_equal(image, array)
    np.testing.assert_allclose(geom.affine, affine)


@pytest.mark.parametrize("direction", [np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]), oblique(25.0)],
                         ids=["sagittal", "oblique"])
def test_non_axial_voxels_land_where_the_headers_say(tmp_path: Path, direction: np.ndarray) -> None:
    data = volume(1)
    files = write_series(tmp_path / "mr", data, direction=direction)
    array, affine, _ = read_dicom_series(tmp_path / "mr")
    np.testing.assert_array_equal(array, data * SLOPE + INTERCEPT)
    for i, j, k in [(0, 0, 0), (9, 0, 0), (0, 7, 0), (3, 5, 4), (9, 7, 2)]:
        ds = pydicom.dcmread(files[k], stop_before_pixels=True)
        iop, (row_mm, col_mm) = np.array(ds.ImageOrientationPatient, float), np.array(ds.PixelSpacing, float)
        lps = np.array(ds.ImagePositionPatient, float) + i * col_mm * iop[:3] + j * row_mm * iop[3:]
        np.testing.assert_allclose(world(affine, (i, j, k)), lps * LPS_TO_RAS, atol=1e-4)


def test_several_series_are_listed_then_picked(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    write_series(folder, volume(2), uid=UID_A, description="AX T1", number=1, prefix="A")
    write_series(folder, volume(3, (10, 8, 4)), uid=UID_B, description="COR  T2", number=2, prefix="B")
    infos = list_series(folder)
    assert [(s.uid, s.description, s.modality, s.n_slices, len(s.files)) for s in infos] == [
        (UID_A, "AX T1", "CT", 5, 5), (UID_B, "COR T2", "CT", 4, 4)]
    with pytest.raises(InputError) as err:
        read_dicom_series(folder)
    text = refused(err, folder)
    assert all(part in text for part in (UID_A, UID_B, '"AX T1"', '"COR T2"', "5 slices", "4 slices", "2 DICOM series"))

    for pick in (UID_B, "222", "2", UID_B[:-1]):  # full UID, unique end, listed number, unique start
        array, _, _ = read_dicom_series(folder, series=pick)
        np.testing.assert_array_equal(array, volume(3, (10, 8, 4)) * SLOPE + INTERCEPT)
    array, _, _ = read_dicom_series(folder, series="1")
    np.testing.assert_array_equal(array, volume(2) * SLOPE + INTERCEPT)
    for bad, words in (("999", "no DICOM series matches"), ("1.2.826", "matches 2 DICOM series")):
        with pytest.raises(InputError, match=words) as err:
            read_dicom_series(folder, series=bad)
        assert UID_A in refused(err, folder) and UID_B in str(err.value)


# --- anything else is refused in one line that names the folder ------------------------------------------------------


def _tilt(k: int, s: dict[str, Any]) -> None:
    """Gantry tilted 15 degrees: the image plane leans, slices still step straight along the table (z)."""
    t = np.deg2rad(15.0)
    s["col"] = np.array([0.0, np.cos(t), np.sin(t)])
    s["position"] = ORIGIN + np.array([0.0, 0.0, SPACING[2] / np.cos(t)]) * k


def _turn(k: int, s: dict[str, Any]) -> None:
    if k == 3:
        s["row"], s["col"] = oblique(5.0)[:, 0], oblique(5.0)[:, 1]


def _crop(k: int, s: dict[str, Any]) -> None:
    if k == 3:
        s["pixels"] = s["pixels"][:, :9]


def _repeat(k: int, s: dict[str, Any]) -> None:
    if k == 3:
        s["position"] = ORIGIN + np.array([0.0, 0.0, SPACING[2] * 2])


BROKEN: dict[str, tuple[Tweak, type[SegmentError], str]] = {
    "gantry_tilt": (_tilt, GeometryError, r"has gantry tilt of 15 degrees .*without shearing.*dicom2nifti"),
    "mixed_orientation": (_turn, InputError, r"mixes slice orientations \(ImageOrientationPatient"),
    "mixed_rows_columns": (_crop, InputError, r"mixes slice sizes \(Rows x Columns 8x10 in .* vs 8x9 in"),
    "repeated_position": (_repeat, InputError, r"lie at the same slice position"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_series_is_refused(tmp_path: Path, case: str) -> None:
    tweak, error, words = BROKEN[case]
    folder = tmp_path / case
    write_series(folder, volume(), tweak=tweak)
    with pytest.raises(error, match=words) as err:
        read_dicom_series(folder)
    assert UID_A in refused(err, folder)


def test_missing_slice_is_refused_with_the_gap(tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    files = write_series(folder, volume(4, (10, 8, 6)))
    files.pop(2).unlink()
    with pytest.raises(GeometryError, match=r"expected 2\.5 mm, found 5 mm") as err:
        read_dicom_series(folder)
    assert f"between {files[1].name} and {files[2].name} (slices 2 and 3 of 5" in refused(err, folder)


def test_folder_without_dicom_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a scan")
    with pytest.raises(InputError, match="folder holds no DICOM series") as err:
        read_dicom_series(folder)
    refused(err, folder)


# --- real data: a CT written slice by slice comes back voxel for voxel, in place --------------------------------------


def test_real_ct_round_trips_through_dicom(real_ct_mr: Path, tmp_path: Path) -> None:
    source = nib.load(real_ct_mr / "images" / "ct_example.nii.gz")
    data = np.asanyarray(source.dataobj).astype(np.int16)
    lps = np.diag(LPS_TO_RAS) @ source.affine[:3, :4]
    spacing = tuple(float(s) for s in np.linalg.norm(lps[:, :3], axis=0))
    direction = lps[:, :3] / spacing
    assert np.dot(np.cross(direction[:, 0], direction[:, 1]), direction[:, 2]) > 0.999  # slices step along the normal
    write_series(tmp_path / "ct", data, direction=direction, origin=lps[:, 3], spacing=spacing, slope=1, intercept=0)
    array, affine, dtype = read_dicom_series(tmp_path / "ct")
    assert dtype == "int16"
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(affine, source.affine, atol=1e-3)
