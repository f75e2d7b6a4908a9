"""`segment predict DICOM_FOLDER --format dicom-seg`: a DICOM Segmentation whose every frame lies on its source slice.

The series are real CT voxels (a 40x36x10 crop of ct_example.nii.gz) written with pydicom in non-axial orientations,
one with its slices stored against the slice normal, so only correct sorting puts a frame on the right slice. The
network is a fixed 1x1x1 convolution (background / "liver" / "bone" by intensity), so every label is known. The SEG
is read back with highdicom and compared frame by frame, through the referenced SOP instance UIDs only, with the
NIfTI label map written alongside and with the thresholds applied to the slice that was written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from typer.testing import CliRunner

from segment.cli import app
from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.inference.predictor import Predictor
from segment.io.dicom_seg import (
    MANUFACTURER,
    is_our_seg,
    property_codes,
    software_version,
)
from tests.fixed_nets import FixedConv
from tests.test_dicom import write_series
from tests.test_predict_cli import make_checkpoint

runner = CliRunner()
SPACING = (0.8, 0.9, 2.5)  # column, row, slice spacing (mm)
LOW, HIGH = 0.0, 250.0  # HU: below LOW background, LOW..HIGH "liver", above HIGH "bone"
NAMES = {0: "background", 1: "liver", 2: "bone"}
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
# columns: LPS row direction, column direction, and the direction slices are written along
DIRECTIONS = {
    # sagittal, written along -normal: sorting by position reverses the written (and InstanceNumber) order
    "sagittal": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


def expected(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > HIGH, 2, np.where(hu > LOW, 1, 0)).astype(np.uint8)


@pytest.fixture(scope="module")
def crop(real_ct_mr: Path) -> np.ndarray:
    """Real CT values (HU, int16) with background, soft tissue and some bone."""
    ct = np.asarray(nib.load(real_ct_mr / "images" / "ct_example.nii.gz").dataobj)
    return np.ascontiguousarray(ct[42:82, 18:54, 0:10]).astype(np.int16)


def make_series(folder: Path, hu: np.ndarray, direction: np.ndarray) -> list[Path]:
    """A CT series of `hu` (x, y, z) = (columns, rows, slices) in written order, with a frame of reference."""
    files = write_series(folder, (hu.astype(np.int32) + 1024).astype(np.int16), direction=direction, spacing=SPACING,
                         slope=1.0, intercept=-1024.0, uid=pydicom.uid.generate_uid(), description="CT crop")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID, ds.PatientID, ds.Manufacturer = "1.2.826.0.1.3680043.8.498.77", "P1", "scanner"
        ds.save_as(f)
    return files


@pytest.fixture
def predictor(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> Predictor:
    """`segment predict -m any.ckpt` predicts with FixedConv: logits -x + LOW, 0, x - HIGH on raw HU."""
    spacing = [SPACING[0], SPACING[1], SPACING[2]]
    plan = Plan(spacing=sorted(spacing), patch_size=[16, 16, 8], batch_size=2, features=[4, 8], modality="ct",
                channels=1, labels=NAMES, ct_clip=[-1e4, 1e4], ct_mean=0.0, ct_std=1.0)
    cfg = Config(model=ModelConfig(out_channels=3, features=[4, 8]))
    made = Predictor(FixedConv([-1.0, 0.0, 1.0], [LOW, 0.0, -HIGH]), plan, cfg, device="cpu", precision="32",
                     largest_component=False)
    monkeypatch.setattr(Predictor, "from_checkpoint", lambda *args, **kwargs: made)
    return made


def _canonical_spacing_plan(predictor: Predictor, folder: Path) -> None:
    """Plan spacing = the series' canonical spacing, so no resampling blurs the 1x1x1 thresholds."""
    from segment.io.geometry import to_canonical
    from segment.io.image import read_image

    _, geometry = read_image(folder)
    predictor.plan.spacing = list(to_canonical(np.zeros(geometry.shape, np.uint8), geometry)[1].spacing)


def predict(tmp_path: Path, *args: str) -> tuple[int, str]:
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    if not ckpt.exists():
        make_checkpoint(ckpt)
    result = runner.invoke(app, ["predict", *args, "-m", str(ckpt), "--device", "cpu"])
    return result.exit_code, result.output


def seg_frames(seg: hd.seg.Segmentation, uids: list[str]) -> np.ndarray:
    """(slices, rows, columns, segments) for the given source SOP instance UIDs, absent (empty) frames as zeros."""
    return seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)


