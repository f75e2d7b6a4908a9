"""Residual blocks at initialisation, skip wiring, receptive field, and the summary."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from segment.config import ModelConfig
from segment.nets import ResidualBlock, build_model, center_crop, receptive_field, summary_text, summarize
from segment.nets.blocks import init_weights, make_act, make_norm


def model_of(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"spatial_dims": 2, "features": [4, 8, 8], "encoder_block": "residual", **kw}))


# ---- residual blocks at init ----------------------------------------------------------------------------------
def fresh_block(pre: bool, padding: str, norm: str, cin: int = 4, stride: int = 1) -> ResidualBlock:
    torch.manual_seed(1)
    block = ResidualBlock(3, cin, 4, stride=stride, padding=padding, norm=norm, preactivation=pre, zero_init=True)
    init_weights(block, "leakyrelu")
    return block


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_preactivation_block_is_exactly_identity_at_init(padding: str, norm: str) -> None:
    x = torch.randn(2, 4, 9, 9, 9)
    out = fresh_block(True, padding, norm)(x)
    expect = x if padding == "same" else center_crop(x, [5, 5, 5])  # valid: two 3x3 convs eat 2 voxels per side
    assert torch.equal(out, expect)


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_postactivation_block_is_act_of_input_at_init(padding: str, norm: str) -> None:
    x = torch.randn(2, 4, 9, 9, 9)
    out = fresh_block(False, padding, norm)(x)
    x = x if padding == "same" else center_crop(x, [5, 5, 5])
    assert torch.equal(out, nn.functional.leaky_relu(x, 0.01))
    assert not torch.equal(out, x)  # the final activation is what separates post-activation from identity


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_projection_block_equals_its_shortcut_at_init(padding: str) -> None:
    block = fresh_block(True, padding, "instance", cin=2, stride=2)
    x = torch.randn(1, 2, 11, 11, 11)
    crop = x if padding == "same" else center_crop(x, [9, 9, 9])
    out = block(x)
    assert torch.allclose(out, center_crop(block.shortcut(crop), out.shape[2:]), atol=0)
    assert out.shape[2:] == ((6, 6, 6) if padding == "same" else (3, 3, 3))


def test_every_identity_block_of_a_zero_init_preact_model_is_identity() -> None:
    model = model_of(spatial_dims=3, blocks_per_stage=3, preactivation=True)
    x = torch.randn(1, 8, 6, 6, 6)
    blocks = [b for stage in model.encoder.stages[1:] for b in list(stage)[1:]]
    assert len(blocks) == 4
    assert all(torch.equal(b(x), x) for b in blocks)


def test_without_zero_init_the_block_is_not_identity() -> None:
    model = model_of(spatial_dims=3, blocks_per_stage=2, preactivation=True, zero_init_residual=False)
    x = torch.randn(1, 4, 6, 6, 6)
    assert (model.encoder.stages[0][1](x) - x).abs().max() > 0.1


def test_kaiming_init_scale() -> None:
    conv = model_of().encoder.stages[1][0].branch[3]  # 8 -> 8 channels, 3x3: fan_in 72
    expect = (2 / (1 + 0.01**2) / 72) ** 0.5
    assert abs(conv.weight.std().item() - expect) / expect < 0.1


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_factories_build_the_plain_torch_layers(dims: int) -> None:
    """Checkpoint keys and numerics rest on these exact modules: affine norms (instance: no running stats), LeakyReLU(0.01)."""
    inst, batch = make_norm("instance", dims, 5), make_norm("batch", dims, 5)
    assert type(inst) is getattr(nn, f"InstanceNorm{dims}d") and inst.affine and not inst.track_running_stats
    assert type(batch) is getattr(nn, f"BatchNorm{dims}d") and batch.affine and batch.track_running_stats
    assert list(inst.state_dict()) == ["weight", "bias"] and inst.weight.shape == (5,)
    assert list(batch.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert inst.eps == batch.eps == 1e-5 and batch.momentum == 0.1
    leaky, relu = make_act("leakyrelu"), make_act("relu")
    assert type(leaky) is nn.LeakyReLU and leaky.negative_slope == 0.01 and not leaky.inplace
    assert type(relu) is nn.ReLU and not relu.inplace
    x = torch.tensor([-2.0, 3.0])
    assert torch.equal(leaky(x), torch.tensor([-0.02, 3.0])) and torch.equal(relu(x), torch.tensor([0.0, 3.0]))


# ---- skip wiring ----------------------------------------------------------------------------------------------
def first_conv_in(model: nn.Module) -> list[int]:
    return [stage[0][0].in_channels for stage in model.decoder.stages]


def test_decoder_inputs_shrink_by_exactly_the_encoder_widths() -> None:
    widths = [4, 8, 8, 16]
    assert first_conv_in(model_of(features=widths)) == [8, 16, 16]
    assert first_conv_in(model_of(features=widths, skip_connections="none")) == [4, 8, 8]
    assert first_conv_in(model_of(features=widths, skip_connections=[0])) == [8, 8, 8]
    assert first_conv_in(model_of(features=widths, skip_connections=[1, 2])) == [4, 16, 16]


@pytest.mark.parametrize("skips,cats", [("all", 2), ("none", 0), ([0], 1), ([1], 1)])
def test_concatenations_happen_only_for_kept_skips(skips: object, cats: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calls = model_of(skip_connections=skips), []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda t, dim=0: calls.append(len(t)) or real_cat(t, dim=dim))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 12, 12))
    assert len(calls) == cats and out.shape == (1, 2, 12, 12)


def test_no_skip_model_ignores_the_encoder_maps_it_does_not_concatenate() -> None:
    """Perturbing level-0 encoder features changes the output only when skip 0 is kept."""
    for skips, changes in (("all", True), ([1], False)):
        model = model_of(skip_connections=skips).eval()
        feats = model.encoder(torch.randn(1, 1, 12, 12))
        base = model.heads[0](model.decoder(feats)[0])
        feats[0] = feats[0] + 1.0
        assert (not torch.equal(base, model.heads[0](model.decoder(feats)[0]))) == changes


# ---- receptive field ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upsample", ["transpose", "interpolate"])
@pytest.mark.parametrize("features,blocks,dec", [([2, 2], 1, 1), ([2, 2, 2], [1, 2, 1], 1), ([2, 2, 2, 2], 1, 2)])
def test_receptive_field_matches_gradient_support(upsample: str, features: list[int], blocks: object, dec: int) -> None:
    """Batch norm in eval mode is local, so the input-gradient support of one output voxel is its receptive field."""
    cfg = ModelConfig(spatial_dims=2, features=features, blocks_per_stage=blocks, decoder_blocks=dec, norm="batch",
                      upsample=upsample, zero_init_residual=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    rf, period = receptive_field(cfg), 2 ** (len(features) - 1)
    size = 2 * rf + 2 * period
    x = torch.randn(1, 1, size, 8, requires_grad=True)
    out = model(x)
    widths = []
    for c in range(size // 2, size // 2 + period):  # the support depends on the voxel's phase on the coarse grids
        (grad,) = torch.autograd.grad(out[0, 1, c, 4], x, retain_graph=True)
        rows = grad[0, 0].abs().sum(1).nonzero().flatten()
        widths.append(int(rows[-1] - rows[0] + 1))
    assert rows[0] > 0 and rows[-1] < size - 1  # the support lies inside the image, away from zero padding
    assert max(widths) == rf


def test_valid_margin_is_below_receptive_field() -> None:
    for depth in (2, 3, 4):
        cfg = ModelConfig(spatial_dims=2, features=[2] * depth, padding="valid")
        assert build_model(cfg).output_margin() < receptive_field(cfg)


# ---- summary --------------------------------------------------------------------------------------------------
def test_summary_counts() -> None:
    model = model_of(features=[4, 8, 16], skip_connections="none", padding="valid")
    text = summary_text(model, [31, 31])
    total = sum(p.numel() for p in model.parameters())
    removed = (4 * 4 + 8 * 8) * 9  # the first decoder conv of each level loses `width` inputs (3x3, no bias)
    assert re.search(rf"total parameters +{total:,}\n", text)
    assert re.search(rf"parameters vs all skips +-{removed:,}$", text)
    assert re.search(r"output margin \(valid; input - output\) +25\n", text)
    assert "(6, 6)" in text and "kept skips" in text
    assert summarize(model).row_count == len(text.splitlines()) - 2  # title line; no input size given
