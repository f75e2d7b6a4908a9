"""Residual shortcuts where the resolution changes: strided 1x1 conv (`conv`) vs average pooling + 1x1 conv (`avgpool`)."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import nn

from segment.config import ModelConfig, stored_config, validate
from segment.errors import ConfigError
from segment.nets import ResidualBlock, build_model
from segment.nets.blocks import init_weights

EPS = 1e-5  # BatchNorm's default eps


def fixed_block(shortcut: str, padding: str, stride: tuple[int, ...], cin: int = 2, cout: int = 3) -> ResidualBlock:
    """A pre-activation block whose branch is exactly zero (zero-init, bias-free) and whose shortcut is a known linear
    map: 1x1 weights `W[o, i] = o - 2 i + 1`, eval-mode batch norm with unit scale, zero shift and unit running variance."""
    torch.manual_seed(0)
    block = ResidualBlock(3, cin, cout, stride=stride, padding=padding, norm="batch", preactivation=True,
                          zero_init=True, shortcut=shortcut)
    init_weights(block, "leakyrelu")
    conv, norm = [m for m in block.shortcut if isinstance(m, (nn.Conv3d, nn.BatchNorm3d))]
    with torch.no_grad():
        w = torch.tensor([[o - 2.0 * i + 1 for i in range(cin)] for o in range(cout)])
        conv.weight.copy_(w.view(cout, cin, 1, 1, 1))
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0)
    return block.eval()


def expected(x: torch.Tensor, block: ResidualBlock, shortcut: str, padding: str, stride: tuple[int, ...],
             out_shape: tuple[int, ...]) -> torch.Tensor:
    """Every output voxel by hand: the input block it reads (its mean for avgpool, its first voxel for conv), then W.

    Along an axis of stride s, output voxel q reads input voxels [start, start + s) with start = s*q (same) or
    1 + s*(q + 1) (valid: the shortcut input is cropped by one voxel per side, and the second 3x3 conv trims one more
    voxel of the strided grid per side). In same mode the last block of an odd size is cut short by the input's end.
    """
    w = [m for m in block.shortcut if isinstance(m, nn.Conv3d)][0].weight[:, :, 0, 0, 0]
    out = torch.zeros(x.shape[0], w.shape[0], *out_shape)
    for q in itertools.product(*(range(n) for n in out_shape)):
        index = []
        for axis, (qi, s) in enumerate(zip(q, stride)):
            start = s * qi if padding == "same" else 1 + s * (qi + 1)
            stop = min(start + s, x.shape[2 + axis]) if shortcut == "avgpool" else start + 1
            index.append(slice(start, stop))
        region = x[(slice(None), slice(None), *index)]
        out[(slice(None), slice(None), *q)] = region.mean(dim=(2, 3, 4)) @ w.T / math.sqrt(1 + EPS)
    return out


@pytest.mark.parametrize("shortcut", ["avgpool", "conv"])
@pytest.mark.parametrize("padding,size", [("same", (8, 7, 5)), ("valid", (9, 11, 7))])
@pytest.mark.parametrize("stride", [(2, 2, 2), (2, 2, 1), (1, 2, 2)])
def test_shortcut_values_with_fixed_weights(shortcut: str, padding: str, size: tuple[int, ...],
                                            stride: tuple[int, ...]) -> None:
    block = fixed_block(shortcut, padding, stride)
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        out = block(x)
    shape = tuple(-(-n // s) if padding == "same" else (n - 3) // s + 1 - 2 for n, s in zip(size, stride))
    assert out.shape == (2, 3, *shape)
    assert torch.allclose(out, expected(x, block, shortcut, padding, stride, shape), atol=1e-5)


def test_the_two_shortcuts_differ_on_the_same_input() -> None:
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        a = fixed_block("avgpool", "same", (2, 2, 2))(x)
        b = fixed_block("conv", "same", (2, 2, 2))(x)
    assert (a - b).abs().max() > 0.1


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("stride", [(2, 2, 2), (2, 1, 2)])
def test_both_shortcuts_match_the_branch_shape(padding: str, stride: tuple[int, ...]) -> None:
    """Any size, odd or even (valid: also sizes a full model would refuse), gives a shape-consistent residual add."""
    for size in [(9, 10, 11), (12, 13, 14), (15, 11, 10)]:
        x = torch.randn(1, 2, *size)
        shapes = set()
        for shortcut in ("conv", "avgpool"):
            block = ResidualBlock(3, 2, 4, stride=stride, padding=padding, zero_init=False, shortcut=shortcut)
            shapes.add(block(x).shape)
            assert block(x).shape == block.branch(x).shape
        assert len(shapes) == 1


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("strides,kernels", [(None, None), ([[2, 2, 1], [2, 2, 2]], [[3, 3, 1], [3, 3, 3], [3, 3, 3]])])
def test_avgpool_model_has_the_geometry_of_the_conv_model(padding: str, strides: object, kernels: object) -> None:
    kw = dict(spatial_dims=3, features=[4, 8, 8], padding=padding, strides=strides, kernels=kernels, blocks_per_stage=2)
    conv, pool = build_model(ModelConfig(**kw, encoder_block="residual")), build_model(ModelConfig(**kw, shortcut="avgpool", encoder_block="residual"))
    size = conv.input_size_for([12, 12, 12 if strides is None else 7])
    assert pool.output_size(size) == conv.output_size(size)
    with torch.no_grad():
        out = pool(torch.randn(1, 1, *size))
    assert out.shape[2:] == conv.output_size(size)
    if padding == "same" and strides is None:
        odd = (11, 13, 9)  # ceil-mode pooling keeps ceil(n/2) like the strided conv
        with torch.no_grad():
            assert pool(torch.randn(1, 1, *odd)).shape[2:] == odd


def test_gradient_reaches_every_input_voxel_through_avgpool_but_one_per_block_through_conv() -> None:
    """At zero-init the branch passes no gradient, so the input gradient is the shortcut's alone."""
    support = {}
    for shortcut in ("conv", "avgpool"):
        torch.manual_seed(0)
        block = ResidualBlock(3, 2, 4, stride=(2, 2, 1), norm="batch", preactivation=True, shortcut=shortcut)
        init_weights(block, "leakyrelu")
        x = torch.randn(2, 2, 8, 8, 4, requires_grad=True)
        block(x).square().sum().backward()
        nonzero = x.grad.abs().sum(dim=(0, 1)) > 0
        support[shortcut] = nonzero
        conv = [m for m in block.shortcut if isinstance(m, nn.Conv3d)][0]
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert support["avgpool"].all()
    strided = torch.zeros(8, 8, 4, dtype=torch.bool)
    strided[::2, ::2, :] = True
    assert torch.equal(support["conv"], strided)


