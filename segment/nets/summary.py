"""A readable model summary: parameters per stage, receptive field, valid-mode margin, and what the skips cost.

The rows are plain data (`summary_rows`), rendered either as a rich table (`summarize`) or as plain text
(`summary_text`, for logs and terminals without rich).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # rich is imported lazily: summaries are optional, imports of the network should stay cheap
    from rich.table import Table

    from segment.config import ModelConfig
    from segment.nets.unet import UNet


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _params_with_all_skips(model: UNet) -> int:
    """Parameters of the same config with every skip kept, built on the meta device (no memory, no init cost)."""
    from segment.nets.unet import UNet

    with torch.device("meta"):
        twin = UNet(model.cfg.model_copy(update={"skip_connections": "all"}))
    return _count(twin)


def _axes(values: Sequence[int]) -> str:
    """Per-axis values as 3x3x1."""
    return "x".join(str(v) for v in values)


def _stage_rows(model: UNet) -> list[tuple[str, str]]:
    kept = model.cfg.kept_skips()
    per_axis = model.cfg.strides is not None or model.cfg.kernels is not None
    strides, kernels = [None] + model.cfg.stride_list(), model.cfg.kernel_list()
    rows = []
    for s, stage in enumerate(model.encoder.stages):
        shape = ""
        if per_axis:  # anisotropic plan: the stride into this stage and its kernel, per axis
            shape = f", kernel {_axes(kernels[s])}" + (f", stride {_axes(strides[s])}" if strides[s] else "")
        rows.append((f"encoder stage {s} ({model.encoder.channels[s]} ch, blocks: {len(stage)}{shape})", f"{_count(stage):,}"))
    for s in reversed(range(len(model.decoder.stages))):
        skip = "skip kept" if s in kept else "no skip"
        shape = f", up {_axes(strides[s + 1])}, kernel {_axes(kernels[s])}" if per_axis else ""
        rows.append((f"decoder stage {s} ({skip}{shape})", f"{_count(model.decoder.ups[s], model.decoder.stages[s]):,}"))
    rows.append((f"heads ({len(model.heads)}, main + aux)", f"{_count(model.heads):,}"))
    return rows


def _geometry_rows(model: UNet, input_size: Sequence[int] | None) -> list[tuple[str, str]]:
    from segment.nets.unet import receptive_field, receptive_fields

    if not model.anisotropic:
        rows = [("receptive field (voxels per axis)", str(receptive_field(model.cfg)))]
        lo, step = model.min_input_size(), model.size_multiple()
        if model.cfg.padding == "valid":
            rows.append(("output margin (valid; input - output)", str(model.output_margin())))
            rows.append(("allowed input sizes per axis", f"{lo} + k*{step}"))
        else:
            rows.append(("output margin (same)", "0"))
            rows.append(("input sizes per axis", f"any >= {lo} (multiples of {step} need no internal crop)"))
    else:  # strides and kernels differ between axes: every number per axis
        los, steps = model.min_input_sizes(), model.size_multiples()
        rows = [("receptive field (voxels, per axis)", _axes(receptive_fields(model.cfg))),
                ("size multiple (product of strides, per axis)", _axes(steps))]
        if model.cfg.padding == "valid":
            rows.append(("output margin (valid; input - output, per axis)", _axes(model.output_margins())))
            rows.append(("allowed input sizes (per axis)", ", ".join(f"{lo} + k*{st}" for lo, st in zip(los, steps))))
        else:
            rows.append(("output margin (same)", "0"))
            rows.append(("input sizes (per axis)", f"any >= {_axes(los)} (multiples of {_axes(steps)} need no internal crop)"))
    if input_size is not None:
        rows.append((f"output size for {tuple(input_size)}", str(model.output_size(input_size))))
    return rows


def summary_rows(model: UNet, input_size: Sequence[int] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the summary; `input_size` adds its output size (and raises if it is not allowed)."""
    total = _count(model)
    kept = model.cfg.kept_skips()
    diff = total - _params_with_all_skips(model)
    rows = _stage_rows(model)
    rows.append(("total parameters", f"{total:,}"))
    rows.append(("downsampling shortcut", {"conv": "strided 1x1 conv", "avgpool": "avgpool + 1x1 conv"}[model.cfg.shortcut]))
    rows += _geometry_rows(model, input_size)
    rows.append(("kept skips (level 0 = highest resolution)", str(kept) if kept else "none"))
    rows.append(("parameters vs all skips", f"{diff:+,}"))
    return rows


def summarize(model: UNet, input_size: Sequence[int] | None = None) -> Table:
    """The summary as a rich table (print it with `rich.print` or a `Console`)."""
    from rich.table import Table

    cfg = model.cfg
    table = Table(title=_head(cfg))
    table.add_column("part")
    table.add_column("value", justify="right")
    for label, value in summary_rows(model, input_size):
        table.add_row(label, value)
    return table


def summary_text(model: UNet, input_size: Sequence[int] | None = None) -> str:
    """The same summary as aligned plain text."""
    rows = summary_rows(model, input_size)
    width = max(len(label) for label, _ in rows)
    return "\n".join([_head(model.cfg)] + [f"{label.ljust(width)}  {value}" for label, value in rows])


def _head(cfg: ModelConfig) -> str:
    head = f"U-Net {cfg.spatial_dims}D, padding {cfg.padding}, features {cfg.features}"
    if cfg.strides is not None or cfg.kernels is not None:
        head += (f", strides {' '.join(_axes(r) for r in cfg.stride_list())}"
                 f", kernels {' '.join(_axes(r) for r in cfg.kernel_list())}")
    return head