@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_dicom_seg_frames_match_the_nifti_and_the_source_slices(tmp_path: Path, crop: np.ndarray,
                                                                predictor: Predictor, orientation: str) -> None:
    files = make_series(tmp_path / "ct", crop, DIRECTIONS[orientation])
    _canonical_spacing_plan(predictor, tmp_path / "ct")
    code, out = predict(tmp_path, str(tmp_path / "ct"), "-o", str(tmp_path / "out"), "--format", "nifti,dicom-seg")
    assert code == 0, out
    nifti, dcm = tmp_path / "out" / "ct_seg.nii.gz", tmp_path / "out" / "ct_seg.dcm"
    assert str(dcm) in out.replace("\n", "") and is_our_seg(dcm)
    label_img = nib.load(nifti)
    labels = np.asarray(label_img.dataobj)
    inverse = np.linalg.inv(label_img.affine)

    seg = hd.seg.segread(dcm)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # in written order
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == "P1"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == {s.SOPInstanceUID for s in sources}
    assert seg.Manufacturer == MANUFACTURER and seg.SeriesDescription == "segment"

    # every segment: name, codes, algorithm
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "bone"]
    for item, anatomy in zip(seg.SegmentSequence, (codes.SCT.Liver, codes.SCT.Bone), strict=True):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == anatomy.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.cid7150.AnatomicalStructure.value
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "segment"
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "segment" and algorithm.AlgorithmVersion == software_version()
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.ArtificialIntelligence.value

    # each frame's own plane position is its source slice's position
    by_uid = {s.SOPInstanceUID: s for s in sources}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-3)

    frames = seg_frames(seg, [s.SOPInstanceUID for s in sources])
    assert frames.shape == (len(sources), 36, 40, 2)
    for k, ds in enumerate(sources):  # written slice k holds crop[:, :, k], pixel (row r, column c) = crop[c, r, k]
        truth = expected(crop[:, :, k]).T
        # the NIfTI voxel of this slice's first pixel, from the label map's own affine and the slice's own position
        i, j, z = (inverse @ np.array([*(LPS_TO_RAS * [float(v) for v in ds.ImagePositionPatient]), 1.0]))[:3]
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(z - round(z)) < 1e-3, (i, j, z)
        nifti_slice = labels[:, :, round(z)].T  # (rows, columns)
        for number in (1, 2):
            np.testing.assert_array_equal(frames[k, :, :, number - 1], nifti_slice == number,
                                          err_msg=f"{orientation}: segment {number}, slice {k}")
            np.testing.assert_array_equal(frames[k, :, :, number - 1], truth == number)
    assert frames[..., 1].sum() > 0 and frames[..., 0].sum() > 0  # both classes present in this crop
    if orientation == "sagittal":  # stored against the normal: the SEG must not follow the written order
        assert z_order_reversed(files, label_img.affine)


def z_order_reversed(files: list[Path], affine: np.ndarray) -> bool:
    """True when the label map's z axis runs against the written slice order (so sorting was needed)."""
    first, last = (pydicom.dcmread(files[k], stop_before_pixels=True) for k in (0, -1))
    inverse = np.linalg.inv(affine)
    z = [(inverse @ np.array([*(LPS_TO_RAS * [float(v) for v in d.ImagePositionPatient]), 1.0]))[2] for d in (first, last)]
    return z[0] > z[1]


def test_dicom_seg_only_and_an_empty_scan(tmp_path: Path, crop: np.ndarray, predictor: Predictor) -> None:
    """No class found: a valid SEG with every segment empty and a warning, exit 0; no NIfTI when not asked for."""
    air = np.full_like(crop, -1000)
    make_series(tmp_path / "air", air, DIRECTIONS["coronal"])
    _canonical_spacing_plan(predictor, tmp_path / "air")
    code, out = predict(tmp_path, str(tmp_path / "air"), "--format", "dicom-seg")
    assert code == 0, out
    assert "warning" in out and "no class found" in out
    dcm = tmp_path / "air_seg.dcm"
    assert dcm.is_file() and not (tmp_path / "air_seg.nii.gz").exists()
    seg = hd.seg.segread(dcm)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "bone"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (tmp_path / "air").iterdir()]
    assert not seg_frames(seg, uids).any()


