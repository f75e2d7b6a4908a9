"""Shape tables and size helpers of the U-Net, and `center_crop` checked on values."""

from __future__ import annotations

import pytest
import torch

from segment.config import ModelConfig
from segment.errors import GeometryError
from segment.nets import build_model, center_crop
from segment.nets.unet import UNet

FEATURES = [2, 4, 4, 8, 8]


def tiny(dims: int, depth: int, padding: str, **kw: object) -> UNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(spatial_dims=dims, features=FEATURES[:depth], padding=padding, **kw))


# ---- center_crop ----------------------------------------------------------------------------------------------
def test_center_crop_even_difference_is_symmetric() -> None:
    x = torch.arange(7).view(1, 1, 7)
    assert center_crop(x, [3]).flatten().tolist() == [2, 3, 4]
    assert center_crop(x, [7]).flatten().tolist() == list(range(7))


def test_center_crop_odd_difference_drops_extra_voxel_at_the_end() -> None:
    x = torch.arange(7).view(1, 1, 7)
    assert center_crop(x, [4]).flatten().tolist() == [1, 2, 3, 4]  # one dropped at the start, two at the end
    assert center_crop(x, [6]).flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_center_crop_2d_values_and_leading_dims_untouched() -> None:
    x = torch.arange(2 * 5 * 6).view(2, 5, 6)
    out = center_crop(x, [2, 3])
    assert out.shape == (2, 2, 3)
    # rows 1..2 (5->2: start 1), cols 1..3 (6->3: start 1)
    assert out[0].tolist() == [[7, 8, 9], [13, 14, 15]]
    assert out[1].tolist() == [[37, 38, 39], [43, 44, 45]]


def test_center_crop_only_trailing_dims() -> None:
    x = torch.arange(4 * 6).view(1, 4, 6)
    assert center_crop(x, [2]).tolist() == [[[2, 3], [8, 9], [14, 15], [20, 21]]]


def test_center_crop_rejects_growing() -> None:
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(torch.zeros(1, 1, 4, 4), [5, 4])


# ---- shape tables ---------------------------------------------------------------------------------------------
SAME_CASES = [(d, depth, size) for d in (2, 3) for depth in (2, 3, 4, 5)
              for size in ((2 ** (depth - 1) + 1,) * d, (35, 51, 35)[:d], (18, 7, 9)[:d])]


@pytest.mark.parametrize("dims,depth,size", SAME_CASES)
def test_same_padding_output_equals_input(dims: int, depth: int, size: tuple[int, ...]) -> None:
    model = tiny(dims, depth, "same", out_channels=3)
    with torch.no_grad():
        outs = model.forward_all(torch.randn(1, 1, *size))
    assert tuple(outs[0].shape) == (1, 3, *size)
    assert model.output_size(size) == size
    assert len(outs) == depth - 1
    for level, aux in enumerate(outs):  # each aux head is at its decoder level: ceil-halved `level` times
        expect = list(size)
        for _ in range(level):
            expect = [(n + 1) // 2 for n in expect]
        assert tuple(aux.shape[2:]) == tuple(expect)


# (min input, margin) per depth for FEATURES, blocks 1, decoder_blocks 1: computed by hand for depth 2 and 3:
# depth 2: n -4 (block 0) -> (n-5)/2 - 2 (stride block) -> x2 -> -2: out = n - 11, smallest odd n with out >= 1 is 13.
HAND = {2: (13, 11), 3: (27, 25)}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_valid_padding_sizes_match_forward(dims: int, depth: int) -> None:
    model = tiny(dims, depth, "valid")
    lo, step, margin = model.min_input_size(), model.size_multiple(), model.output_margin()
    assert step == 2 ** (depth - 1)
    if depth in HAND:
        assert (lo, margin) == HAND[depth]
    size = (lo + step, lo, lo + 2 * step)[:dims] if dims == 2 or depth < 5 else (lo,) * dims
    with torch.no_grad():
        out = model(torch.randn(1, 1, *size))
    assert tuple(out.shape[2:]) == model.output_size(size) == tuple(n - margin for n in size)
    assert model.input_size_for(out.shape[2:]) == size  # round trip: the smallest input giving this output


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_valid_allowed_sizes_agree_with_the_network(depth: int) -> None:
    """Every size the helper allows runs; every size it refuses raises, naming the allowed sizes."""
    model = tiny(2, depth, "valid")
    lo, step = model.min_input_size(), model.size_multiple()
    for n in range(lo - 3, lo + 2 * step + 1):
        if n >= lo and (n - lo) % step == 0:
            with torch.no_grad():
                out = model(torch.randn(1, 1, n, lo))
            assert tuple(out.shape[2:]) == (n - model.output_margin(), lo - model.output_margin())
        else:
            with pytest.raises(GeometryError, match=f"{lo} \\+ k\\*{step}"):
                model.output_size((n, lo))


@pytest.mark.parametrize("target", [1, 5, 20, 33])
def test_input_size_for_is_smallest_sufficient(target: int) -> None:
    model = tiny(2, 3, "valid")
    (n,) = model.input_size_for([target])[:1]
    assert model.output_size((n, n))[0] >= target
    smaller = n - model.size_multiple()
    assert smaller < model.min_input_size() or model.output_size((smaller, smaller))[0] < target


def test_same_mode_input_size_for_is_identity() -> None:
    assert tiny(3, 4, "same").input_size_for([35, 51, 35]) == (35, 51, 35)


def test_output_size_errors() -> None:
    model = tiny(3, 3, "same")
    with pytest.raises(GeometryError, match="expected 3 spatial dims"):
        model.output_size((16, 16))
    with pytest.raises(GeometryError, match="single voxel"):
        model.output_size((4, 3, 2))  # bottleneck 1x1x1
    assert model.output_size((5, 3, 2)) == (5, 3, 2)  # bottleneck 2x1x1 is fine
    with pytest.raises(GeometryError, match="not allowed"):
        tiny(2, 2, "valid")(torch.zeros(1, 1, 14, 13))


def test_deep_supervision_flag_does_not_change_outputs_or_keys() -> None:
    on, off = tiny(2, 4, "same", deep_supervision=True), tiny(2, 4, "same", deep_supervision=False)
    assert list(on.state_dict()) == list(off.state_dict())
    assert len(on.heads) == len(off.heads) == 3
    off.load_state_dict(on.state_dict())
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(on.forward_all(x), off.forward_all(x)))
        assert torch.equal(on(x), on.forward_all(x)[0])
