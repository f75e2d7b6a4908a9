"""Building blocks of the U-Net: centre crop, conv-norm-act, the residual block, and upsampling.

Conventions used throughout `segment.nets`:
- All 3x3 convolutions use padding 1 in `same` mode and padding 0 in `valid` mode (each shrinks a map by 2 voxels
  per axis). Convolutions followed by a norm carry no bias (the norm's shift makes it redundant).
- Kernels and strides may differ per axis (anisotropic plans: a 3x3x1 kernel and a 2x2x1 stride leave a coarse axis
  alone); a kernel-1 axis is never padded and never shrinks. An int means the same value on every axis.
- Layers come from MONAI's factories (`get_norm_layer`, `get_act_layer`, `Conv`, `Pool`), so 2D and 3D share one code
  path. Our config names ("instance", "batch", "leakyrelu", "relu") are MONAI's factory names, and the factories build
  the plain torch modules (`nn.InstanceNorm3d(c, affine=True)`, `nn.LeakyReLU(0.01)`, ...), so state_dict keys are
  the same as with hand-picked torch classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import Tensor, nn

Padding = Literal["same", "valid"]
Shortcut = Literal["conv", "avgpool"]
NEG_SLOPE = 0.01  # LeakyReLU slope; also the `a` of the Kaiming init


def center_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop the trailing `len(size)` dims of `x` to `size`, centred.

    Each axis drops `(n - s) // 2` voxels at the start and the rest at the end, so when `n - s` is odd the extra
    voxel is removed from the END (high-index side). This is the same convention as MONAI's `CenterSpatialCrop`.
    """
    size = [int(s) for s in size]
    spatial = x.shape[x.dim() - len(size):]
    if len(size) > x.dim() or any(s < 0 or s > n for s, n in zip(size, spatial)):
        raise ValueError(f"center_crop: cannot crop trailing dims {tuple(spatial)} to {tuple(size)}")
    index: list[slice] = [slice(None)] * (x.dim() - len(size))
    index += [slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(spatial, size)]
    return x[tuple(index)]


def make_norm(kind: str, dims: int, channels: int) -> nn.Module:
    """Instance or batch norm (`kind` is MONAI's factory name), always affine so the scale can be zero-initialised."""
    return get_norm_layer((kind, {"affine": True}), spatial_dims=dims, channels=channels)


def make_act(kind: str) -> nn.Module:
    """LeakyReLU(0.01) or ReLU; never in-place, because residual blocks reuse their input after the branch."""
    return get_act_layer(("leakyrelu", {"negative_slope": NEG_SLOPE}) if kind == "leakyrelu" else kind)


