"""Dataset discovery: pairs by name, reports what does not pair, and never trains an image against a wrong label."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segment.errors import GeometryError, InputError
from segment.io.dataset import Case, check_case, discover
from segment.io.dataset_json import declared_modality
from segment.io.image import read_geometry, read_image, read_label

SHAPE = (4, 5, 6)


def put(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, np.uint8) if data is None else data
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def labels(high: int = 2) -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[1, 1, 1:high + 1] = np.arange(1, high + 1)
    return out


def msd(root: Path, names: list[str], meta: dict | None = None, channels: int = 1) -> Path:
    """Tiny MSD / nnU-Net folder: imagesTr/<name>[_000c].nii.gz + labelsTr/<name>.nii.gz."""
    meta = meta or {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}}
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for name in names:
        for c in range(channels):
            suffix = f"_{c:04d}" if channels > 1 else ""
            put(root / "imagesTr" / f"{name}{suffix}.nii.gz", np.full(SHAPE, c, np.float32))
        put(root / "labelsTr" / f"{name}.nii.gz", labels())
    return root


def test_hippocampus_is_found_whole(hippocampus: Path) -> None:
    start = time.perf_counter()
    ds = discover(hippocampus)
    assert time.perf_counter() - start < 10
    assert len(ds.cases) == 200 and not ds.unpaired and not ds.skipped
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert ds.modality == "mri" and ds.channels == 1
    assert all(c.images[0].name == c.label.name == f"{c.name}.nii.gz" for c in ds.cases)
    float_labels = [c.label for c in ds.cases if nib.load(c.label).get_data_dtype() == np.float32]
    assert float_labels, "the MSD copy should hold float32-stored labels"
    for path in float_labels:
        values = read_label(path)
        assert values.dtype.kind == "i" and set(np.unique(values)) <= {0, 1, 2}
    by_dtype = {read_geometry(c.images[0]).dtype: c.images[0] for c in ds.cases}
    assert {"uint8", "float32"} <= set(by_dtype)
    for path in by_dtype.values():
        image, _ = read_image(path)
        assert image.dtype == np.float32 and image.max() > 0


def test_nnunet_v2_channels_and_json_forms(tmp_path: Path) -> None:
    meta = {"channel_names": {"0": "CT", "1": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "file_ending": ".nii.gz"}
    ds = discover(msd(tmp_path, ["case_001", "case_002"], meta, channels=2))
    assert [c.name for c in ds.cases] == ["case_001", "case_002"] and ds.channels == 2
    assert [p.name for p in ds.cases[0].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert ds.labels == {0: "background", 1: "liver", 2: "tumour"} and ds.modality == "ct"


def test_modality_names() -> None:
    assert declared_modality({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}) == ("mri", 4)
    assert declared_modality({"channel_names": {"0": "CT"}}) == ("ct", 1)
    assert declared_modality({"modality": {"0": "PET"}}) == ("pet", 1)
    assert declared_modality({}) == ("unknown", None)


def test_plain_folders_infer_classes(tmp_path: Path) -> None:
    for name in ("b", "a"):
        put(tmp_path / "images" / f"{name}.nii.gz")
        put(tmp_path / "labels" / f"{name}.nii.gz", labels(3 if name == "a" else 1))
    ds = discover(tmp_path)
    assert [c.name for c in ds.cases] == ["a", "b"] and ds.modality == "unknown"
    assert ds.labels == {0: "background", 1: "class_1", 2: "class_2", 3: "class_3"}
    assert discover(tmp_path, check=False).labels == {}  # unknown without reading the labels


def test_single_folder_with_suffixes(tmp_path: Path) -> None:
    for name, suffix in (("p1", "_seg"), ("p2", "_mask"), ("p3", "_labels"), ("p4", "_label")):
        put(tmp_path / f"{name}.nii.gz")
        put(tmp_path / f"{name}{suffix}.nii.gz", labels())
    (tmp_path / "notes.txt").write_text("ignored")
    ds = discover(tmp_path)
    assert [(c.name, c.label.name) for c in ds.cases] == [
        ("p1", "p1_seg.nii.gz"), ("p2", "p2_mask.nii.gz"), ("p3", "p3_labels.nii.gz"), ("p4", "p4_label.nii.gz")]


def test_unpaired_files_are_reported(tmp_path: Path) -> None:
    root = msd(tmp_path, ["a", "b"])
    put(root / "imagesTr" / "lonely.nii.gz")
    put(root / "labelsTr" / "orphan.nii.gz", labels())
    with pytest.warns(UserWarning, match="2 files without a partner"):
        ds = discover(root)
    assert [c.name for c in ds.cases] == ["a", "b"]
    assert [p.name for p in ds.unpaired] == ["lonely.nii.gz", "orphan.nii.gz"]


def test_broken_links_are_named_not_dropped(tmp_path: Path) -> None:
    """A link to a moved or unmounted scan is a problem of its case, naming link and target; not a silent gap that
    leaves its partner "without a partner"."""
    root = msd(tmp_path, ["a", "b", "c", "d"])
    for sub, name in (("imagesTr", "b"), ("labelsTr", "c")):
        (root / sub / f"{name}.nii.gz").unlink()
        (root / sub / f"{name}.nii.gz").symlink_to(tmp_path / "gone" / f"{name}.nii.gz")
    (root / "imagesTr" / "e.nii.gz").symlink_to(tmp_path / "gone" / "e.nii.gz")  # no label either
    (root / "imagesTr" / "d.nii.gz").unlink()
    (root / "imagesTr" / "d.nii.gz").mkdir()  # a folder where the image should be: the same kind of problem
    with pytest.warns(UserWarning) as caught:
        ds = discover(root)
    assert len(caught) == 4 and all(str(w.message).startswith("skipping ") for w in caught)  # one per problem
    assert [c.name for c in ds.cases] == ["a"] and not ds.unpaired
    assert ds.skipped == {
        "b": f"case b: {root}/imagesTr/b.nii.gz: broken link to {tmp_path}/gone/b.nii.gz (no such file)",
        "c": f"case c: {root}/labelsTr/c.nii.gz: broken link to {tmp_path}/gone/c.nii.gz (no such file)",
        "d": f"case d: {root}/imagesTr/d.nii.gz: is a folder, not an image file",
        "e.nii.gz": f"{root}/imagesTr/e.nii.gz: broken link to {tmp_path}/gone/e.nii.gz (no such file)",
    }
    with pytest.raises(InputError, match=r"imagesTr/b\.nii\.gz: broken link to .*gone/b\.nii\.gz"):
        discover(root, on_problem="error")


def test_dataset_json_training_list_and_count_are_compared_with_the_folders(tmp_path: Path) -> None:
    """The folders decide what is trained on (as nnU-Net v2), but a curator's list that disagrees is said, once."""
    import warnings as _warnings

    def notes(meta: dict) -> list[str]:
        root = msd(tmp_path / str(len(list(tmp_path.iterdir()))), ["a", "b", "c"], meta)
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            assert [c.name for c in discover(root).cases] == ["a", "b", "c"]
        return [str(w.message).replace(str(root), "ROOT") for w in caught]

    base = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}}
    entry = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("a", "b", "c", "d")]
    assert notes({**base, "numTraining": 3, "training": entry[:3]}) == []
    assert notes({**base, "numTraining": 4, "training": entry}) == [
        'ROOT/dataset.json: 1 case(s) listed under "training" have no image/label pair in the folders (d) (the files '
        "in the folders decide what is used)"]
    assert notes({**base, "training": entry[:1]}) == [
        'ROOT/dataset.json: 2 pair(s) in the folders are not listed under "training" and are used anyway (b, c) (the '
        "files in the folders decide what is used)"]
    assert notes({**base, "numTraining": 200}) == [
        "ROOT/dataset.json: numTraining is 200 but 3 image/label pair(s) are in the folders (the files in the folders "
        "decide what is used)"]


