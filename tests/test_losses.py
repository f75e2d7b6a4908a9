"""Deep-supervision loss against a hand computation: weights 1, 1/2, 1/4 (normalised to sum 1), Dice + cross-entropy per
level, and each level's target the nearest-neighbour downsample of the centre-cropped label."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segment.config import Config, ModelConfig, TrainConfig
from segment.data.plan import Plan
from segment.train.module import SegmentationModule

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # classes


def _module(dice_weight: float = 1.0, ce_weight: float = 1.0) -> SegmentationModule:
    cfg = Config(model=ModelConfig(features=[4, 8], out_channels=K),
                 train=TrainConfig(dice_weight=dice_weight, ce_weight=ce_weight))
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[8, 8, 8], batch_size=2, features=[4, 8], modality="mri",
                channels=1, labels={0: "background", 1: "a", 2: "b"})
    return SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict())


def dice_ce(logits: torch.Tensor, target: torch.Tensor, wd: float = 1.0, wc: float = 1.0) -> torch.Tensor:
    """Written out, in float64: softmax Dice over (batch, space) per class incl. background (smooth 1e-5), mean over
    classes; plus mean cross-entropy over voxels."""
    logits = logits.double()
    p = logits.softmax(1)
    oh = F.one_hot(target[:, 0], logits.shape[1]).movedim(-1, 1).double()
    dims = (0, *range(2, logits.ndim))
    inter, ref, pred = (p * oh).sum(dims), oh.sum(dims), p.sum(dims)
    dice = (1 - (2 * inter + 1e-5) / (ref + pred + 1e-5)).mean()
    ce = F.cross_entropy(logits, target[:, 0])
    return wd * dice + wc * ce


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _label(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, K, shape, generator=torch.Generator().manual_seed(seed))


def test_three_levels_are_the_normalised_weighted_sum_of_dice_ce_on_nearest_targets() -> None:
    label = _label((2, 1, 8, 8, 8), 0)
    outputs = [_random((2, K, 8, 8, 8), 1), _random((2, K, 4, 4, 4), 2), _random((2, K, 2, 2, 2), 3)]
    # nearest neighbour (PyTorch's: source index floor(i * in/out)) keeps voxels 0, 2, 4, 6 at 1/2 and 0, 4 at 1/4
    targets = [label, label[..., ::2, ::2, ::2], label[..., ::4, ::4, ::4]]
    per_level = [dice_ce(o, t) for o, t in zip(outputs, targets)]
    expected = (1.0 * per_level[0] + 0.5 * per_level[1] + 0.25 * per_level[2]) / 1.75
    got = _module()._supervised_loss(outputs, label)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)

    # the label is such that other downsamplings give other targets, and so another loss: the test can tell them apart
    others = {
        "odd voxels": [label, label[..., 1::2, 1::2, 1::2], label[..., 2::4, 2::4, 2::4]],
        "max pooling": [label, F.max_pool3d(label.float(), 2).long(), F.max_pool3d(label.float(), 4).long()],
    }
    for name, alt in others.items():
        assert not torch.equal(alt[1], targets[1]) and not torch.equal(alt[2], targets[2]), name
        wrong = sum(w * dice_ce(o, t) for w, o, t in zip((1.0, 0.5, 0.25), outputs, alt)) / 1.75
        assert abs(float(wrong) - float(got)) > 1e-3, name
    # and equal weights are not what it does either
    assert abs(float(sum(per_level) / 3) - float(got)) > 1e-3


def test_valid_mode_targets_are_centre_cropped_then_nearest_downsampled() -> None:
    """Label 10x12x10, main output 6x8x6 (valid convolutions), aux outputs 3x4x3 and 2x2x2.

    Level 0: crop to 6x8x6 (start 2, 2, 2).  Level 1: footprint 2*(3,4,3) = 6x8x6, same crop, then every 2nd voxel:
    label[2:8:2, 2:10:2, 2:8:2].  Level 2: footprint 4*(2,2,2) = 8x8x8, crop start (1, 2, 1), then every 4th voxel:
    label[1:9:4, 2:10:4, 1:9:4].
    """
    label = _label((1, 1, 10, 12, 10), 4)
    outputs = [_random((1, K, 6, 8, 6), 5), _random((1, K, 3, 4, 3), 6), _random((1, K, 2, 2, 2), 7)]
    targets = [label[..., 2:8, 2:10, 2:8], label[..., 2:8:2, 2:10:2, 2:8:2], label[..., 1:9:4, 2:10:4, 1:9:4]]
    expected = sum(w * dice_ce(o, t) for w, o, t in zip((1.0, 0.5, 0.25), outputs, targets)) / 1.75
    assert float(_module()._supervised_loss(outputs, label)) == pytest.approx(float(expected), rel=1e-5)
    # cropping from the corner instead of the centre is a different loss
    corner = [label[..., :6, :8, :6], label[..., :6:2, :8:2, :6:2], label[..., :8:4, :8:4, :8:4]]
    wrong = sum(w * dice_ce(o, t) for w, o, t in zip((1.0, 0.5, 0.25), outputs, corner)) / 1.75
    assert abs(float(wrong) - float(expected)) > 1e-3


def test_single_output_is_plain_dice_ce_with_the_configured_weights() -> None:
    label = _label((2, 1, 6, 6, 6), 8)
    out = _random((2, K, 6, 6, 6), 9)
    got = _module(dice_weight=0.5, ce_weight=2.0)._supervised_loss([out], label)
    assert float(got) == pytest.approx(float(dice_ce(out, label, 0.5, 2.0)), rel=1e-5)
    # the two terms really are weighted separately (not, say, both by their mean)
    assert float(got) != pytest.approx(float(dice_ce(out, label, 1.25, 1.25)), rel=1e-3)


def test_two_levels_weigh_two_thirds_and_one_third() -> None:
    label = _label((1, 1, 8, 8, 8), 10)
    outputs = [_random((1, K, 8, 8, 8), 11), _random((1, K, 4, 4, 4), 12)]
    expected = (2 * dice_ce(outputs[0], label) + dice_ce(outputs[1], label[..., ::2, ::2, ::2])) / 3
    assert float(_module()._supervised_loss(outputs, label)) == pytest.approx(float(expected), rel=1e-5)
