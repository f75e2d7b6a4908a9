"""Label values with gaps ({0, 1, 3}): trained as consecutive classes, written back as the dataset's own values."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segment.config import Config, ModelConfig, load_config
from segment.data.check import check_dataset
from segment.data.labels import decode_labels, encode_labels
from segment.data.plan import Plan, make_plan
from segment.data.preprocess import prepare_label
from segment.errors import InputError
from segment.inference.predictor import Predictor
from segment.io.case import read_case
from segment.io.dataset import discover
from segment.io.image import read_label
from tests.fixed_nets import FixedConv

SHAPE = (12, 10, 8)
META = {"modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "a", "3": "c"}}


def _label(seed: int, high: int = 3) -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[1 + seed:5, 1:5, 1:4] = 1
    out[6:10, 5:9, 4:7] = high
    return out


def _msd(root: Path, values: dict[str, int], meta: dict | None = None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(meta or META))
    for seed, (name, high) in enumerate(values.items()):
        image = np.random.default_rng(seed).normal(100, 10, SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(_label(seed, high), np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
    return root


def test_declared_values_with_a_gap_become_consecutive_classes(tmp_path: Path) -> None:
    root = _msd(tmp_path / "ds", {"a": 3, "b": 3, "c": 3})
    dataset = discover(root)
    assert dataset.labels == {0: "bg", 1: "a", 3: "c"} and not dataset.skipped
    check_dataset(dataset, workers=2, progress=False)
    plan, _ = make_plan(dataset, load_config())
    assert plan.labels == {0: "bg", 1: "a", 2: "c"} and plan.label_values == [0, 1, 3]
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # survives plan.json and checkpoints

    case = dataset.cases[0]
    raw = read_label(case.label)
    classes = encode_labels(raw, plan, case.label)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert np.array_equal(classes == 2, raw == 3) and np.array_equal(classes == 1, raw == 1)
    assert np.array_equal(decode_labels(classes, plan), raw)
    data = read_case(case.images, case.label)  # the training label: encoded (load_case), then on the plan's grid
    label = prepare_label(encode_labels(data.label, plan, case.label), data.geometry, plan)
    assert label.shape == (1, *SHAPE) and set(torch.unique(label).tolist()) == {0, 1, 2}
    tensor = torch.from_numpy(raw.astype(np.int64))
    assert torch.equal(decode_labels(encode_labels(tensor, plan), plan), tensor)


def test_a_value_missing_from_dataset_json_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = _msd(tmp_path / "ds", {"a": 3, "b": 2, "c": 3})
    with pytest.raises(InputError, match=r"labelsTr/b\.nii\.gz: label value 2 found, not declared in dataset\.json "
                                         r"\(declared: 0, 1, 3\)"):
        discover(root, on_problem="error")
    with pytest.raises(InputError, match=r"(?s)1 of 3 cases.*\n  \S*labelsTr/b\.nii\.gz: label value 2 found"):
        check_dataset(discover(root, check=False), progress=False)


def test_encoding_refuses_a_value_no_class_has() -> None:
    plan = Plan([1.0] * 3, [8] * 3, 2, [4, 8], "mri", 1, {0: "bg", 1: "a", 2: "c"}, label_values=[0, 1, 3])
    bad = np.array([[[0, 1, 2, 3]]], np.int16)
    with pytest.raises(InputError, match=r"x\.nii\.gz: label value 2 found, but the plan's classes have the values 0, 1, 3"):
        encode_labels(bad, plan, "x.nii.gz")
    identity = Plan([1.0] * 3, [8] * 3, 2, [4, 8], "mri", 1, {0: "bg", 1: "a"})
    assert encode_labels(bad, identity) is bad and decode_labels(bad, identity) is bad


def test_plain_folder_with_gaps_gets_the_values_it_holds(tmp_path: Path) -> None:
    for seed, name in enumerate(("p", "q")):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4)), tmp_path / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(_label(seed), np.eye(4)), tmp_path / "labels" / f"{name}.nii.gz")
    assert discover(tmp_path).labels == {0: "background", 1: "class_1", 3: "class_3"}
    dataset = discover(tmp_path, check=False)
    check_dataset(dataset, progress=False)
    assert dataset.labels == {0: "background", 1: "class_1", 3: "class_3"}
    plan, _ = make_plan(dataset, load_config())
    assert len(plan.labels) == 3 and plan.label_values == [0, 1, 3]


def ThreeClassNet() -> FixedConv:  # noqa: N802
    """Class 0 below 50, class 1 from 50 to 100, class 2 above 100 (raw intensities)."""
    return FixedConv([0.0, 1.0, 2.0], [0.0, -50.0, -150.0])


def test_prediction_writes_the_dataset_values_not_class_indices(tmp_path: Path) -> None:
    plan = Plan(spacing=[2.0, 2.0, 2.0], patch_size=[16, 16, 8], batch_size=2, features=[4, 8], modality="ct",
                channels=1, labels={0: "bg", 1: "a", 2: "c"}, ct_clip=[-1e4, 1e4], ct_mean=0.0, ct_std=1.0,
                label_values=[0, 1, 3])  # plan spacing = scan spacing: no resampling, labels known voxel for voxel
    image = np.zeros((20, 18, 10), np.float32)
    image[2:6, 2:6, 2:6] = 75.0  # class 1 -> value 1
    image[10:16, 8:14, 3:8] = 200.0  # class 2 -> value 3
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "scan.nii.gz")
    predictor = Predictor(ThreeClassNet(), plan, Config(model=ModelConfig(out_channels=3, features=[4, 8])),
                          device="cpu", precision="32")
    assert predictor.label_names == {0: "bg", 1: "a", 3: "c"}
    result = predictor.predict_file(tmp_path / "scan.nii.gz", tmp_path / "seg.nii.gz")
    written = np.asarray(nib.load(result["output"]).dataobj)
    assert set(np.unique(written)) == {0, 1, 3}
    assert np.array_equal(written == 3, image == 200.0) and np.array_equal(written == 1, image == 75.0)
    assert result["volumes_ml"] == pytest.approx({"a": 64 * 8 / 1000, "c": 180 * 8 / 1000})