def test_nifti_input_gets_one_line_and_the_batch_goes_on(tmp_path: Path, crop: np.ndarray,
                                                         predictor: Predictor) -> None:
    make_series(tmp_path / "ct", crop, DIRECTIONS["coronal"])
    _canonical_spacing_plan(predictor, tmp_path / "ct")
    nib.save(nib.Nifti1Image(crop.astype(np.float32), np.diag([*SPACING, 1.0])), tmp_path / "scan.nii.gz")
    out_dir = tmp_path / "out"
    code, out = predict(tmp_path, str(tmp_path / "scan.nii.gz"), str(tmp_path / "ct"), "-o", str(out_dir),
                        "--format", "nifti,dicom-seg")
    assert code == 1, out
    lines = [line for line in out.splitlines() if "DICOM-SEG needs a DICOM source" in line]
    assert lines and all("scan.nii.gz" in line for line in lines)
    assert (out_dir / "scan_seg.nii.gz").is_file() and not (out_dir / "scan_seg.dcm").exists()
    assert (out_dir / "ct_seg.nii.gz").is_file() and (out_dir / "ct_seg.dcm").is_file()  # the next case was done

    code, out = predict(tmp_path, str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "only"), "--format", "dicom-seg")
    assert code == 1 and "DICOM-SEG needs a DICOM source" in out
    assert not (tmp_path / "only").exists() or not any((tmp_path / "only").iterdir())

    code, out = predict(tmp_path, str(tmp_path / "ct"), "--format", "nifti,rtstruct")
    assert code == 2 and "--format" in out and "dicom-seg" in out


def test_never_replaces_a_dcm_segment_did_not_write(tmp_path: Path, crop: np.ndarray, predictor: Predictor) -> None:
    files = make_series(tmp_path / "ct", crop, DIRECTIONS["coronal"])
    _canonical_spacing_plan(predictor, tmp_path / "ct")
    foreign = tmp_path / "foreign.dcm"
    shutil.copy(files[0], foreign)  # a DICOM file of someone else's, e.g. a SEG from another tool
    before = foreign.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, out = predict(tmp_path, str(tmp_path / "ct"), "-o", str(foreign), "--format", "dicom-seg", *extra)
        assert code == 1 and "not written by segment" in out
        assert foreign.read_bytes() == before

    ours = tmp_path / "ours.dcm"
    assert predict(tmp_path, str(tmp_path / "ct"), "-o", str(ours), "--format", "dicom-seg")[0] == 0
    uid = pydicom.dcmread(ours, stop_before_pixels=True).SOPInstanceUID
    code, out = predict(tmp_path, str(tmp_path / "ct"), "-o", str(ours), "--format", "dicom-seg")
    assert code == 1 and "--overwrite" in out
    assert predict(tmp_path, str(tmp_path / "ct"), "-o", str(ours), "--format", "dicom-seg", "--overwrite")[0] == 0
    assert pydicom.dcmread(ours, stop_before_pixels=True).SOPInstanceUID != uid
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left

    # never into the series folder: it would become a second series there
    code, out = predict(tmp_path, str(tmp_path / "ct"), "-o", str(tmp_path / "ct"), "--format", "dicom-seg")
    assert code == 1 and "second series" in out and not (tmp_path / "ct" / "ct_seg.dcm").exists()


def test_missing_frame_of_reference_is_one_line_before_compute(tmp_path: Path, crop: np.ndarray,
                                                               predictor: Predictor,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_series(tmp_path / "ct", crop, DIRECTIONS["coronal"])
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    monkeypatch.setattr(predictor.model, "forward", lambda x: pytest.fail("computed although no SEG can be made"))
    code, out = predict(tmp_path, str(tmp_path / "ct"), "--format", "nifti,dicom-seg")
    assert code == 1 and "FrameOfReferenceUID" in out
    assert not (tmp_path / "ct_seg.nii.gz").exists() and not (tmp_path / "ct_seg.dcm").exists()


@pytest.mark.parametrize("name, category, kind", [
    ("liver", "AnatomicalStructure", "Liver"), ("Spleen", "AnatomicalStructure", "Spleen"),
    ("kidney_left", "AnatomicalStructure", "Kidney"), ("hippocampus", "AnatomicalStructure", "Hippocampus"),
    ("lungs", "AnatomicalStructure", "Lung"), ("heart", "AnatomicalStructure", "Heart"),
    ("aorta", "AnatomicalStructure", "Aorta"), ("bone", "AnatomicalStructure", "Bone"),
    ("liver tumour", "MorphologicallyAbnormalStructure", "Neoplasm"), ("Anterior", "Tissue", "Tissue"),
])
def test_class_names_get_snomed_codes(name: str, category: str, kind: str) -> None:
    got_category, got_type = property_codes(name)
    assert got_category == getattr(codes.cid7150, category) and got_type == getattr(codes.SCT, kind)
