"""The network trains: gradient flow through residual shortcuts, skip-free training, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segment.config import ModelConfig
from segment.nets import build_model
from segment.nets.unet import UNet


def first_conv_grad(blocks: int, residual: bool, seed: int = 0) -> float:
    """Gradient norm reaching the very first encoder conv after one cross-entropy backward pass."""
    torch.manual_seed(seed)
    cfg = ModelConfig(spatial_dims=2, features=[8, 16], blocks_per_stage=blocks, zero_init_residual=False, encoder_block="residual",
                      skip_connections="none")
    model = UNet(cfg, residual=residual)
    g = torch.Generator().manual_seed(100 + seed)
    x, target = torch.randn(2, 1, 16, 16, generator=g), torch.randint(0, 2, (2, 16, 16), generator=g)
    nn.functional.cross_entropy(model(x), target).backward()
    return model.encoder.stages[0][0].branch[0].weight.grad.norm().item()


def test_residual_shortcuts_keep_first_layer_gradient_stable_with_depth() -> None:
    """Going from 1 to 8 blocks per stage (4 -> 32 encoder convs), the gradient at the first conv.

    Measured (seed 0): with shortcuts it grows ~3x (seeds 0-7: 3-8x); without shortcuts ~53x (seeds 0-7: 53-200x),
    and at 8 blocks the plain net's first-layer gradient is ~12x the residual one (seeds 0-7: 12-62x).
    With a norm after every conv the plain stack does not vanish but *explodes* backwards (the known behaviour of
    deep normalised plain nets at init); the shortcut is what keeps the gradient scale independent of depth.
    """
    res_1, res_8 = first_conv_grad(1, True), first_conv_grad(8, True)
    plain_1, plain_8 = first_conv_grad(1, False), first_conv_grad(8, False)
    assert res_8 / res_1 < 6
    assert plain_8 / plain_1 > 25
    assert plain_8 / res_8 > 5


def test_zero_init_gives_shortcut_only_gradient_to_first_branch() -> None:
    """With zero-initialised residual scales the branch convs get no gradient at step 0 (only the scales do)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(spatial_dims=2, features=[4, 8], blocks_per_stage=2, encoder_block="residual"))
    nn.functional.cross_entropy(model(torch.randn(2, 1, 12, 12)), torch.randint(0, 2, (2, 12, 12))).backward()
    block = model.encoder.stages[0][1]
    assert block.branch[0].weight.grad.abs().max() == 0
    assert block.last_norm.weight.grad.abs().max() > 0


def toy_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.avg_pool2d(torch.randn(4, 1, 16, 16, generator=g), 3, 1, 1) * 3
    return x, (x[:, 0] > 0).long()


@pytest.mark.parametrize("skips", ["none", [0]])
def test_reduced_skip_models_train(skips: object) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(spatial_dims=2, features=[4, 8, 8], skip_connections=skips))
    x, target = toy_batch(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]  # measured: none 0.77 -> 0.58, [0] 1.27 -> 0.44


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("upsample,norm", [("transpose", "instance"), ("interpolate", "batch")])
def test_bf16_autocast_step_is_finite(padding: str, upsample: str, norm: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(spatial_dims=3, features=[4, 8, 8], padding=padding, upsample=upsample, norm=norm,
                      out_channels=3, preactivation=padding == "valid")
    model = build_model(cfg)
    size = (12, 13, 11) if padding == "same" else (model.min_input_size(),) * 3
    x = torch.randn(2, 1, *size)
    target = torch.randint(0, 3, (2, *model.output_size(size)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model.forward_all(x)
        loss = nn.functional.cross_entropy(outs[0].float(), target)
    loss.backward()
    assert outs[0].dtype == torch.bfloat16
    assert torch.isfinite(loss) and 0.1 < loss.item() < 10
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
