"""Overlap-tile prediction of a valid-padded U-Net equals one forward pass over the whole mirror-padded volume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segment.config import ModelConfig
from segment.engine.sliding import sliding_logits, softmax_probabilities
from segment.engine.tiler import reflect_pad, tiled_logits, window_geometry
from segment.nets import build_model


@pytest.fixture(scope="module")
def valid_net() -> torch.nn.Module:
    torch.manual_seed(0)
    # batch norm in eval mode is shift-equivariant; instance norm would make every window see its own statistics
    model = build_model(ModelConfig(features=[3, 6, 12], padding="valid", norm="batch", out_channels=3)).eval()
    with torch.no_grad():  # non-trivial running statistics and norm scales, so the check is not vacuous
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def _whole_volume(model: torch.nn.Module, x: torch.Tensor, patch: list[int]) -> torch.Tensor:
    """Reference: mirror-pad the volume so one forward pass yields exactly the covered grid, then crop."""
    _, win_out, step = window_geometry(model, patch)
    margin = model.output_margin()
    spatial = x.shape[2:]
    covered = [w + step * math.ceil(max(0, n - w) / step) for n, w in zip(spatial, win_out)]
    before = margin // 2
    padded = reflect_pad(x, [before] * 3, [margin - before + c - n for c, n in zip(covered, spatial)])
    return model(padded)[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("shape", [(1, 14, 12, 17), (2, 7, 9, 5)])
def test_tiles_equal_whole_volume_forward(valid_net: torch.nn.Module, blend: str, shape: tuple[int, ...]) -> None:
    patch = [36, 36, 36]  # not an allowed valid size (27 + 4k): rounded down to 35 -> output windows of 10
    _, win_out, _ = window_geometry(valid_net, patch)
    assert win_out == (10, 10, 10)  # so (14, 12, 17) needs 2-3 overlapping windows per axis
    x = torch.randn(shape[0], 1, *shape[1:])
    with torch.inference_mode():
        tiled = tiled_logits(valid_net, x, patch, overlap=0.5, sw_batch_size=3, blend=blend)
        whole = _whole_volume(valid_net, x, patch)
    assert tiled.shape == (shape[0], 3, *shape[1:])
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=1e-4)
    assert whole.std() > 1e-3  # a constant output would make the comparison meaningless


def test_sliding_logits_dispatches_valid_models(valid_net: torch.nn.Module) -> None:
    x = torch.randn(1, 1, 11, 13, 9)
    with torch.inference_mode():
        a = sliding_logits(valid_net, x, [32, 32, 32], overlap=0.25)
        b = tiled_logits(valid_net, x, [32, 32, 32], overlap=0.25)
    assert a.shape == (1, 3, 11, 13, 9)
    torch.testing.assert_close(a, b)


def test_reflect_pad_matches_numpy_even_beyond_the_volume() -> None:
    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(1, 2, 3, 5, 4)
    out = reflect_pad(x, [4, 1, 0], [7, 0, 9])
    expected = np.pad(x.numpy(), [(0, 0), (0, 0), (4, 7), (1, 0), (0, 9)], mode="reflect")
    np.testing.assert_array_equal(out.numpy(), expected)


def test_mirror_tta_of_a_symmetric_input_is_its_plain_prediction() -> None:
    """Same-padded path: TTA averages softmax over 8 mirrorings and undoes each flip (checked with a flip-equivariant net)."""
    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 2, 1)
    x = torch.randn(1, 1, 10, 12, 9)
    with torch.inference_mode():
        plain = softmax_probabilities(net, x, [8, 8, 8], tta=False)
        tta = softmax_probabilities(net, x, [8, 8, 8], tta=True)
    assert plain.shape == (2, 10, 12, 9)
    torch.testing.assert_close(plain.sum(0), torch.ones(10, 12, 9))
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)


def test_mirror_tta_undoes_every_flip_for_an_asymmetric_net() -> None:
    """TTA = mean over the 8 mirrorings of softmax(net(flipped x)) flipped back, whatever the chunking."""
    from segment.engine.sliding import flip_sets

    torch.manual_seed(2)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)  # a 3x3x3 kernel is not mirror-symmetric: a missed un-flip shows
    x = torch.randn(1, 1, 10, 12, 9)
    with torch.inference_mode():
        expected = torch.stack([
            torch.softmax(sliding_logits(net, x.flip(f) if f else x, [8, 8, 8]), 1)[0].flip([d - 1 for d in f])
            if f else torch.softmax(sliding_logits(net, x, [8, 8, 8]), 1)[0]
            for f in flip_sets(3)
        ]).mean(0)
        tta = softmax_probabilities(net, x, [8, 8, 8], tta=True)
        plain = softmax_probabilities(net, x, [8, 8, 8], tta=False)
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-3)


def test_window_batch_defaults_per_device_and_keeps_a_configured_value() -> None:
    from segment.engine.sliding import window_batch

    assert window_batch(None, "cpu") == 2
    assert window_batch(None, "cuda") == 4
    assert window_batch(7, "cpu") == 7
