"""Mirror axes: ordered label layouts are detected and reported; --tta mirrors only the axes training mirrored."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segment.config import Config, DataConfig, validate
from segment.data.pipeline import augmentations
from segment.data.fingerprint import label_centroids, ordered_axes
from segment.data.plan import Plan, make_plan
from segment.errors import ConfigError
from segment.engine.sliding import flip_sets, sliding_logits, softmax_probabilities
from segment.io.dataset import discover
from segment.io.image import Geometry


def _write_pairs(root: Path, n: int, order_along: int | None, seed: int = 0) -> Path:
    """n cases with labels 1 and 2 as blobs; with `order_along`, label 2 always lies further along that RAS axis."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        lab = np.zeros((24, 24, 24), np.uint8)
        a, b = rng.integers(5, 19, 3), rng.integers(5, 19, 3)
        if order_along is not None:
            a[order_along], b[order_along] = 6, 17
        for value, c in ((1, a), (2, b)):
            lab[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = value
        img = rng.normal(0, 1, lab.shape).astype(np.float32) + lab
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    return root


def test_centroids_are_in_canonical_axes_whatever_the_file_orientation() -> None:
    lab = np.zeros((10, 12, 8), np.uint8)
    lab[1, 2, 3] = 1
    ras = label_centroids(lab, Geometry.from_affine(np.diag([2.0, 1.0, 1.0, 1.0]), lab.shape))
    assert ras == {1: [2.0, 2.0, 3.0]}
    # the same voxels stored left-to-right flipped (LAS): the label sits at the other end of RAS axis 0
    las = label_centroids(lab, Geometry.from_affine(np.diag([-2.0, 1.0, 1.0, 1.0]), lab.shape))
    assert las == {1: [16.0, 2.0, 3.0]}


def test_ordered_axes_finds_a_consistent_order_and_ignores_a_random_one() -> None:
    rng = np.random.default_rng(0)
    fixed = [{1: [rng.uniform(0, 9), 5.0, rng.uniform(0, 9)], 2: [rng.uniform(0, 9), 12.0, rng.uniform(0, 9)]} for _ in range(10)]
    found = ordered_axes(fixed)
    assert list(found) == [1]
    assert "label 2 is after label 1" in found[1]
    assert ordered_axes([{1: [0.0, 0.0, 0.0]}] * 10) == {}  # a single label has no order to keep
    assert ordered_axes(fixed[:2]) == {}  # too few cases to tell


def test_plan_reports_ordered_axes_and_the_config_chooses_what_to_mirror(tmp_path: Path) -> None:
    ordered = discover(_write_pairs(tmp_path / "ordered", 6, order_along=1))
    plan, fp = make_plan(ordered, Config())
    assert plan.mirror_axes == [0, 1, 2]  # every axis by default, as nnU-Net (measured best on hippocampus)
    assert list(fp["ordered_axes"]) == ["1"]
    free = discover(_write_pairs(tmp_path / "free", 6, order_along=None, seed=3))
    assert make_fp_axes(free) == []
    forced = Config(data=DataConfig(augment={"mirror_axes": [0, 2]}))
    assert make_plan(ordered, forced)[0].mirror_axes == [0, 2]


def make_fp_axes(dataset) -> list[str]:  # noqa: ANN001
    return list(make_plan(dataset, Config())[1]["ordered_axes"])


def test_mirror_axes_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="mirror_axes"):
        validate({"data": {"augment": {"mirror_axes": [0, 3]}}})
    assert validate({"data": {"augment": {"mirror_axes": [2, 0]}}}).data.augment.mirror_axes == [0, 2]


def test_training_flips_only_the_planned_axes() -> None:
    aug = Config().data.augment
    flips = [t for t in augmentations(aug, 3, [0, 2]) if type(t).__name__ == "RandFlipd"]
    assert [t.flipper.spatial_axis for t in flips] == [0, 2]
    assert not [t for t in augmentations(aug, 3, []) if type(t).__name__ == "RandFlipd"]
    assert len([t for t in augmentations(aug, 3, None) if type(t).__name__ == "RandFlipd"]) == 3


def test_tta_mirrors_only_the_planned_axes() -> None:
    assert flip_sets(3, [0, 2]) == [(), (2,), (4,), (2, 4)]
    assert flip_sets(3, []) == [()]
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 9, 10, 11)
    with torch.inference_mode():
        plain = softmax_probabilities(net, x, [8, 8, 8])
        none = softmax_probabilities(net, x, [8, 8, 8], tta=True, mirror_axes=[])
        one = softmax_probabilities(net, x, [8, 8, 8], tta=True, mirror_axes=[1])
        expected = (plain + torch.softmax(sliding_logits(net, x.flip(3), [8, 8, 8]), 1)[0].flip(2)) / 2
    torch.testing.assert_close(none, plain)
    torch.testing.assert_close(one, expected, atol=1e-5, rtol=1e-5)


def test_plans_written_before_mirror_axes_existed_mirror_every_axis() -> None:
    old = {"spacing": [1, 1, 1], "patch_size": [16, 16, 16], "batch_size": 2, "features": [4, 8], "modality": "mri",
           "channels": 1, "labels": {"0": "background", "1": "fg"}}
    assert Plan.from_dict(old).tta_axes() == [0, 1, 2]


def test_training_notes_a_mirrored_axis_along_which_labels_are_ordered(capsys: pytest.CaptureFixture[str]) -> None:
    from segment.train.setup import warn_ordered_axes

    plan = Plan(spacing=[1, 1, 1], patch_size=[16, 16, 16], batch_size=2, features=[4, 8], modality="mri", channels=1,
                labels={0: "background", 1: "a", 2: "b"}, mirror_axes=[0, 1, 2])
    warn_ordered_axes({"1": "label 2 is after label 1 in 100% of cases"}, plan)
    err = capsys.readouterr().err
    assert "mirroring axis 1 (back-front)" in err and "mirror_axes" in err
    plan.mirror_axes = [0, 2]
    warn_ordered_axes({"1": "label 2 is after label 1 in 100% of cases"}, plan)
    assert capsys.readouterr().err == ""
