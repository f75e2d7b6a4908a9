"""Intensity normalisation against numbers worked out by hand: CT clip + dataset z-score, MR z-score per volume and per
channel."""

from __future__ import annotations

import math

import pytest
import torch

from segment.data.plan import Plan
from segment.data.preprocess import normalise

pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(modality: str, channels: int = 1, **extra: object) -> Plan:
    return Plan(spacing=[1.0, 1.0, 1.0], patch_size=[8, 8, 8], batch_size=2, features=[4, 8], modality=modality,
                channels=channels, labels={0: "background", 1: "fg"}, ct_clip=[-200.0, 300.0], ct_mean=40.0,
                ct_std=80.0, **extra)


def _volume(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 2, 2, 2)


CT_RAW = [-2000.0, -500.0, 0.0, 40.0, 120.0, 900.0, 1500.0, 3000.0]
# clip to [-200, 300]: -200, -200, 0, 40, 120, 300, 300, 300; then (x - 40) / 80:
CT_EXPECTED = [-3.0, -3.0, -0.5, 0.0, 1.0, 3.25, 3.25, 3.25]

MR_RAW = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
# mean 4.5; population variance sum((x - 4.5)^2) / 8 = 42 / 8 = 5.25
MR_EXPECTED = [(x - 4.5) / math.sqrt(5.25) for x in MR_RAW]


def test_ct_is_clipped_to_the_plan_window_then_z_scored_with_the_dataset_statistics() -> None:
    out = normalise(_volume(CT_RAW), _plan("ct"))
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out.flatten(), torch.tensor(CT_EXPECTED), rtol=0, atol=1e-6)


def test_ct_uses_the_dataset_statistics_not_the_volumes_own() -> None:
    """Two CT volumes with different ranges keep their relative intensities: 40 HU maps to 0 in both."""
    a = normalise(_volume([40.0] * 4 + [120.0] * 4), _plan("ct"))
    b = normalise(_volume([40.0] * 4 + [-40.0] * 4), _plan("ct"))
    assert a.flatten().tolist() == [0.0] * 4 + [1.0] * 4
    assert b.flatten().tolist() == [0.0] * 4 + [-1.0] * 4


def test_mr_is_z_scored_over_its_own_volume() -> None:
    out = normalise(_volume(MR_RAW), _plan("mri"))
    torch.testing.assert_close(out.flatten(), torch.tensor(MR_EXPECTED), rtol=0, atol=1e-6)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(out.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    # an affine change of the scan's intensities (another scanner gain and offset) gives the same input
    torch.testing.assert_close(normalise(_volume([7.0 + 30.0 * x for x in MR_RAW]), _plan("mri")), out,
                               rtol=0, atol=1e-5)


def test_mr_constant_volume_becomes_zeros_not_nan() -> None:
    out = normalise(_volume([12.5] * 8), _plan("mri"))
    assert out.flatten().tolist() == [0.0] * 8


def test_mr_channels_are_normalised_independently() -> None:
    """Channel 1 = 100 x channel 0 + 7: each channel on its own gives the same values; mixing channel statistics
    (one mean and std for the whole image) would not."""
    c0 = torch.tensor(MR_RAW).reshape(2, 2, 2)
    image = torch.stack([c0, 100 * c0 + 7])
    out = normalise(image, _plan("mri", channels=2))
    assert out.shape == (2, 2, 2, 2)
    for c in range(2):
        torch.testing.assert_close(out[c].flatten(), torch.tensor(MR_EXPECTED), rtol=0, atol=1e-5)
    # channel 1's values do not depend on channel 0
    other = torch.stack([torch.full((2, 2, 2), -1e3), 100 * c0 + 7])
    torch.testing.assert_close(normalise(other, _plan("mri", channels=2))[1], out[1], rtol=0, atol=1e-6)


def test_mixed_ct_and_mr_channels_each_get_their_own_scheme() -> None:
    image = torch.stack([_volume(CT_RAW)[0], _volume(MR_RAW)[0]])
    plan = _plan("mixed", channels=2, channel_modalities=["ct", "mri"])
    out = normalise(image, plan)
    assert out.shape == (2, 2, 2, 2)
    torch.testing.assert_close(out[0].flatten(), torch.tensor(CT_EXPECTED), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1].flatten(), torch.tensor(MR_EXPECTED), rtol=0, atol=1e-6)
    # the order is the plan's: MR first, CT second
    swapped = normalise(torch.stack([image[1], image[0]]), _plan("mixed", channels=2, channel_modalities=["mri", "ct"]))
    torch.testing.assert_close(swapped, torch.stack([out[1], out[0]]), rtol=0, atol=1e-6)
