"""Streamed prediction (slab by slab) gives the labels of the all-classes path without its K x voxels memory."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.data.preprocess import restore_probabilities
from segment.engine import stream
from segment.inference.predictor import Predictor
from segment.engine.sliding import softmax_probabilities
from segment.engine.stream import linear_taps, predict_canonical_labels, window_corners
from segment.io.image import Geometry
from segment.nets import build_model

K = 5
GRID = (40, 48, 36)  # network input grid
OUT = (52, 41, 30)  # canonical grid of the scan: up along one axis, down along two, so resampling happens


def _plan(patch: list[int]) -> Plan:
    return Plan(spacing=[1.0, 1.0, 1.0], patch_size=patch, batch_size=2, features=[4, 8, 16], modality="mri",
                channels=1, labels={i: f"c{i}" for i in range(K)})


@pytest.fixture(scope="module")
def net(one_thread: None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(features=[4, 8, 16], out_channels=K)).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)  # smooth random input, so neighbouring voxels agree and labels form regions
    x = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *GRID), 5, stride=1, padding=2)
    return x / x.std()


def _old(net: torch.nn.Module, x: torch.Tensor, plan: Plan, tta: bool) -> torch.Tensor:
    """The all-classes path: probabilities of the whole volume, resized whole to the canonical grid."""
    probs = softmax_probabilities(net, x, plan.patch_size, overlap=0.5, sw_batch_size=2, blend="gaussian", tta=tta,
                                  mirror_axes=[0, 1, 2])
    return restore_probabilities(probs, Geometry.from_affine(np.eye(4), OUT))


def _new(net: torch.nn.Module, x: torch.Tensor, plan: Plan, tta: bool, **kw: object) -> tuple[np.ndarray, np.ndarray | None]:
    return predict_canonical_labels(net, x, plan, OUT, overlap=0.5, sw_batch_size=2, blend="gaussian", tta=tta,
                                    mirror_axes=[0, 1, 2], **kw)


def _check_agreement(labels: np.ndarray, old: torch.Tensor) -> float:
    """>= 99.9% equal, and every difference a near-tie of the old path's top two probabilities."""
    expected = old.argmax(0).numpy()
    top2 = old.topk(2, dim=0).values.numpy()
    differ = labels != expected
    assert labels.shape == OUT and labels.dtype == np.uint8
    assert differ.mean() <= 1e-3, f"{differ.sum()} of {differ.size} voxels differ"
    assert np.all(top2[0][differ] - top2[1][differ] < 1e-3)
    return float(1 - differ.mean())


# patch (24, 24, 24): windows overlap on every axis; (16, 56, 20): the image is padded along axis 1 (48 < 56)
@pytest.mark.parametrize("patch", [[24, 24, 24], [16, 56, 20]])
@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("slab_voxels", [None, 40 * 36 * 5])  # one slab / slabs of 5 rows along axis 1 (10 slabs)
def test_streamed_labels_match_the_all_classes_path(net: torch.nn.Module, image: torch.Tensor, patch: list[int],
                                                    tta: bool, slab_voxels: int | None) -> None:
    plan = _plan(patch)
    with torch.inference_mode():
        old = _old(net, image, plan, tta)
        labels, probs = _new(net, image, plan, tta, slab_voxels=slab_voxels)
    assert probs is None
    _check_agreement(labels, old)
    assert len(np.unique(labels)) > 1  # a constant map would make the comparison meaningless


def test_probabilities_are_uint8_of_the_resized_probabilities(net: torch.nn.Module, image: torch.Tensor) -> None:
    plan = _plan([24, 24, 24])
    with torch.inference_mode():
        old = _old(net, image, plan, False)
        labels, probs = _new(net, image, plan, False, slab_voxels=40 * 36 * 7, want_probabilities=True)
        _, exact = _new(net, image, plan, False, want_probabilities=True, probability_dtype=np.float32)
    assert probs is not None and probs.dtype == np.uint8 and probs.shape == (K, *OUT)
    assert exact is not None and exact.dtype == np.float32
    np.testing.assert_allclose(probs / 255.0, old.numpy(), atol=0.5 / 255 + 1e-4)
    np.testing.assert_allclose(exact, old.numpy(), atol=1e-5)
    _check_agreement(labels, old)


def test_odd_padding_with_mirrored_windows(net: torch.nn.Module) -> None:
    """An odd pad (47 voxels in a 56 window) is split differently on the mirrored image: TTA must follow MONAI."""
    torch.manual_seed(3)
    x = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 40, 47, 36), 5, stride=1, padding=2)
    plan = _plan([16, 56, 20])
    with torch.inference_mode():
        old = _old(net, x, plan, True)
        labels, _ = _new(net, x, plan, True, slab_voxels=40 * 47 * 4)
    _check_agreement(labels, old)


