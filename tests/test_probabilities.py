"""Predictor.predict_probabilities: a distribution per voxel, consistent with the labels and with the uint8 copy that
`predict_labels(..., keep_probabilities=True)` returns; exact softmax values where nothing is resampled."""

from __future__ import annotations


import numpy as np
import pytest

from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.inference.predictor import Predictor
from segment.io.image import Geometry
from tests.fixed_nets import FixedConv

pytestmark = pytest.mark.usefixtures("one_thread")

W = np.array([-0.1, 0.0, 0.1])  # logits w * x + b: class 0 below 40, class 1 between 40 and 60, class 2 above 60
B = np.array([4.0, 0.0, -6.0])


def ThreeClassNet() -> FixedConv:  # noqa: N802
    """The soft, known logits above (slope 0.1: probabilities far from 0 and 1)."""
    return FixedConv(W, B)


def _predictor(spacing: list[float], **kwargs: object) -> Predictor:
    """CT plan whose normalisation is the identity (mean 0, std 1, wide clip): the net sees raw intensities."""
    plan = Plan(spacing=spacing, patch_size=[16, 16, 8], batch_size=2, features=[4, 8], modality="ct", channels=1,
                labels={0: "background", 1: "mid", 2: "high"}, ct_clip=[-1e4, 1e4], ct_mean=0.0, ct_std=1.0)
    cfg = Config(model=ModelConfig(out_channels=3, features=[4, 8]))
    return Predictor(ThreeClassNet(), plan, cfg, device="cpu", precision="32", **kwargs)


def _scan(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> tuple[np.ndarray, Geometry]:
    """Random intensities around the class boundaries on an LPS grid (so reorientation is exercised)."""
    image = np.random.default_rng(seed).normal(50.0, 20.0, shape).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = [10.0, -4.0, 2.5]
    return image, Geometry.from_affine(affine, shape, source="lps")


def _softmax(image: np.ndarray) -> np.ndarray:
    logits = W[:, None, None, None] * image[None].astype(np.float64) + B[:, None, None, None]
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


def test_without_resampling_the_probabilities_are_the_networks_softmax_voxel_for_voxel() -> None:
    spacing = (1.0, 1.2, 2.0)
    image, geometry = _scan((20, 18, 10), spacing)
    probs = _predictor(list(spacing)).predict_probabilities([image], geometry)
    assert probs.dtype == np.float32 and probs.shape == (3, 20, 18, 10)
    np.testing.assert_allclose(probs, _softmax(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_resampled_probabilities_are_distributions_consistent_with_labels_and_uint8(tta: bool) -> None:
    image, geometry = _scan((20, 18, 10), (1.0, 1.2, 2.0), seed=1)
    predictor = _predictor([1.5, 1.5, 1.5], tta=tta)
    probs = predictor.predict_probabilities([image], geometry)
    assert probs.dtype == np.float32 and probs.shape == (3, *geometry.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=0, atol=1e-5)
    assert probs.min() >= 0.0 and probs.max() <= 1.0 + 1e-6
    # not a trivial case: every class wins somewhere and many voxels are uncertain
    assert set(np.unique(probs.argmax(0))) == {0, 1, 2}
    assert (probs.max(0) < 0.8).mean() > 0.3

    labels, uint8 = predictor.predict_labels([image], geometry, keep_probabilities=True)
    assert labels.shape == geometry.shape and uint8 is not None and uint8.dtype == np.uint8
    top2 = np.sort(probs, axis=0)[-2:]
    ties = (top2[1] - top2[0]) < 1e-3
    differ = labels != probs.argmax(0)
    assert not (differ & ~ties).any(), f"{int((differ & ~ties).sum())} voxels disagree away from a tie"
    assert differ.sum() <= ties.sum()
    # the uint8 copy is p scaled to 0..255, rounded
    diff = np.abs(uint8.astype(np.int16) - np.round(255 * probs).astype(np.int16))
    assert diff.max() <= 1
    # and labels alone (no probabilities asked for) are the same labels
    alone, none = predictor.predict_labels([image], geometry)
    assert none is None
    np.testing.assert_array_equal(alone, labels)
