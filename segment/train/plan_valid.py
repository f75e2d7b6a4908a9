"""Planning for valid padding (the original U-Net): the input patch, output patch and batch of a valid-padded network.

A valid-padded network's output is its input less a fixed margin per axis (`UNet.output_margins()`, 53 voxels for a
4-level 3x3 net), and only inputs of `min_input_sizes() + k * size_multiples()` voxels are allowed. The rules:

- The network keeps the shape the same-mode planner gave it (depth, widths, per-axis strides and kernels), so the
  two modes differ only in padding.
- The target output is the same-mode patch; the input is the smallest allowed one whose output covers it
  (`UNet.input_size_for`): input = output + margin.
- Memory: a step may hold as many input voxels as the same-mode step does (batch x patch of the same-mode plan). While
  one input is more than that, the output shrinks along its physically longest axis, one size step at a time; if even
  the smallest useful input (an output of one size step per axis) does not fit, the deepest level is dropped.
  The batch is then as many inputs as fit (1 to 16).
- A given `data.patch_size` is the input patch and must be allowed (one-line error naming the allowed sizes); a given
  `data.batch_size` is kept.

The network's size arithmetic lives in `segment.nets.unet` only (`model-info` prints the same numbers). This module
sits in the train layer because the plan (data layer) may not import the network (nets layer); `plan_run` is the one
planning entry point of training and the ablation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from segment.config import Config, ModelConfig
from segment.data.plan import Plan, make_plan
from segment.errors import ConfigError, GeometryError
from segment.io.dataset import Dataset
from segment.nets import build_model
from segment.nets.unet import UNet

MAX_BATCH = 16


def plan_run(dataset: Dataset, cfg: Config, device: str = "cpu") -> tuple[Plan, dict]:
    """`make_plan`, turned into a valid-padding plan when `model.padding` is 'valid'."""
    plan, fp = make_plan(dataset, cfg, device=device)
    if cfg.model.padding == "valid":
        plan = plan_valid(plan, cfg)
    return plan, fp


def planned_model(plan: Plan, cfg: Config, depth: int | None = None) -> UNet:
    """The network the plan describes (on the meta device: geometry only, no weights), cut to `depth` levels."""
    d = depth or len(plan.features)
    model_cfg: ModelConfig = cfg.model.model_copy(update=dict(
        features=list(plan.features[:d]), in_channels=plan.channels, out_channels=len(plan.labels),
        strides=[list(r) for r in plan.strides[:d - 1]] if plan.strides else None,
        kernels=[list(r) for r in plan.kernels[:d]] if plan.kernels else None,
    ))
    if isinstance(model_cfg.blocks_per_stage, list):
        model_cfg.blocks_per_stage = list(model_cfg.blocks_per_stage[:d])
    with torch.device("meta"):
        return build_model(model_cfg)


def _fits(model: UNet, budget: int) -> bool:
    """Whether the input of the smallest useful output (one size step per axis) fits the voxel budget."""
    try:
        return math.prod(model.input_size_for(model.size_multiples())) <= budget
    except GeometryError:
        return False


def valid_patch(model: UNet, target_output: Sequence[int], spacing: Sequence[float], budget: int) -> tuple[list[int], list[int]]:
    """(input, output) of the largest output up to about `target_output` whose input has at most `budget` voxels
    (or the smallest allowed input when none has)."""
    steps, lows = model.size_multiples(), model.min_input_sizes()
    inp = list(model.input_size_for([max(1, int(t)) for t in target_output]))
    while math.prod(inp) > budget:
        out = model.output_size(inp)
        shrinkable = [a for a in range(len(inp)) if inp[a] - steps[a] >= lows[a] and _allowed(model, inp, a)]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: out[a] * spacing[a])
        inp[axis] -= steps[axis]
    return inp, list(model.output_size(inp))


def _allowed(model: UNet, inp: Sequence[int], axis: int) -> bool:
    smaller = list(inp)
    smaller[axis] -= model.size_multiples()[axis]
    try:
        model.output_size(smaller)
        return True
    except GeometryError:
        return False


def plan_valid(plan: Plan, cfg: Config) -> Plan:
    """The valid-padding version of a same-padding plan (see the module docstring for the rules)."""
    budget = plan.batch_size * math.prod(plan.patch_size)  # input voxels of one same-mode step
    per_input = budget // cfg.data.batch_size if cfg.data.batch_size else budget
    if cfg.data.patch_size:
        model = planned_model(plan, cfg)
        inp = [int(p) for p in cfg.data.patch_size]
        try:
            out = list(model.output_size(inp))
        except GeometryError as e:
            raise ConfigError(f"data.patch_size={inp} with model.padding=valid: {e}") from None
    else:
        depth = len(plan.features)
        while depth > 2 and not _fits(planned_model(plan, cfg, depth), per_input):
            depth -= 1
        model = planned_model(plan, cfg, depth)
        inp, out = valid_patch(model, plan.patch_size, plan.spacing, per_input)
    batch = cfg.data.batch_size or max(1, min(MAX_BATCH, budget // math.prod(inp)))
    d = len(model.cfg.features)
    return dataclasses.replace(
        plan, patch_size=inp, output_size=out, batch_size=int(batch), features=list(plan.features[:d]),
        strides=[list(r) for r in plan.strides[:d - 1]] if plan.strides else None,
        kernels=[list(r) for r in plan.kernels[:d]] if plan.kernels else None,
    )

