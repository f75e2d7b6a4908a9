"""Multi-modal data: MSD 4D files and nnU-Net _0000/_0001 files are the same channels, each normalised by its modality."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segment.config import load_config
from segment.data.check import check_dataset
from segment.data.plan import Plan, make_plan
from segment.data.preprocess import load_case, normalise
from segment.io.dataset import discover

SHAPE = (10, 9, 8)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT channel with outliers, MR channel, label) of one synthetic case."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(40, 300, SHAPE).astype(np.float32)
    ct[0, 0, :3] = [-3000.0, 5000.0, 9000.0]  # far outside any sensible window: clipping must act
    mr = rng.normal(500 + 100 * seed, 80 + 10 * seed, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[2 + seed:7, 2:7, 1:6] = 1
    label[0, 0, 1] = 1  # an outlier inside the foreground, so the dataset's percentiles clip it
    return ct, mr, label


@pytest.fixture(scope="module")
def msd_4d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 cases, each ONE 4D image (x, y, z, 2): channel 0 CT, channel 1 MRI, as MSD ships BrainTumour/Prostate."""
    root = tmp_path_factory.mktemp("msd4d")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "name": "synthetic", "modality": {"0": "CT", "1": "MRI"}, "labels": {"0": "background", "1": "lesion"}}))
    for seed in range(3):
        ct, mr, label = _case(seed)
        nib.save(nib.Nifti1Image(np.stack([ct, mr], axis=-1), np.eye(4)), root / "imagesTr" / f"case_{seed:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"case_{seed:03d}.nii.gz")
    return root


def test_4d_cases_are_discovered_checked_planned_and_normalised_per_channel(msd_4d: Path) -> None:
    dataset = discover(msd_4d)
    assert [c.name for c in dataset.cases] == ["case_000", "case_001", "case_002"] and not dataset.skipped
    assert dataset.channels == 2 and all(len(c.images) == 1 for c in dataset.cases)
    assert dataset.channel_modalities == ["ct", "mri"]
    check_dataset(dataset, workers=2, progress=False)
    assert len(dataset.cases) == 3

    plan, fp = make_plan(dataset, load_config())
    assert plan.channels == 2 and plan.channel_modalities == ["ct", "mri"] and plan.modality == "mixed"
    assert plan.spacing == [1.0, 1.0, 1.0] and fp["fg_channels"] == [0]
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

    # hand-computed: CT statistics over the foreground of the CT channel of every case; the MR channel per image
    cases = [_case(seed) for seed in range(3)]
    fg = np.concatenate([ct[label > 0] for ct, _, label in cases]).astype(np.float64)
    lo, hi = np.percentile(fg, 0.5), np.percentile(fg, 99.5)
    mean, std = fg.mean(), fg.std() + 1e-8
    np.testing.assert_allclose(plan.ct_clip, [lo, hi], rtol=1e-5)
    np.testing.assert_allclose([plan.ct_mean, plan.ct_std], [mean, std], rtol=1e-5)
    for case, (ct, mr, label) in zip(dataset.cases, cases):
        item = load_case(case.images, case.label, plan)
        image = item["image"].numpy()
        assert image.shape == (2, *SHAPE) and item["label"].shape == (1, *SHAPE)
        np.testing.assert_allclose(image[0], (np.clip(ct, lo, hi) - mean) / std, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(image[1], (mr - mr.mean()) / mr.std(), rtol=1e-4, atol=1e-4)
        assert np.array_equal(item["label"][0].numpy(), label)


def test_plans_without_channel_modalities_still_normalise_every_channel_by_modality() -> None:
    old = {"spacing": [1.0, 1.0, 1.0], "patch_size": [8, 8, 8], "batch_size": 2, "features": [4, 8], "modality": "ct",
           "channels": 2, "labels": {"0": "background", "1": "a"}, "ct_clip": [-10.0, 10.0], "ct_mean": 2.0,
           "ct_std": 4.0}
    plan = Plan.from_dict(old)
    assert plan.channel_modalities is None and plan.label_values is None
    image = torch.linspace(-20, 20, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
    out = normalise(image.clone(), plan)
    assert torch.allclose(out, (image.clamp(-10, 10) - 2.0) / 4.0)
    mixed = Plan.from_dict({**old, "modality": "mixed", "channel_modalities": ["mri", "ct"]})
    out = normalise(image.clone(), mixed)
    assert torch.allclose(out[0], (image[0] - image[0].mean()) / image[0].std(unbiased=False), atol=1e-5)
    assert torch.allclose(out[1], (image[1].clamp(-10, 10) - 2.0) / 4.0)


def test_a_4d_file_with_the_wrong_number_of_volumes_is_named(msd_4d: Path, tmp_path: Path) -> None:
    root = tmp_path / "three"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text((msd_4d / "dataset.json").read_text())
    for name, volumes in (("a", 2), ("b", 3)):
        nib.save(nib.Nifti1Image(np.ones((*SHAPE, volumes), np.float32), np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(_case(0)[2], np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
    with pytest.warns(UserWarning, match=r"case b: channels \[0\] found, expected 0..1 .*it would need 2 volumes, it has 3"):
        dataset = discover(root)
    assert [c.name for c in dataset.cases] == ["a"]


def _write_layouts(real_ct_mr: Path, root: Path) -> tuple[Path, Path]:
    """The real MR and a second channel derived from it (inverted contrast, as T2 vs ADC), as ONE 4D file per case
    (MSD) and as _0000/_0001 files (nnU-Net); same label map, same dataset.json."""
    source = nib.load(real_ct_mr / "images" / "mr_example.nii.gz")
    t2 = np.asarray(source.dataobj, dtype=np.float32)
    adc = (t2.max() - t2) * 0.5 + 7.0
    label = (t2 > np.percentile(t2, 90)).astype(np.uint8)
    meta = json.dumps({"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "bright"}})
    msd, nnunet = root / "msd", root / "nnunet"
    for folder in (msd, nnunet):
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        (folder / "dataset.json").write_text(meta)
        nib.save(nib.Nifti1Image(label, source.affine), folder / "labelsTr" / "mr.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([t2, adc], axis=-1), source.affine), msd / "imagesTr" / "mr.nii.gz")
    nib.save(nib.Nifti1Image(t2, source.affine), nnunet / "imagesTr" / "mr_0000.nii.gz")
    nib.save(nib.Nifti1Image(adc, source.affine), nnunet / "imagesTr" / "mr_0001.nii.gz")
    return msd, nnunet


def test_real_mr_as_4d_and_as_channel_files_preprocess_identically(real_ct_mr: Path, tmp_path: Path) -> None:
    msd, nnunet = _write_layouts(real_ct_mr, tmp_path)
    cfg = load_config(overrides=["data.target_spacing=[2.5,2.5,2.5]"])  # resampled too, not just copied
    items, plans = [], []
    for root, files in ((msd, ["mr.nii.gz"]), (nnunet, ["mr_0000.nii.gz", "mr_0001.nii.gz"])):
        dataset = discover(root)
        assert dataset.channels == 2 and [p.name for p in dataset.cases[0].images] == files
        check_dataset(dataset, progress=False)
        plan, _ = make_plan(dataset, cfg)
        assert plan.channel_modalities == ["mri", "mri"] and plan.modality == "mri"
        plans.append(plan)
        items.append(load_case(dataset.cases[0].images, dataset.cases[0].label, plan))
    assert plans[0] == plans[1]
    first, second = items
    assert first["image"].shape[0] == 2 and first["image"].shape == second["image"].shape
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])
    for channel in first["image"]:  # each channel z-scored over its own volume
        assert abs(float(channel.mean())) < 1e-4 and abs(float(channel.std(unbiased=False)) - 1) < 1e-3
