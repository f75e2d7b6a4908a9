"""A residual-encoder U-Net, written to be read: encoder, decoder built from the encoder's channels, 1x1 heads.

Geometry (per axis; every axis follows the same rule, with its own strides and kernels):
- Stage 0 keeps the resolution; every later stage starts with a stride-2 3x3 conv, so there are `depth - 1`
  halvings and the decoder doubles back with a 2x upsampling per level.
- Anisotropic nets (`cfg.strides` / `cfg.kernels`, planned for data with one coarse axis) give each level a stride
  of 1 or 2 and each stage a kernel of 1 or 3 per axis: an axis with stride 1 is not halved at that level (and not
  upsampled back), an axis with kernel 1 is neither padded nor shrunk. Everything below then holds per axis, with
  `size_multiples()` (the product of an axis's strides) and `min_input_sizes()` in place of the isotropic numbers.
- `same` padding: any input size works and the output equals the input. An odd size is halved with rounding up
  (`ceil(n/2)`), and after upsampling the decoder map is centre-cropped back to the encoder map of that level
  (the extra voxel is dropped at the end, see `center_crop`). Sizes that are multiples of `size_multiple()` need no
  crop at all.
- `valid` padding (original U-Net): 3x3 convs pad nothing, so every conv eats one voxel per side. An input is
  allowed when every stride-2 conv sees an odd size (so no voxel is silently dropped); the allowed sizes are
  `min_input_size() + k * size_multiple()`, and the output is `input - output_margin()`. The encoder map is
  centre-cropped to the decoder map before concatenation.
Downsampling with a 3x3 stride-2 conv and upsampling with a 2x2 transposed conv place the coarse grid half a
voxel off the fine grid, in both modes; this is the usual (nnU-Net-style) trade-off and is why the valid-mode
skip crops differ by an odd number of voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from segment.config import ModelConfig
from segment.errors import GeometryError
from segment.nets.blocks import ConvNormAct, ResidualBlock, Upsample, center_crop, init_weights, make_conv


def blocks_list(cfg: ModelConfig) -> list[int]:
    """Residual blocks per encoder stage, as a list of length depth."""
    b = cfg.blocks_per_stage
    return list(b) if isinstance(b, list) else [b] * len(cfg.features)


class Encoder(nn.Module):
    """Stages of two-conv blocks (residual, or plain when `residual` is False); the first block of every stage after the first downsamples (by 2, or per axis)."""

    def __init__(self, cfg: ModelConfig, *, residual: bool = True) -> None:
        super().__init__()
        self.channels: list[int] = list(cfg.features)
        strides, kernels = [[1] * cfg.spatial_dims] + cfg.stride_list(), cfg.kernel_list()
        stages, cin = [], cfg.in_channels
        for s, (cout, n_blocks) in enumerate(zip(cfg.features, blocks_list(cfg))):
            blocks = [
                ResidualBlock(cfg.spatial_dims, cin if b == 0 else cout, cout, stride=strides[s] if b == 0 else 1,
                              padding=cfg.padding, norm=cfg.norm, act=cfg.act, preactivation=cfg.preactivation,
                              zero_init=cfg.zero_init_residual, residual=residual, kernel=kernels[s],
                              shortcut=cfg.shortcut)
                for b in range(n_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps of every stage, highest resolution first (the last one is the bottleneck)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """Upsample -> (crop + concat the kept skip) -> conv-norm-act blocks, one stage per encoder level but the last.

    Built from the encoder's channel list so the two halves cannot disagree. Stage `s` (0 = highest resolution)
    upsamples from `channels[s+1]` to `channels[s]`; its first conv sees `2 * channels[s]` inputs when the skip of
    level `s` is kept and `channels[s]` when it is not.
    """

    def __init__(self, channels: Sequence[int], kept: Sequence[int], *, dims: int, blocks: int, padding: str,
                 norm: str, act: str, upsample: str, strides: Sequence[Sequence[int]] | None = None,
                 kernels: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self.kept, self.padding = sorted(kept), padding
        strides = strides or [[2] * dims] * (len(channels) - 1)
        kernels = kernels or [[3] * dims] * len(channels)
        self.ups = nn.ModuleList(Upsample(dims, channels[s + 1], channels[s], upsample, scale=strides[s])
                                 for s in range(len(channels) - 1))
        self.stages = nn.ModuleList()
        for s in range(len(channels) - 1):
            cin = channels[s] * (2 if s in self.kept else 1)
            convs = [ConvNormAct(dims, cin if i == 0 else channels[s], channels[s], padding=padding, norm=norm, act=act,
                                 kernel=kernels[s])
                     for i in range(blocks)]
            self.stages.append(nn.Sequential(*convs))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Decoder maps at levels 0..depth-2 (highest resolution first)."""
        x, outs = feats[-1], []
        for s in reversed(range(len(self.stages))):
            x, skip = self.ups[s](x), feats[s]
            if self.padding == "same":  # odd sizes: the upsampled map is one voxel larger; crop it back
                x = center_crop(x, skip.shape[2:])
            if s in self.kept:
                x = torch.cat([center_crop(skip, x.shape[2:]), x], dim=1)
            x = self.stages[s](x)
            outs.insert(0, x)  # levels are visited deepest first
        return outs