def per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """An int or a per-axis sequence as a tuple of `dims` ints."""
    out = (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dims:
        raise ValueError(f"expected {dims} per-axis values, got {value}")
    return out


def make_conv(dims: int, cin: int, cout: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
              padding: Padding = "same", bias: bool = False) -> nn.Module:
    """A `kernel` convolution (an int: the same on every axis); `same` pads kernel//2 per axis, `valid` pads nothing."""
    k, st = per_axis(kernel, dims), per_axis(stride, dims)
    pad = tuple(n // 2 for n in k) if padding == "same" else 0
    return Conv[Conv.CONV, dims](cin, cout, kernel_size=k, stride=st, padding=pad, bias=bias)


def make_shortcut(dims: int, cin: int, cout: int, stride: Sequence[int], norm: str, kind: Shortcut = "conv") -> nn.Module:
    """The projection shortcut of a block that changes channels or resolution: a 1x1 conv + norm.

    `conv`: the 1x1 conv carries the block's stride (keys `0.weight`, `1.*`), so it reads one voxel of every
    stride-sized block. `avgpool` (ResNet-D): average pooling with kernel = stride first, then a stride-1 1x1 conv
    (keys `1.weight`, `2.*`), so every input voxel reaches the output. The pool uses `ceil_mode`, so a size that is not a
    multiple of the stride gives `ceil(n / s)` outputs like the strided conv, the last one averaging the voxels left
    (PyTorch divides by the voxels inside the input when the window hangs over its end); a stride-1 axis has a
    pooling kernel of 1. Both variants give the same modules when the stride is 1 on every axis.
    """
    if kind == "avgpool" and any(s != 1 for s in stride):
        pool = Pool[Pool.AVG, dims](kernel_size=tuple(stride), stride=tuple(stride), ceil_mode=True)
        return nn.Sequential(pool, make_conv(dims, cin, cout, 1, 1, "valid"), make_norm(norm, dims, cout))
    return nn.Sequential(make_conv(dims, cin, cout, 1, stride, "valid"), make_norm(norm, dims, cout))


class ConvNormAct(nn.Sequential):
    """3x3 conv (or the given per-axis kernel) -> norm -> act: one decoder "block"."""

    def __init__(self, dims: int, cin: int, cout: int, *, padding: Padding, norm: str, act: str,
                 kernel: int | Sequence[int] = 3) -> None:
        super().__init__(make_conv(dims, cin, cout, kernel, padding=padding), make_norm(norm, dims, cout), make_act(act))


class ResidualBlock(nn.Module):
    """Two 3x3 convs with a shortcut.

    Post-activation (default): `out = act(F(x) + shortcut(x))` with `F = conv-norm-act-conv-norm`.
    Pre-activation (He et al. 2016): `out = F(x) + shortcut(x)` with `F = norm-act-conv-norm-act-conv`.
    The shortcut is the identity, or a projection (`make_shortcut`: a strided 1x1 conv + norm, or with
    `shortcut="avgpool"` average pooling + 1x1 conv + norm) when channels or stride change.
    In `valid` mode the branch shrinks the map, so the shortcut takes the centre of `x`: it is cropped by one voxel
    per side (kernel // 2 per axis) before the projection (a strided conv's samples then sit exactly on the strided
    3x3 conv's centres; a pooling block starts there), and centre-cropped to the branch's output afterwards. In both
    modes a pooling block of an even stride is centred half a voxel after the 3x3 conv's centre, as in ResNet-D.
    `kernel` and `stride` may differ per axis.

    `zero_init` zeroes the scale of the branch's last norm, so at initialisation `F(x) == 0` (pre-activation:
    every conv is bias-free, so the zeroed norm gives act(0) = 0 and conv(0) = 0). Hence at init a block with an
    identity shortcut is exactly the identity (pre-activation) or exactly `act(x)` (post-activation); a block with
    a projection equals `shortcut(x)` resp. `act(shortcut(x))`.

    `residual=False` drops the shortcut (a plain conv stack of the same depth: conv-norm-act-conv-norm-act), as
    `model.encoder_block: plain` builds it; zero_init then does nothing.
    """

    def __init__(self, dims: int, cin: int, cout: int, *, stride: int | Sequence[int] = 1, padding: Padding = "same",
                 norm: str = "instance", act: str = "leakyrelu", preactivation: bool = False,
                 zero_init: bool = True, residual: bool = True, kernel: int | Sequence[int] = 3,
                 shortcut: Shortcut = "conv") -> None:
        super().__init__()
        self.padding, self.preactivation, self.residual = padding, preactivation, residual
        self.kernel, stride = per_axis(kernel, dims), per_axis(stride, dims)
        conv1 = make_conv(dims, cin, cout, self.kernel, stride, padding)
        conv2 = make_conv(dims, cout, cout, self.kernel, 1, padding)
        if preactivation:
            layers = [make_norm(norm, dims, cin), make_act(act), conv1, make_norm(norm, dims, cout), make_act(act), conv2]
            self.last_norm = layers[3]
        else:
            layers = [conv1, make_norm(norm, dims, cout), make_act(act), conv2, make_norm(norm, dims, cout)]
            self.last_norm = layers[4]
        self.branch = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if residual and (cin != cout or any(s != 1 for s in stride)):
            self.shortcut = make_shortcut(dims, cin, cout, stride, norm, shortcut)
        self.act = nn.Identity() if preactivation else make_act(act)
        self.zero_init = zero_init

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        if self.residual:
            if self.padding == "valid":
                x = center_crop(x, [n - 2 * (k // 2) for n, k in zip(x.shape[2:], self.kernel)])
            out = out + center_crop(self.shortcut(x), out.shape[2:])
        return self.act(out)


class Upsample(nn.Module):
    """Multiply the spatial size by `scale` (2 on every axis by default, or per axis) and map `cin` -> `cout` channels.

    `transpose`: a transposed conv with kernel = stride = scale (2x2 stride 2). `interpolate`: a 1x1 conv followed by
    (bi/tri)linear interpolation; the two commute exactly (interpolation weights sum to one), and convolving on the
    coarse grid first is 2^dims times cheaper than the textbook order.
    """

    def __init__(self, dims: int, cin: int, cout: int, mode: str = "transpose", scale: int | Sequence[int] = 2) -> None:
        super().__init__()
        self.mode, self.scale = mode, per_axis(scale, dims)
        if mode == "transpose":
            self.conv = Conv[Conv.CONVTRANS, dims](cin, cout, kernel_size=self.scale, stride=self.scale, bias=True)
        else:
            self.conv = Conv[Conv.CONV, dims](cin, cout, kernel_size=1, bias=True)
        self._interp = "bilinear" if dims == 2 else "trilinear"

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.mode == "transpose":
            return x
        factor = 2.0 if len(set(self.scale)) == 1 and self.scale[0] == 2 else tuple(float(f) for f in self.scale)
        return nn.functional.interpolate(x, scale_factor=factor, mode=self._interp, align_corners=False)


def init_weights(module: nn.Module, act: str) -> None:
    """Kaiming-normal convs (fan-in as in nnU-Net, matching the activation), zero biases, unit norms; then zero residual scales."""
    nonlin, a = ("leaky_relu", NEG_SLOPE) if act == "leakyrelu" else ("relu", 0.0)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=a, mode="fan_in", nonlinearity=nonlin)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm2d, nn.BatchNorm3d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, ResidualBlock) and m.zero_init and m.residual:
            with torch.no_grad():
                m.last_norm.weight.zero_()
