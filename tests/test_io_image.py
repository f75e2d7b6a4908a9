"""Geometry must survive every read -> reorient -> write path, on awkward (non-RAS, anisotropic, oblique) grids."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segment.errors import GeometryError, InputError
from segment.io.image import (
    Geometry,
    from_canonical,
    read_geometry,
    read_image,
    read_label,
    to_canonical,
    write_image,
    write_label,
)

SHAPE = (5, 6, 7)
SPACING = (0.7, 1.3, 3.0)
MARK = (1, 4, 2)  # a voxel given a unique value, to follow through reorientation


def rotation(deg: float) -> np.ndarray:
    """Oblique rotation about an axis that is not a coordinate axis."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_affine(codes: str, deg: float = 0.0) -> np.ndarray:
    """Affine whose array axes point along `codes` (e.g. 'LIA'), with SPACING, rotated by `deg` degrees."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    affine = np.eye(4)
    for axis, (world, flip) in enumerate(ornt):
        affine[:3, axis] = 0.0
        affine[int(world), axis] = flip * SPACING[axis]
    affine[:3, :3] = rotation(deg) @ affine[:3, :3]
    affine[:3, 3] = (-40.5, 12.25, 73.0)
    return affine


def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3, SHAPE).astype(np.int16)
    data[MARK] = 7
    return data


def save(tmp_path: Path, data: np.ndarray, affine: np.ndarray, name: str = "in.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def world(affine: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


@pytest.mark.parametrize("codes", ["LPS", "LIA", "PSR", "RAS"])
@pytest.mark.parametrize("deg", [0.0, 20.0])
def test_round_trip_keeps_voxels_and_world(tmp_path: Path, codes: str, deg: float) -> None:
    data, affine = volume(), make_affine(codes, deg)
    image, geom = read_image(save(tmp_path, data, affine))
    assert image.dtype == np.float32 and geom.dtype == "int16"
    np.testing.assert_array_equal(image, data)
    np.testing.assert_allclose(geom.affine, affine, atol=1e-5)
    np.testing.assert_allclose(geom.spacing, SPACING, atol=1e-5)
    assert geom.orientation == tuple(codes)  # 20 degrees is not enough to change the closest axes

    canon, cgeom = to_canonical(image, geom)
    assert cgeom.orientation == ("R", "A", "S")
    assert sorted(cgeom.shape) == sorted(SHAPE) and canon.shape == cgeom.shape and canon.flags.c_contiguous
    marked = tuple(int(i) for i in np.argwhere(canon == 7)[0])
    np.testing.assert_allclose(world(cgeom.affine, marked), world(geom.affine, MARK), atol=1e-4)

    back = from_canonical(canon.astype(np.int16), geom)
    np.testing.assert_array_equal(back, data)
    out = write_label(back, geom, tmp_path / "out.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), data)
    assert written.get_data_dtype() == np.uint8 and written.shape == SHAPE
    np.testing.assert_array_equal(written.affine, geom.affine)
    source = nib.load(tmp_path / "in.nii.gz").header
    assert int(written.header["sform_code"]) == int(source["sform_code"])  # the input's own codes, not invented ones
    assert int(written.header["qform_code"]) == int(source["qform_code"])
    np.testing.assert_allclose(written.get_qform(), geom.affine, atol=1e-4)  # what ITK-based viewers use


def test_itk_reads_our_output_at_the_same_world_point(tmp_path: Path) -> None:
    data, affine = volume(), make_affine("LIA", 20.0)
    _, geom = read_image(save(tmp_path, data, affine))
    out = write_label(data, geom, tmp_path / "out.nii.gz")
    itk = sitk.ReadImage(str(out))
    assert itk[MARK] == 7  # SimpleITK indexes (x, y, z) like nibabel
    lps = np.array(itk.TransformIndexToPhysicalPoint(MARK))
    np.testing.assert_allclose(lps * [-1, -1, 1], world(geom.affine, MARK), atol=1e-3)


def test_channels_first_arrays_reorient_and_come_back(tmp_path: Path) -> None:
    data = volume()
    _, geom = read_image(save(tmp_path, data, make_affine("PSR", 20.0)))
    stack = np.stack([data, data * 2]).astype(np.float32)
    canon, cgeom = to_canonical(stack, geom)
    assert canon.shape == (2, *cgeom.shape)
    np.testing.assert_array_equal(canon[1], canon[0] * 2)
    np.testing.assert_array_equal(from_canonical(canon, geom), stack)
    with pytest.raises(GeometryError, match="canonical grid"):
        from_canonical(stack, geom)  # PSR: the native shape is not the canonical shape


def test_write_image_keeps_affine_for_channel_maps(tmp_path: Path) -> None:
    _, geom = read_image(save(tmp_path, volume(), make_affine("LPS", 20.0)))
    probs = np.random.default_rng(1).random((*SHAPE, 3))
    written = nib.load(write_image(probs, geom, tmp_path / "p.nii.gz"))
    assert written.shape == (*SHAPE, 3) and written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.affine, geom.affine)
    np.testing.assert_allclose(written.get_fdata(), probs, atol=1e-6)


def test_geometry_dict_round_trip_and_comparison(tmp_path: Path) -> None:
    _, geom = read_image(save(tmp_path, volume(), make_affine("LIA", 20.0)))
    again = Geometry.from_dict(json.loads(json.dumps(geom.to_dict())))
    assert again == geom and again.same_grid(geom)
    moved = geom.affine.copy()
    moved[0, 3] += 1e-5
    assert Geometry.from_affine(moved, geom.shape).same_grid(geom)  # within tolerance
    moved[0, 3] += 0.5
    assert not Geometry.from_affine(moved, geom.shape).same_grid(geom)
    assert "affine differs" in Geometry.from_affine(moved, geom.shape).difference(geom)
    assert not Geometry.from_affine(geom.affine, (5, 6, 8)).same_grid(geom)
    with pytest.raises(InputError, match="missing"):
        Geometry.from_dict({"affine": np.eye(4).tolist()})


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_read_into_nibabel_convention(tmp_path: Path, suffix: str) -> None:
    data = volume()
    itk = sitk.GetImageFromArray(np.transpose(data))  # numpy (z, y, x) order for SimpleITK
    itk.SetSpacing(SPACING)
    itk.SetOrigin((10.0, -20.0, 30.0))
    itk.SetDirection(tuple(rotation(20.0).ravel()))
    sitk.WriteImage(itk, str(tmp_path / f"a{suffix}"))
    sitk.WriteImage(itk, str(tmp_path / "a.nii.gz"))
    image, geom = read_image(tmp_path / f"a{suffix}")
    np.testing.assert_array_equal(image, data)
    lps = np.array(itk.TransformIndexToPhysicalPoint(MARK))
    np.testing.assert_allclose(world(geom.affine, MARK), lps * [-1, -1, 1], atol=1e-4)
    nifti, ngeom = read_image(tmp_path / "a.nii.gz")  # the same image through nibabel
    np.testing.assert_array_equal(nifti, image)
    np.testing.assert_allclose(ngeom.affine, geom.affine, atol=1e-4)
    assert read_geometry(tmp_path / f"a{suffix}").same_grid(geom)


def test_dicom_series_folder(tmp_path: Path) -> None:
    data = volume()
    folder = tmp_path / "dicom"
    folder.mkdir()
    direction = rotation(20.0)
    for k in range(SHAPE[2]):
        position = np.array([10.0, -20.0, 30.0]) + direction[:, 2] * SPACING[2] * k
        s = sitk.GetImageFromArray(np.transpose(data[:, :, k])[None])
        s.SetSpacing(SPACING)
        for tag, value in {
            "0008|0060": "MR", "0020|000e": "1.2.3.4.5", "0020|0013": str(k),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])),
            "0018|0050": str(SPACING[2]), "0028|0030": f"{SPACING[1]}\\{SPACING[0]}",
        }.items():
            s.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    image, geom = read_image(folder)
    np.testing.assert_array_equal(image, data)
    lps = np.array([10.0, -20.0, 30.0]) + direction @ (np.array(MARK) * SPACING)
    np.testing.assert_allclose(world(geom.affine, MARK), lps * [-1, -1, 1], atol=1e-3)


def test_real_ct_and_mr_write_back_unchanged(real_ct_mr: Path, tmp_path: Path) -> None:
    for name, codes in (("ct_example", ("R", "A", "S")), ("mr_example", ("L", "P", "S"))):
        image, geom = read_image(real_ct_mr / "images" / f"{name}.nii.gz")
        labels = read_label(real_ct_mr / "labels" / f"{name}.nii.gz", reference=geom)
        assert geom.orientation == codes and geom.dtype == "int16" and labels.max() > 1
        canon, cgeom = to_canonical(labels, geom)
        assert cgeom.orientation == ("R", "A", "S")
        lab_out = nib.load(write_label(from_canonical(canon, geom), geom, tmp_path / f"{name}_seg.nii.gz"))
        img_out = nib.load(write_image(image, geom, tmp_path / f"{name}_img.nii.gz"))
        source = nib.load(real_ct_mr / "images" / f"{name}.nii.gz")
        for out in (lab_out, img_out):
            assert out.shape == source.shape
            np.testing.assert_array_equal(out.affine, source.affine)
        np.testing.assert_array_equal(np.asanyarray(lab_out.dataobj), labels)
        np.testing.assert_array_equal(img_out.get_fdata(), image)


# --- bad input: one clear error that names the file ---------------------------------------------------------------


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.nii\.gz: no such file"):
        read_image(tmp_path / "nope.nii.gz")


def test_non_image_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"notes\.txt: not an image file"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=r"broken\.nii\.gz: not a readable NIfTI"):
        read_image(tmp_path / "broken.nii.gz")
    with pytest.raises(InputError, match=r"empty_dir: folder holds no DICOM"):
        (tmp_path / "empty_dir").mkdir()
        read_image(tmp_path / "empty_dir")


@pytest.mark.parametrize(("shape", "dims"), [((5, 6), "2D"), ((5, 6, 7, 2), "4D")])
def test_wrong_dimensionality_is_refused(tmp_path: Path, shape: tuple[int, ...], dims: str) -> None:
    path = save(tmp_path, np.zeros(shape, np.float32), np.eye(4), "bad.nii.gz")
    with pytest.raises(InputError, match=rf"bad\.nii\.gz: {dims} image"):
        read_image(path)
    with pytest.raises(InputError, match=rf"bad\.nii\.gz: {dims} image"):
        read_geometry(path)


def test_trailing_singleton_axis_is_squeezed(tmp_path: Path) -> None:
    image, geom = read_image(save(tmp_path, volume()[..., None], np.eye(4)))
    assert image.shape == SHAPE and geom.shape == SHAPE and read_geometry(tmp_path / "in.nii.gz").shape == SHAPE


def test_nan_and_empty_images_are_refused(tmp_path: Path) -> None:
    data = volume().astype(np.float32)
    data[0, 0, 0] = np.nan
    data[1, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 2 voxels are NaN or infinite"):
        read_image(save(tmp_path, data, np.eye(4), "nan.nii.gz"))
    with pytest.raises(InputError, match=r"empty\.nii\.gz: empty image"):
        read_image(save(tmp_path, np.zeros((0, 4, 4), np.float32), np.eye(4), "empty.nii.gz"))


def test_label_on_another_grid_names_both_files(tmp_path: Path) -> None:
    _, geom = read_image(save(tmp_path, volume(), make_affine("LPS"), "img.nii.gz"))
    save(tmp_path, volume(), make_affine("RAS"), "lab.nii.gz")
    save(tmp_path, volume()[:, :, :6], make_affine("LPS"), "short.nii.gz")
    with pytest.raises(GeometryError, match=r"lab\.nii\.gz.*img\.nii\.gz: affine differs.*orientation RAS vs LPS"):
        read_label(tmp_path / "lab.nii.gz", reference=geom)
    with pytest.raises(GeometryError, match=r"short\.nii\.gz.*img\.nii\.gz: shape \(5, 6, 6\) vs \(5, 6, 7\)"):
        read_label(tmp_path / "short.nii.gz", reference=geom)
    np.testing.assert_array_equal(read_label(tmp_path / "img.nii.gz", reference=geom), volume())


def test_label_values_float_stored_negative_and_fractional(tmp_path: Path) -> None:
    stored = volume().astype(np.float32) + 1e-5  # float-stored integer labels, as in two hippocampus cases
    labels = read_label(save(tmp_path, stored, np.eye(4), "float.nii.gz"))
    assert labels.dtype == np.int16
    np.testing.assert_array_equal(labels, volume())
    stored[2, 2, 2] = 1.5
    with pytest.raises(InputError, match=r"frac\.nii\.gz: label map holds non-integer values \(e\.g\. 1\.5\)"):
        read_label(save(tmp_path, stored, np.eye(4), "frac.nii.gz"))
    with pytest.raises(InputError, match=r"neg\.nii\.gz: label map holds negative values"):
        read_label(save(tmp_path, volume() - 1, np.eye(4), "neg.nii.gz"))


def test_write_guards(tmp_path: Path) -> None:
    _, geom = read_image(save(tmp_path, volume(), make_affine("LIA", 20.0)))
    with pytest.raises(GeometryError, match=r"out\.nii\.gz: labels of shape \(6, 5, 7\) do not match"):
        write_label(np.zeros((6, 5, 7), np.uint8), geom, tmp_path / "out.nii.gz")
    write_label(volume(), geom, tmp_path / "out.nii.gz")
    with pytest.raises(InputError, match=r"out\.nii\.gz: file exists"):
        write_label(volume(), geom, tmp_path / "out.nii.gz")
    many = volume().astype(np.int32) * 200
    assert nib.load(write_label(many, geom, tmp_path / "out.nii.gz", overwrite=True)).get_data_dtype() == np.uint16
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile: cannot create output folder"):
        write_label(volume(), geom, tmp_path / "afile" / "out.nii.gz")
    with pytest.raises(InputError, match=r"out\.nrrd: outputs are written as NIfTI"):
        write_label(volume(), geom, tmp_path / "out.nrrd")
    with pytest.raises(InputError, match="0..65535"):
        write_label(volume() - 1, geom, tmp_path / "neg.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.nii.gz", "out.nii.gz"]  # no temp files left


def test_nibabel_header_notes_name_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """nibabel fixes a zero pixdim with an anonymous note; in a batch the note must say which file it is about."""
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4))
    img.header["pixdim"][1:4] = 0
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    bad, good = tmp_path / "zero_pixdim.nii.gz", tmp_path / "fine.nii.gz"
    nib.save(img, bad)
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), good)
    with caplog.at_level("WARNING", logger="nibabel.global"):
        _, geometry = read_image(bad)
        read_image(good)
    notes = [r.getMessage() for r in caplog.records if r.name == "nibabel.global"]
    assert notes == [f"{bad}: header fixed on reading: pixdim[1,2,3] should be non-zero; setting 0 dims to 1"]
    assert geometry.spacing == (1.0, 1.0, 1.0)


def test_a_file_we_may_not_read_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 on a scan or dataset.json: "permission denied", not "not a readable NIfTI" / "not valid JSON" (a
    corrupt-looking file the user would go and repair). Simulated: tests run as root, where chmod does not stop a read."""
    from segment.io.dataset_json import read_dataset_json
    from segment.io.image import read_geometry

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan)
    (tmp_path / "dataset.json").write_text("{}")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]) if args else None)

    monkeypatch.setattr(nib, "load", denied)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(InputError) as err:
        read_geometry(scan)
    assert str(err.value) == f"{scan}: cannot read this file (permission denied)"
    with pytest.raises(InputError) as err:
        read_dataset_json(tmp_path)
    assert str(err.value) == f"{tmp_path / 'dataset.json'}: cannot read this file (permission denied)"
