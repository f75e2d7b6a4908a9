"""nnU-Net's blur and simulated low resolution as opt-in augmentations: they change the image, never the label, and
the default pipeline (both off) is the one it was before they existed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import monai.transforms as mt

from segment.config import AugmentConfig, validate
from segment.data.pipeline import augmentations


def _patch() -> dict:
    g = np.random.default_rng(0)
    img = torch.from_numpy(g.normal(0, 1, (1, 24, 28, 20)).astype(np.float32))
    lab = torch.zeros((1, 24, 28, 20))
    lab[:, 6:18, 8:20, 5:15] = 1
    return {"image": img, "label": lab}


def _only(aug: AugmentConfig, kind: type) -> mt.Transform:
    found = [t for t in augmentations(aug, 3) if isinstance(t, kind)]
    assert len(found) == 1
    return found[0]


def test_defaults_leave_both_out() -> None:
    aug = AugmentConfig()
    assert aug.blur_prob == 0 and aug.lowres_prob == 0
    kinds = [type(t) for t in augmentations(aug, 3)]
    assert mt.RandGaussianSmoothd not in kinds and mt.RandSimulateLowResolutiond not in kinds
    # the pipeline of before: 3 flips, affine, scale/shift/contrast, noise
    assert kinds == [mt.RandFlipd] * 3 + [mt.RandAffined, mt.RandScaleIntensityd, mt.RandShiftIntensityd,
                                          mt.RandAdjustContrastd, mt.RandGaussianNoised]


@pytest.mark.parametrize("field,kind", [("blur_prob", mt.RandGaussianSmoothd),
                                        ("lowres_prob", mt.RandSimulateLowResolutiond)])
def test_blur_and_lowres_smooth_the_image_and_keep_the_label(field: str, kind: type) -> None:
    t = _only(AugmentConfig(**{field: 1.0}), kind)
    t.set_random_state(3)
    item = _patch()
    out = t({k: v.clone() for k, v in item.items()})
    img, before = torch.as_tensor(out["image"]), item["image"]
    assert img.shape == before.shape
    assert torch.equal(torch.as_tensor(out["label"]), item["label"])
    # white noise smoothed: neighbouring voxels become correlated, the variance drops
    assert float(img.var()) < 0.8 * float(before.var())
    d_before = float((before[..., 1:] - before[..., :-1]).abs().mean())
    d_after = float((img[..., 1:] - img[..., :-1]).abs().mean())
    assert d_after < 0.8 * d_before


def test_probabilities_are_checked_and_settable_from_the_command_line() -> None:
    cfg = validate({"data": {"augment": {"blur_prob": 0.2, "lowres_prob": 0.25}}})
    assert cfg.data.augment.blur_prob == 0.2 and cfg.data.augment.lowres_prob == 0.25
    with pytest.raises(Exception, match="blur_prob"):
        validate({"data": {"augment": {"blur_prob": 1.5}}})


def test_both_run_on_2d_patches() -> None:
    g = np.random.default_rng(1)
    item = {"image": torch.from_numpy(g.normal(0, 1, (1, 20, 24)).astype(np.float32)), "label": torch.zeros(1, 20, 24)}
    out = dict(item)
    for t in augmentations(AugmentConfig(blur_prob=1.0, lowres_prob=1.0, rotate_prob=0, intensity_prob=0,
                                         noise_prob=0, flip_prob=0), 2):
        out = t(out)
    img = torch.as_tensor(out["image"])
    assert img.shape == (1, 20, 24) and float(img.var()) < 0.8 * float(item["image"].var())
