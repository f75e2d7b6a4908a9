"""`segment predict` on the files hospitals have: odd headers, broken files, files that must not be lost, foreign models.

Every case is built here as a small file. Headers are checked with nibabel *and* SimpleITK (what ITK-SNAP and
3D Slicer use): the label map must overlay its scan in both.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from segment.cli import app
from segment.errors import GeometryError, InputError
from segment.io.image import read_image
from segment.io.nifti import write_label
from tests.test_predict_cli import make_checkpoint
from tests.test_predict_geometry import THRESHOLD, _plan, _predictor

runner = CliRunner()
SHAPE = (24, 20, 16)
ROT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # an LPS-like permuted direction


def _ball(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Bright ball (value 100) on a dark background (0): ThresholdNet labels it 1, voxel for voxel."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt((((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] / 3.2)) ** 2).sum(0))
    return np.where(r < 1, 100.0, 0.0).astype(np.float32)


def _header_case(kind: str) -> tuple[nib.Nifti1Image, float]:
    """(image, mm per file unit) for each header quirk a hospital export can have."""
    mm = np.diag([1.0, 1.5, 2.0])
    q = np.eye(4)
    q[:3, :3] = ROT @ mm
    q[:3, 3] = [10.0, -20.0, 30.0]
    img = nib.Nifti1Image(_ball(), None)
    hdr = img.header
    scale = 1.0
    if kind == "qform_differs":  # ITK reads the qform, nibabel the sform: both must be kept as they are
        s = q.copy()
        s[:3, 3] += [0.5, 0.25, -0.75]
        hdr.set_qform(q, code=1)
        hdr.set_sform(s, code=2)
    elif kind == "codes_zero":
        hdr.set_qform(q, code=0)
        hdr.set_sform(q, code=0)
        hdr.set_zooms((1.0, 1.5, 2.0))
    elif kind in ("metres", "microns"):  # pixdim 0.001 m is a 1 mm voxel
        scale = 1000.0 if kind == "metres" else 1e-3
        fq = q.copy()
        fq[:3, :] /= scale
        hdr.set_qform(fq, code=1)
        hdr.set_sform(fq, code=1)
        hdr.set_xyzt_units("meter" if kind == "metres" else "micron", "sec")
    elif kind == "big_origin":  # float32 cannot hold 2048.0004 exactly
        b = q.copy()
        b[:3, 3] = [-300.25, 512.5, 2048.0004]
        hdr.set_qform(b, code=1)
        hdr.set_sform(b, code=1)
    return img, scale


def _sitk_grid(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return np.array(image.GetOrigin()), np.array(image.GetDirection()), np.array(image.GetSpacing())


HEADER_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y",
                 "srow_z", "qform_code", "sform_code", "xyzt_units", "pixdim")


@pytest.mark.parametrize("kind", ["qform_differs", "codes_zero", "metres", "microns", "big_origin"])
def test_label_map_overlays_the_scan_in_nibabel_and_itk(tmp_path: Path, kind: str) -> None:
    img, scale = _header_case(kind)
    scan = tmp_path / "scan.nii.gz"
    nib.save(img, scan)
    plan = _plan([1.0, 1.5, 2.0], patch=[16, 16, 8]) if kind not in ("metres", "microns") else _plan([2.0, 2.0, 2.0])
    result = _predictor(plan).predict_file(scan, tmp_path / "scan_seg.nii.gz")
    src, out = nib.load(scan), nib.load(result["output"])
    for field in HEADER_FIELDS[:-1]:
        np.testing.assert_array_equal(out.header[field], src.header[field], err_msg=field)
    np.testing.assert_array_equal(out.header["pixdim"][1:4], src.header["pixdim"][1:4])
    assert out.get_data_dtype() == np.uint8 and out.header.get_intent()[0] == "label"
    for a, b in zip(_sitk_grid(scan), _sitk_grid(Path(result["output"]))):
        np.testing.assert_array_equal(a, b)
    labels = np.asarray(out.dataobj)
    truth = (_ball() > THRESHOLD).astype(np.uint8)
    dice = 2 * (labels * truth).sum() / (labels.sum() + truth.sum())
    assert dice > 0.9, f"{kind}: the label map does not sit on the ball (Dice {dice:.3f})"
    # volumes are reported in millilitres of the real, millimetre-sized voxels (|det| = 3 mm^3 per voxel)
    assert result["volumes_ml"]["bright"] == pytest.approx(labels.sum() * 3.0 / 1000, rel=1e-6)


@pytest.mark.parametrize("kind", ["metres", "microns"])
def test_units_are_read_as_millimetres(tmp_path: Path, kind: str) -> None:
    img, _ = _header_case(kind)
    nib.save(img, tmp_path / "s.nii.gz")
    _, geometry = read_image(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(geometry.spacing, (1.0, 1.5, 2.0), rtol=1e-5)
    np.testing.assert_allclose(geometry.affine[:3, 3], (10.0, -20.0, 30.0), rtol=1e-5)


@pytest.mark.parametrize("column, value, expected", [
    (2, 0.0, "column 2 is zero"), (1, np.nan, "NaN or infinite"), (None, None, "singular"),
])
def test_degenerate_geometry_is_one_line_before_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        column: int | None, value: float | None, expected: str) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    if column is None:
        affine[:3, 2] = affine[:3, 1]  # two parallel axes
    else:
        affine[:3, column] *= value
    scan = tmp_path / "bad.nii.gz"
    nib.save(_with_raw_sform(_ball(), affine), scan)
    predictor = _predictor(_plan([1.0, 1.0, 1.0]))
    monkeypatch.setattr(predictor.model, "forward", lambda x: pytest.fail("computed on a degenerate scan"))
    with pytest.raises(GeometryError) as err:
        predictor.predict_file(scan, tmp_path / "out.nii.gz")
    assert str(scan) in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.nii.gz").exists()


def _with_raw_sform(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """An image whose sform rows are written as given (nibabel refuses to build a degenerate affine itself)."""
    img = nib.Nifti1Image(data, None)
    img.header["srow_x"], img.header["srow_y"], img.header["srow_z"] = affine[0], affine[1], affine[2]
    img.header["sform_code"] = 1
    return img


def _bad_files(folder: Path) -> dict[str, str]:
    """name -> words its one-line error must contain."""
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), folder / "rgb.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.complex64), np.eye(4)), folder / "complex.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((24, 20), np.float32), np.eye(4)), folder / "flat.nii.gz")
    good = gzip.compress(nib.Nifti1Image(_ball(), np.eye(4)).to_bytes())
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    zero = np.eye(4)
    zero[2, 2] = 0
    nib.save(_with_raw_sform(_ball(), zero), folder / "zerocol.nii.gz")
    return {"rgb": "RGB/vector", "complex": "complex", "flat": "2D", "truncated": "not a readable NIfTI",
            "zerocol": "degenerate geometry"}


def test_one_bad_file_never_ends_a_batch(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    scans = tmp_path / "scans"
    scans.mkdir()
    expected = _bad_files(scans)
    nib.save(nib.Nifti1Image(_ball(), np.diag([2.0, 2.0, 2.0, 1.0])), scans / "good.nii.gz")
    result = runner.invoke(app, ["predict", str(scans), "-m", str(ckpt), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert (tmp_path / "out" / "good_seg.nii.gz").is_file()
    failed = [line for line in result.output.splitlines() if line.startswith("failed ")]
    assert len(failed) == len(expected)
    for name, words in expected.items():
        line = next((f for f in failed if f"{name}.nii.gz" in f), "")
        assert words in line, f"{name}: {line!r}"
    assert f"1 of {len(expected) + 1} case(s) segmented; {len(expected)} failed" in result.output


def test_nothing_the_user_had_is_lost(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    data = tmp_path / "pairs"
    data.mkdir()
    nib.save(nib.Nifti1Image(_ball(), np.eye(4)), data / "case.nii.gz")
    truth = data / "case_seg.nii.gz"  # a ground-truth label of a plain-pairs dataset
    nib.save(nib.Nifti1Image((_ball() > 0).astype(np.uint8), np.eye(4)), truth)
    before = truth.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["predict", str(data / "case.nii.gz"), "-m", str(ckpt), *extra])
        assert result.exit_code == 1 and "not written by segment" in result.output
        assert truth.read_bytes() == before
    scan_bytes = (data / "case.nii.gz").read_bytes()
    result = runner.invoke(app, ["predict", str(data / "case.nii.gz"), "-m", str(ckpt), "-o",
                                 str(data / "case.nii.gz"), "--overwrite"])
    assert result.exit_code == 1 and "input" in result.output
    assert (data / "case.nii.gz").read_bytes() == scan_bytes
    ours = tmp_path / "ours.nii.gz"  # our own earlier output is replaced with --overwrite, and only then
    assert runner.invoke(app, ["predict", str(data / "case.nii.gz"), "-m", str(ckpt), "-o", str(ours)]).exit_code == 0
    assert runner.invoke(app, ["predict", str(data / "case.nii.gz"), "-m", str(ckpt), "-o", str(ours)]).exit_code == 1
    assert runner.invoke(app, ["predict", str(data / "case.nii.gz"), "-m", str(ckpt), "-o", str(ours),
                               "--overwrite"]).exit_code == 0


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segment.io.nifti as nifti

    _, geometry = read_image(_save(tmp_path / "scan.nii.gz"))
    out = write_label(np.zeros(SHAPE, np.uint8), geometry, tmp_path / "out.nii.gz")
    before = out.read_bytes()

    def broken_save(img: nib.Nifti1Image, path: str) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti.nib, "save", broken_save)
    with pytest.raises(InputError, match="No space left"):
        write_label(np.ones(SHAPE, np.uint8), geometry, out, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz", "scan.nii.gz"]  # no temporary file left


def _save(path: Path) -> Path:
    nib.save(nib.Nifti1Image(_ball(), np.diag([1.0, 1.5, 2.0, 1.0])), path)
    return path


def test_an_axis_nifti1_cannot_hold_is_written_as_nifti2(tmp_path: Path) -> None:
    from segment.io.geometry import Geometry

    geometry = Geometry.from_affine(np.eye(4), (40000, 2, 2), source="long")
    labels = np.zeros((40000, 2, 2), np.uint8)
    labels[39999] = 1
    out = nib.load(write_label(labels, geometry, tmp_path / "long.nii"))
    assert isinstance(out, nib.Nifti2Image) and out.shape == (40000, 2, 2)
    assert np.asarray(out.dataobj)[39999].all()


def test_volume_of_a_sheared_grid_uses_the_determinant() -> None:
    from segment.inference.postprocess import label_volumes
    from segment.io.geometry import Geometry

    affine = np.eye(4)
    affine[:3, :3] = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # sheared: column norms 1, 1.414, 1
    geometry = Geometry.from_affine(affine, (10, 10, 10))
    labels = np.ones((10, 10, 10), np.uint8)
    assert label_volumes(labels, geometry, {0: "bg", 1: "x"})["x"] == pytest.approx(1.0)  # 1000 voxels of 1 mm^3


def test_a_model_file_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Evil()}, evil)
    scan = _save(tmp_path / "scan.nii.gz")
    result = runner.invoke(app, ["predict", str(scan), "-m", str(evil)])
    assert result.exit_code == 2 and "refused" in result.output and str(evil) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "scan_seg.nii.gz").exists()


def _rewrite(src: nib.Nifti1Image, kind: str) -> tuple[nib.Nifti1Image, np.ndarray | None]:
    """The real scan with its header rewritten; also how to bring the variant's voxels back to the original's
    (None where the variant places voxels elsewhere in the world, so only the overlay can be compared)."""
    data = np.asanyarray(src.dataobj)
    affine = src.affine.copy()
    img = nib.Nifti1Image(data, None)
    if kind == "metres":
        m = affine.copy()
        m[:3, :] /= 1000.0
        img.header.set_qform(m, code=1)
        img.header.set_sform(m, code=1)
        img.header.set_xyzt_units("meter")
        return img, np.arange(3)
    if kind == "qform_differs":  # sform as before (nibabel reads it); a qform 5 mm off
        q = affine.copy()
        q[:3, 3] += 5.0
        img.header.set_qform(q, code=1)
        img.header.set_sform(affine, code=2)
        return img, np.arange(3)
    if kind == "flipped":  # the same physical scan stored in the opposite x and y order
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
        out = nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1]), affine @ flip)
        return out, None
    img.header.set_qform(affine, code=0)  # codes 0
    img.header.set_sform(affine, code=0)
    img.header.set_zooms(src.header.get_zooms()[:3])
    return img, None


@pytest.mark.parametrize("kind", ["metres", "qform_differs", "flipped", "codes_zero"])
def test_real_ct_with_rewritten_headers(real_ct_mr: Path, tmp_path: Path, kind: str) -> None:
    # a decisive model (HU > 50 -> class 1), so labels differ only if voxels land elsewhere, not through near-ties
    predictor = _predictor(_plan([6.0, 6.0, 6.0], patch=[16, 16, 8]))
    src_path = real_ct_mr / "images" / "ct_example.nii.gz"
    variant, _ = _rewrite(nib.load(src_path), kind)
    scan, label = tmp_path / "variant.nii.gz", tmp_path / "variant_seg.nii.gz"
    nib.save(variant, scan)
    original = nib.load(predictor.predict_file(src_path, tmp_path / "ct_seg.nii.gz")["output"])
    predictor.predict_file(scan, label)
    for a, b in zip(_sitk_grid(scan), _sitk_grid(label)):  # the label overlays its scan in ITK-based viewers
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(nib.load(label).affine, nib.load(scan).affine)
    got = np.asarray(nib.load(label).dataobj)
    if kind == "flipped":  # same world position, voxel for voxel
        got = got[::-1, ::-1]
    if kind != "codes_zero":  # codes 0 has no world position to compare
        assert 0.01 < np.asarray(original.dataobj).mean() < 0.99
        np.testing.assert_array_equal(got, np.asarray(original.dataobj))


def test_dicom_folder_with_two_series_through_the_cli(tmp_path: Path) -> None:
    from tests.test_dicom import UID_A, write_series

    folder = tmp_path / "export"
    data = (_ball((12, 10, 6)) * 2).astype(np.int16)  # stored values; the series' rescale maps them to HU
    write_series(folder, data, uid=UID_A, description="AX CT", number=1)
    write_series(folder, data[::-1].copy(), uid=UID_A + ".9", description="LOCALIZER", number=2, prefix="LOC")
    ckpt = make_checkpoint(tmp_path / "model.ckpt", modality="ct", spacing=[3.0, 3.0, 3.0])
    out = tmp_path / "seg.nii.gz"
    refused = runner.invoke(app, ["predict", str(folder), "-m", str(ckpt), "-o", str(out)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    line = next(ln for ln in refused.output.splitlines() if ln.startswith("failed"))
    assert f"{folder}: 2 DICOM series found; pick one with --series" in line
    assert "AX CT" in refused.output and "LOCALIZER" in refused.output and not out.exists()
    picked = runner.invoke(app, ["predict", str(folder), "-m", str(ckpt), "-o", str(out), "--series", "1"])
    assert picked.exit_code == 0, picked.output
    assert nib.load(out).shape == (12, 10, 6)


def test_out_of_memory_on_one_case_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.inference.predictor import Predictor

    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(_ball(), np.eye(4)), tmp_path / f"{name}.nii.gz")
    real = Predictor.predict_labels

    def flaky(self: Predictor, channels: list, geometry: object, keep_probabilities: bool = False,  # noqa: ANN202
              **kwargs: object):
        if str(getattr(geometry, "source", "")).endswith("a.nii.gz"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, channels, geometry, keep_probabilities, **kwargs)

    monkeypatch.setattr(Predictor, "predict_labels", flaky)
    result = runner.invoke(app, ["predict", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "-m", str(ckpt)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (tmp_path / "b_seg.nii.gz").is_file() and not (tmp_path / "a_seg.nii.gz").exists()
    assert "a.nii.gz: OutOfMemoryError: out of memory" in result.output.replace("\n", " ")


def test_the_models_predict_settings_are_used_unless_given(tmp_path: Path) -> None:
    from segment.inference.predictor import Predictor

    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["config"]["predict"].update(tta=True, largest_component=True, precision="bf16",
                                                           overlap=0.25)
    torch.save(saved, ckpt)
    default = Predictor.from_checkpoint(ckpt, "cpu")
    assert (default.tta, default.largest_component, default.dtype, default.overlap) == (True, True, torch.bfloat16, 0.25)
    given = Predictor.from_checkpoint(ckpt, "cpu", tta=False, largest_component=False, precision="32", overlap=0.5)
    assert (given.tta, given.largest_component, given.dtype, given.overlap) == (False, False, None, 0.5)
    scan = _save(tmp_path / "scan.nii.gz")
    result = runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "--no-tta"])
    assert result.exit_code == 0 and "--tta: mirroring" not in result.output
    result = runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "-o", str(tmp_path / "t.nii.gz")])
    assert result.exit_code == 0 and "--tta: mirroring axes" in result.output


def test_a_scan_too_big_for_memory_is_one_line_before_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segment.inference.predictor as predictor_module

    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    for name in ("big", "small"):
        nib.save(nib.Nifti1Image(_ball(SHAPE if name == "small" else (48, 40, 32)), np.eye(4)), tmp_path / f"{name}.nii.gz")
    # 48x40x32 needs ~1.1 MB here, 24x20x16 ~0.15 MB: a machine with 0.5 MB free can do only the small one
    monkeypatch.setattr(predictor_module, "available_memory_bytes", lambda: 500_000)
    result = runner.invoke(app, ["predict", str(tmp_path / "big.nii.gz"), str(tmp_path / "small.nii.gz"), "-m", str(ckpt)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("failed"))
    assert "big.nii.gz" in line and "needs about" in line and "GB is available" in line
    assert (tmp_path / "small_seg.nii.gz").is_file() and not (tmp_path / "big_seg.nii.gz").exists()


def test_a_scan_blown_up_by_resampling_names_its_spacing(tmp_path: Path) -> None:
    """A header in metres-as-mm (1000 mm voxels) makes a small scan huge on the model's grid: the line says why."""
    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    nib.save(nib.Nifti1Image(_ball(), np.diag([1000.0, 1000.0, 1000.0, 1.0])), tmp_path / "metres.nii.gz")
    nib.save(nib.Nifti1Image(_ball(), np.eye(4)), tmp_path / "fine.nii.gz")
    result = runner.invoke(app, ["predict", str(tmp_path / "metres.nii.gz"), str(tmp_path / "fine.nii.gz"), "-m", str(ckpt)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("failed"))
    assert "metres.nii.gz" in line and "24x20x16 voxels" in line
    assert "resampled from its spacing (1000, 1000, 1000) mm" in line and "24000x20000x16000 voxels" in line
    assert "check the header's spacing" in line
    assert (tmp_path / "fine_seg.nii.gz").is_file() and not (tmp_path / "metres_seg.nii.gz").exists()


def test_memory_estimate_for_a_whole_body_ct_fits_the_target() -> None:
    from segment.config import Config, ModelConfig
    from segment.data.plan import Plan
    from segment.inference.predictor import Predictor
    from segment.io.geometry import Geometry

    plan = Plan(spacing=[1.5, 1.5, 1.5], patch_size=[64, 64, 64], batch_size=2, features=[4, 8], modality="ct",
                channels=1, labels={i: f"c{i}" for i in range(104)})
    cfg = Config(model=ModelConfig(out_channels=104, features=[4, 8]))
    predictor = Predictor(torch.nn.Conv3d(1, 104, 1), plan, cfg, device="cpu", precision="32")
    ct = Geometry.from_affine(np.diag([0.8, 0.8, 1.5, 1.0]), (512, 512, 600))
    need = predictor.memory_needed(ct)
    all_classes = 104 * 4 * 512 * 512 * 600  # one float32 copy of every class at full resolution: ~65 GB
    assert need < 8 * 2**30 and need < all_classes / 10


def test_outputs_get_ordinary_permissions_not_owner_only(tmp_path: Path) -> None:
    _, geometry = read_image(_save(tmp_path / "scan.nii.gz"))
    old = os.umask(0o022)
    try:
        out = write_label(np.zeros(SHAPE, np.uint8), geometry, tmp_path / "out.nii.gz")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644  # a PACS import service running as another user can read it