def test_geometry_mismatch_is_skipped_or_raised(tmp_path: Path) -> None:
    root = msd(tmp_path, ["a", "b"])
    put(root / "labelsTr" / "b.nii.gz", labels(), np.diag([1.0, 1.0, 3.0, 1.0]))
    with pytest.warns(UserWarning, match=r"labelsTr/b\.nii\.gz does not share the voxel grid"):
        ds = discover(root)
    assert [c.name for c in ds.cases] == ["a"] and "imagesTr/b.nii.gz" in ds.skipped["b"]
    with pytest.raises(GeometryError, match=r"label .*labelsTr/b\.nii\.gz .* image .*imagesTr/b\.nii\.gz"):
        discover(root, on_problem="error")
    assert len(discover(root, check=False).cases) == 2  # the header check is what catches it


def test_label_values_beyond_classes_or_fractional(tmp_path: Path) -> None:
    root = msd(tmp_path, ["a", "b", "c"])
    put(root / "labelsTr" / "b.nii.gz", labels(3))
    put(root / "labelsTr" / "c.nii.gz", labels().astype(np.float32) * 0.5)
    with pytest.warns(UserWarning):
        ds = discover(root)
    assert [c.name for c in ds.cases] == ["a"]
    assert "label value 3 found, but only 3 classes (0..2)" in ds.skipped["b"]
    assert "non-integer values" in ds.skipped["c"] and "labelsTr/c.nii.gz" in ds.skipped["c"]
    with pytest.raises(InputError, match=r"labelsTr/b\.nii\.gz: label value 3"):
        discover(root, on_problem="error")


def test_missing_channel_is_skipped(tmp_path: Path) -> None:
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1, "y": 2}}
    root = msd(tmp_path, ["a", "b"], meta, channels=2)
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.warns(UserWarning, match=r"case b: channels \[0\] found, expected 0..1"):
        ds = discover(root)
    assert [c.name for c in ds.cases] == ["a"] and ds.modality == "mri"


def test_empty_and_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothing: dataset folder not found"):
        discover(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no usable image/label pairs"):
        discover(tmp_path / "empty")
    (tmp_path / "half" / "imagesTr").mkdir(parents=True)
    with pytest.raises(InputError, match=r"half/labelsTr: label folder not found"):
        discover(tmp_path / "half")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad/dataset\.json: not valid JSON"):
        discover(tmp_path / "bad")


def test_all_cases_skipped_is_an_error_with_the_reason(tmp_path: Path) -> None:
    root = msd(tmp_path, ["a"])
    put(root / "labelsTr" / "a.nii.gz", labels(5))
    with pytest.warns(UserWarning), pytest.raises(InputError, match=r"1 skipped, e\.g\. .*label value 5"):
        discover(root)


def test_check_case_names_the_files(tmp_path: Path) -> None:
    image = put(tmp_path / "img.nii.gz")
    good = put(tmp_path / "good.nii.gz", labels())
    moved = put(tmp_path / "moved.nii.gz", labels(), np.diag([-1.0, 1.0, 2.0, 1.0]))
    check_case(Case("ok", (image,), good), num_classes=3)
    with pytest.raises(GeometryError, match=r"moved\.nii\.gz.*img\.nii\.gz.*orientation LAS vs RAS"):
        check_case(Case("bad", (image,), moved), num_classes=3)
    with pytest.raises(InputError, match=r"good\.nii\.gz: label value 2 found, but only 2 classes"):
        check_case(Case("few", (image,), good), num_classes=2)