def test_valid_padded_networks_take_the_whole_volume_path(image: torch.Tensor) -> None:
    """Valid-padded networks are not slabbed yet (see stream.py): same labels, only the resize is streamed."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(features=[3, 6, 12], padding="valid", norm="batch", out_channels=K)).eval()
    plan = _plan([36, 36, 36])
    with torch.inference_mode():
        old = _old(net, image, plan, False)
        labels, _ = _new(net, image, plan, False, slab_voxels=40 * 36 * 5)
    _check_agreement(labels, old)


def test_window_corners_are_monai_windows_mirrored() -> None:
    assert window_corners([10], [4], 0.5) == [(0,), (2,), (4,), (6,)]
    assert window_corners([9], [4], 0.5) == [(0,), (2,), (4,), (5,)]
    assert window_corners([9], [4], 0.5, [0]) == [(5,), (3,), (1,), (0,)]  # MONAI's last window is flush with the end
    assert window_corners([5], [8], 0.5) == [(-1,)]  # padded 1 before, 2 after
    assert window_corners([5], [8], 0.5, [0]) == [(-2,)]  # on the mirrored image: 1 before there = 2 before here


def test_linear_taps_match_interpolate() -> None:
    for n_in, n_out in [(7, 13), (13, 7), (9, 9), (1, 4)]:
        i0, i1, lam = linear_taps(n_in, n_out)
        src = torch.arange(float(n_in)).view(1, 1, -1)
        expected = torch.nn.functional.interpolate(src, size=n_out, mode="linear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(i0 * (1 - lam) + i1 * lam, expected, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any torch operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@contextmanager
def largest_tensor() -> Iterator[LargestTensor]:
    with LargestTensor() as mode:
        yield mode


def test_no_tensor_holds_all_classes_of_the_volume(net: torch.nn.Module, image: torch.Tensor) -> None:
    plan = _plan([16, 16, 16])  # small windows, so the network's own feature maps stay small next to the volume
    whole = K * min(math.prod(GRID), math.prod(OUT))
    with torch.inference_mode():
        with largest_tensor() as old:
            _old(net, image, plan, True)
        with largest_tensor() as new:
            _new(net, image, plan, True, slab_voxels=40 * 36 * 12)
    assert old.largest >= whole  # the probe sees the all-classes tensors of the old path
    # one 12-row slab of K classes (of 48 rows), or 2 windows' features (2 x 8 x 16^3), whichever is larger
    assert new.largest < whole / 3, (new.largest, whole)


def test_slab_size_follows_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    grid, roi = (100, 200, 50), (16, 16, 16)
    assert stream.slab_rows(104, grid, roi, 1) == 200  # 104 x 1e6 floats fit in 512 MB: one slab
    monkeypatch.setattr(stream, "SLAB_BYTES", 4 * 104 * 5000 * 20)
    assert stream.slab_rows(104, grid, roi, 1) == 20
    assert stream.slab_rows(104, grid, roi, 1, copies=2) == 16  # never thinner than a patch
    assert stream.slab_rows(104, grid, roi, 1, step=8) == 16  # slabs start on the window grid
    assert stream.slab_rows(104, grid, roi, 1, slab_voxels=5000 * 3) == 3


def test_predictor_streams_labels_and_uint8_probabilities(net: torch.nn.Module) -> None:
    cfg = Config(model=ModelConfig(features=[4, 8, 16], out_channels=K))
    predictor = Predictor(net, _plan([24, 24, 24]), cfg, device="cpu", precision="32")
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(30, 26, 20)).astype(np.float32)
    geometry = Geometry.from_affine(np.diag([-1.2, 1.0, 1.5, 1.0]), volume.shape)  # LAS at 1.2 x 1 x 1.5 mm
    labels, probs = predictor.predict_labels([volume], geometry, keep_probabilities=True)
    exact = predictor.predict_probabilities([volume], geometry)
    assert labels.shape == geometry.shape and labels.dtype == np.uint8
    assert probs is not None and probs.dtype == np.uint8 and probs.shape == (K, *geometry.shape)
    assert exact.dtype == np.float32 and exact.shape == (K, *geometry.shape)
    np.testing.assert_allclose(probs / 255.0, exact, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(exact.sum(0), 1.0, atol=1e-5)
    assert (labels == exact.argmax(0)).mean() > 0.999


def test_mirrorings_share_window_batches_with_the_same_probabilities(net: torch.nn.Module) -> None:
    """A scan smaller than the patch has one window per mirroring: 8 mirrorings run as 4 forward passes of 2 windows
    (not 8 of 1), and the probabilities are still the all-classes path's."""
    torch.manual_seed(4)
    x = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 21, 30, 19), 5, stride=1, padding=2)
    plan = _plan([24, 32, 24])
    batches: list[int] = []
    hook = net.register_forward_pre_hook(lambda _m, args: batches.append(int(args[0].shape[0])))
    try:
        with torch.inference_mode():
            _, exact = predict_canonical_labels(net, x, plan, OUT, overlap=0.5, sw_batch_size=2, blend="gaussian",
                                                tta=True, mirror_axes=[0, 1, 2], want_probabilities=True,
                                                probability_dtype=np.float32)
    finally:
        hook.remove()
    assert batches[-4:] == [2, 2, 2, 2] and sum(batches[-4:]) == 8 and len(batches) == 4
    with torch.inference_mode():
        old = _old(net, x, plan, True)
    assert exact is not None
    np.testing.assert_allclose(exact, old.numpy(), atol=1e-5)