def test_avgpool_model_trains_every_shortcut() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(spatial_dims=3, features=[4, 8, 8], shortcut="avgpool", zero_init_residual=False, encoder_block="residual"))
    out = model(torch.randn(2, 1, 16, 16, 16))
    out.logsumexp(1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "shortcut" in n]
    assert len(grads) == 9 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---- configuration and checkpoints ----------------------------------------------------------------------------
LEGACY_SHORTCUT_KEYS = {  # spatial_dims=2, features=[4, 8, 8]: the keys every checkpoint before `model.shortcut` has
    "encoder.stages.0.0.shortcut.0.weight": (4, 1, 1, 1), "encoder.stages.0.0.shortcut.1.weight": (4,),
    "encoder.stages.0.0.shortcut.1.bias": (4,), "encoder.stages.1.0.shortcut.0.weight": (8, 4, 1, 1),
    "encoder.stages.1.0.shortcut.1.weight": (8,), "encoder.stages.1.0.shortcut.1.bias": (8,),
    "encoder.stages.2.0.shortcut.0.weight": (8, 8, 1, 1), "encoder.stages.2.0.shortcut.1.weight": (8,),
    "encoder.stages.2.0.shortcut.1.bias": (8,),
}


def test_a_config_without_the_field_builds_the_legacy_network() -> None:
    old = {"spatial_dims": 2, "features": [4, 8, 8], "norm": "instance", "act": "leakyrelu"}  # no `shortcut`
    cfg = validate(stored_config({"model": old}), "old config.yaml").model  # as segment reads a config it stored
    assert cfg.shortcut == "conv" and cfg.encoder_block == "residual"
    state = build_model(cfg).state_dict()
    assert len(state) == 47
    assert {k: tuple(v.shape) for k, v in state.items() if "shortcut" in k} == LEGACY_SHORTCUT_KEYS
    build_model(ModelConfig(**old, encoder_block="residual")).load_state_dict(state)  # strict: same keys and shapes


def test_avgpool_checkpoint_keys_differ_so_a_mismatched_config_cannot_load() -> None:
    conv = build_model(ModelConfig(spatial_dims=2, features=[4, 8, 8], encoder_block="residual"))
    pool = build_model(ModelConfig(spatial_dims=2, features=[4, 8, 8], shortcut="avgpool", encoder_block="residual"))
    keys = {k for k in pool.state_dict() if "shortcut" in k}
    assert "encoder.stages.1.0.shortcut.1.weight" in keys and pool.state_dict()["encoder.stages.1.0.shortcut.1.weight"].dim() == 4
    assert "encoder.stages.0.0.shortcut.0.weight" in keys  # stage 0 does not downsample: the same 1x1 conv + norm
    with pytest.raises(RuntimeError):
        pool.load_state_dict(conv.state_dict())
    assert sum(p.numel() for p in pool.parameters()) == sum(p.numel() for p in conv.parameters())


def test_unknown_shortcut_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.shortcut") as err:
        validate({"model": {"shortcut": "maxpool"}}, "run.yaml")
    assert "run.yaml" in str(err.value)


def test_summary_names_the_shortcut() -> None:
    from segment.nets import summary_text

    for shortcut, text in (("conv", "strided 1x1 conv"), ("avgpool", "avgpool + 1x1 conv")):
        model = build_model(ModelConfig(spatial_dims=2, features=[4, 8], shortcut=shortcut, encoder_block="residual"))
        assert re.search(rf"downsampling shortcut +{re.escape(text)}\n", summary_text(model))