class UNet(nn.Module):
    """U-Net with plain or residual encoder blocks (`cfg.encoder_block`) and switchable long skips. Build it with `build_model(cfg)`.

    One 1x1 head per decoder level is always built (level 0 = the main output), so checkpoint keys never depend on
    `cfg.deep_supervision`; whether the auxiliary outputs enter the loss is the trainer's business.
    `cfg.encoder_block="plain"` (or `residual=False`) builds the same network without the encoder's shortcuts.
    """

    def __init__(self, cfg: ModelConfig, *, residual: bool = True) -> None:
        super().__init__()
        self.cfg = cfg.model_copy(deep=True)
        self.encoder = Encoder(cfg, residual=residual and cfg.encoder_block == "residual")
        self.decoder = Decoder(self.encoder.channels, cfg.kept_skips(), dims=cfg.spatial_dims, blocks=cfg.decoder_blocks,
                               padding=cfg.padding, norm=cfg.norm, act=cfg.act, upsample=cfg.upsample,
                               strides=cfg.stride_list(), kernels=cfg.kernel_list())
        self.heads = nn.ModuleList(make_conv(cfg.spatial_dims, c, cfg.out_channels, 1, bias=True)
                                   for c in self.encoder.channels[:-1])
        init_weights(self, cfg.act)
        self._min_sizes = tuple(_min_valid_size(cfg, axis) for axis in range(cfg.spatial_dims))
        self._min_size = max(self._min_sizes)

    def forward(self, x: Tensor) -> Tensor:
        """Main logits `(N, out_channels, *output_size(x.shape[2:]))`."""
        self.output_size(x.shape[2:])
        return self.heads[0](self.decoder(self.encoder(x))[0])

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """`[main, aux at level 1, aux at level 2, ...]`; each aux is half the resolution of the one before (along the
        axes that level's stride halves)."""
        self.output_size(x.shape[2:])
        return [head(d) for head, d in zip(self.heads, self.decoder(self.encoder(x)))]

    # ---- geometry -------------------------------------------------------------------------------------------
    @property
    def anisotropic(self) -> bool:
        """Whether strides or kernels differ between axes (then the per-axis methods are the ones to use)."""
        return len(set(self._min_sizes)) > 1 or len(set(self.size_multiples())) > 1 or len(set(self.output_margins())) > 1

    def size_multiples(self) -> tuple[int, ...]:
        """Per axis, the product of its strides (2**(depth-1) when isotropic): the step between allowed valid-mode
        sizes; same-mode sizes divisible by it need no crop. A planned patch is divisible by it."""
        return tuple(math.prod(r[axis] for r in self.cfg.stride_list()) for axis in range(self.cfg.spatial_dims))

    def size_multiple(self) -> int:
        """The largest of `size_multiples()` (a multiple of each, being powers of 2); 2**(depth-1) when isotropic."""
        return max(self.size_multiples())

    def min_input_sizes(self) -> tuple[int, ...]:
        """Smallest allowed size of each axis (same mode: 1; the whole input must still leave >= 2 bottleneck voxels)."""
        return self._min_sizes

    def min_input_size(self) -> int:
        """Smallest allowed size per axis of an isotropic net (the largest of `min_input_sizes()` otherwise)."""
        return self._min_size

    def output_margins(self) -> tuple[int, ...]:
        """`input - output` of each axis for every allowed size (0 in same mode)."""
        return tuple(lo - _trace_axis(self.cfg, lo, axis)[1] for axis, lo in enumerate(self._min_sizes))

    def output_margin(self) -> int:
        """`input - output` per axis of an isotropic net; raises GeometryError for one whose axes differ."""
        margins = set(self.output_margins())
        if len(margins) > 1:
            raise GeometryError(f"output margin differs per axis {self.output_margins()}: use output_margins()")
        return margins.pop()

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for `input_size`; raises GeometryError (a ValueError) naming the allowed sizes."""
        sizes = [int(n) for n in input_size]
        if len(sizes) != self.cfg.spatial_dims:
            raise GeometryError(f"input size {tuple(sizes)}: expected {self.cfg.spatial_dims} spatial dims")
        for axis, n in enumerate(sizes):
            if not self._allowed(n, axis):
                raise GeometryError(f"input size {tuple(sizes)}: axis {axis} = {n} is not allowed; {self._rule(n, axis)}")
        bottleneck = [_trace_axis(self.cfg, n, axis)[0][-1] for axis, n in enumerate(sizes)]
        if math.prod(bottleneck) < 2:
            raise GeometryError(f"input size {tuple(sizes)} leaves a single voxel at the deepest stage, which "
                                f"normalisation cannot handle; use e.g. {self._min_sizes[0] + self.size_multiples()[0]} "
                                "voxels on one axis")
        return tuple(_trace_axis(self.cfg, n, axis)[1] for axis, n in enumerate(sizes))

    def input_size_for(self, output_size: Sequence[int]) -> tuple[int, ...]:
        """Smallest allowed input whose output is at least `output_size` on every axis."""
        out = []
        for axis, n in enumerate(output_size):
            lo, step, margin = self._min_sizes[axis], self.size_multiples()[axis], self.output_margins()[axis]
            if self.cfg.padding == "same":
                out.append(max(int(n), lo))
            else:
                out.append(lo + step * max(0, math.ceil((int(n) + margin - lo) / step)))
        return tuple(out)

    def _allowed(self, n: int, axis: int = 0) -> bool:
        if n < self._min_sizes[axis]:
            return False
        return self.cfg.padding == "same" or (n - self._min_sizes[axis]) % self.size_multiples()[axis] == 0

    def _rule(self, n: int, axis: int = 0) -> str:
        lo, step = self._min_sizes[axis], self.size_multiples()[axis]
        if self.cfg.padding == "same":
            return f"padding 'same' needs at least {lo} voxels per axis"
        below = lo + step * max(0, (n - lo) // step)
        near = f"{below} or {below + step}" if below < n else f"{lo}"
        return (f"padding 'valid' allows {lo} + k*{step} voxels {'per axis' if not self.anisotropic else 'on this axis'} "
                f"(nearest: {near}), giving an output {self.output_margins()[axis]} voxels smaller")


def _trace_axis(cfg: ModelConfig, n: int, axis: int = 0) -> tuple[list[int], int]:
    """Encoder sizes of every stage and the output size along one axis; -1 output when `n` is not allowed.

    A conv of kernel k removes k - 1 voxels in valid mode; a stride-s conv maps n to (n - k) // s + 1 (valid; only
    allowed when s divides n - k, so no voxel is silently dropped) or ceil(n / s) (same); the decoder multiplies by s.
    """
    valid = cfg.padding == "valid"
    strides = [1] + [r[axis] for r in cfg.stride_list()]
    kernels = [r[axis] for r in cfg.kernel_list()]
    enc: list[int] = []
    for s, n_blocks in enumerate(blocks_list(cfg)):
        k, st = kernels[s], strides[s]
        shrink = k - 1 if valid else 0  # voxels one conv of this stage removes
        for b in range(n_blocks):
            if b == 0 and st > 1:
                if valid and (n - k) % st != 0:
                    return enc, -1  # a strided valid conv would drop the last voxel(s)
                n = (n - k) // st + 1 if valid else -(-n // st)
                n -= shrink
            else:
                n -= 2 * shrink
            if n < 1:
                return enc, -1
        enc.append(n)
    d = enc[-1]
    for s in reversed(range(len(enc) - 1)):
        d = enc[s] if not valid else strides[s + 1] * d
        d -= (kernels[s] - 1 if valid else 0) * cfg.decoder_blocks
        if d < 1:
            return enc, -1
    return enc, d


def _min_valid_size(cfg: ModelConfig, axis: int = 0) -> int:
    """Smallest input along `axis` that passes `_trace_axis` (allowed sizes repeat every size multiple from there)."""
    for n in range(1, 1 << 16):
        if _trace_axis(cfg, n, axis)[1] > 0:
            return n
    raise GeometryError(f"model: no input size up to 65535 voxels works for features={cfg.features}")


def _deepest_path(cfg: ModelConfig, axis: int = 0) -> list[tuple[str, int, int]]:
    """Layers along the longest input-to-output path, in forward order: ('conv' | 'down' | 'up', kernel, stride)."""
    strides = [1] + [r[axis] for r in cfg.stride_list()]
    kernels = [r[axis] for r in cfg.kernel_list()]
    ops: list[tuple[str, int, int]] = []
    for s, n_blocks in enumerate(blocks_list(cfg)):
        for b in range(n_blocks):
            first = ("down", kernels[s], strides[s]) if s > 0 and b == 0 else ("conv", kernels[s], 1)
            ops += [first, ("conv", kernels[s], 1)]
    for s in reversed(range(len(cfg.features) - 1)):
        ops += [("up", 1, strides[s + 1])] + [("conv", kernels[s], 1)] * cfg.decoder_blocks
    return ops


def receptive_fields(cfg: ModelConfig) -> tuple[int, ...]:
    """`receptive_field` of every axis."""
    return tuple(receptive_field(cfg, axis) for axis in range(cfg.spatial_dims))


def receptive_field(cfg: ModelConfig, axis: int | None = None) -> int:
    """Theoretical receptive field (voxels along `axis`; None = the largest over the axes) of one output voxel,
    maximised over its position.

    Traces the input interval `[lo, hi]` an output voxel depends on back through the deepest path (every shallower
    path through a skip sees a sub-interval). Upsampling makes the answer depend on the voxel's phase on the coarse
    grids, so all phases (the product of the axis's strides) are tried; the closed-form `1 + sum (k-1)*jump` rule
    undercounts here.
    """
    if axis is None:
        return max(receptive_fields(cfg))
    path = _deepest_path(cfg, axis)
    widths = []
    for phase in range(math.prod(st for op, _, st in path if op == "down")):
        lo = hi = phase
        for op, k, st in reversed(path):
            r = k // 2
            if op == "conv":  # kernel k, stride 1
                lo, hi = lo - r, hi + r
            elif op == "down":  # kernel k, stride st
                lo, hi = st * lo - r, st * hi + r
            elif st == 1:  # an axis this level does not upsample
                continue
            elif cfg.upsample == "transpose":  # kernel = stride = st: fine voxel q reads coarse voxel q // st
                lo, hi = lo // st, hi // st
            else:  # linear, align_corners=False: fine q reads coarse (q-1)//2 and (q-1)//2 + 1
                lo, hi = (lo - 1) // 2, (hi - 1) // 2 + 1
        widths.append(hi - lo + 1)
    return max(widths)


def build_model(cfg: ModelConfig) -> UNet:
    """The one way the rest of the code gets a network."""
    return UNet(cfg)
