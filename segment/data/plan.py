"""Automatic planning from a dataset fingerprint: spacing, patch size, depth and batch size that fit the data and device.

The plan is printed, saved as `plan.json` in the run folder and embedded in every checkpoint, so inference
preprocesses exactly as training did. Any planned value can be overridden in the config.

Anisotropic data (`data.anisotropic`, on by default; nnU-Net's ExperimentPlanner rules, see `fullres_target_spacing`
and `plan_pooling`): when the coarsest axis of the target spacing is more than 2x the finest, the network gets per-axis
strides and kernels. At each level an axis is pooled only if its current spacing is <= 2x the finest current spacing
and it still has >= 8 voxels (2x the 4-voxel bottleneck); its kernel is 1 while it is > 2x coarser than the finest axis
and 3 from then on (a 3x3x1 conv on the first levels of a 0.6x0.6x3.6 mm prostate MR). The target spacing is the
median per axis, except that a coarse axis more than 3x coarser than the others, with fewer than a third of their
voxels, takes the 10th percentile of its spacings (but never finer than the other axes). Data within a factor 2 is
planned exactly as before (`strides`/`kernels` None: every axis pooled at every level, 3x3x3 kernels); nnU-Net's
thresholds are strict ("< 2x"), ours "<= 2x", so 1x1x2 mm data keeps the isotropic plan. Measured on hippocampus
resampled to 1x1x4 mm: +0.028 Dice, -0.55 mm HD95 over the old plan, both CIs excluding zero (BENCHMARKS.md).

Modality: `segment.data.modality` (dataset.json, --modality, or detected Hounsfield units).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from segment.config import Config
from segment.data.fingerprint import fingerprint
from segment.data.labels import values_to_classes
from segment.data.modality import decide_modalities
from segment.io.dataset import Dataset
from segment.io.geometry import resampled_shape


@dataclass
class Plan:
    """Everything preprocessing and the network shape depend on, beyond the user's config."""

    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    features: list[int]
    modality: str  # 'ct', 'mri' (per-image z-score) or 'mixed' (see channel_modalities)
    channels: int
    labels: dict[int, str]  # class index 0..K-1 -> name
    ct_clip: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    ct_mean: float = 0.0
    ct_std: float = 1.0
    median_shape: list[int] = field(default_factory=list)
    num_cases: int = 0
    # canonical axes mirrored in training augmentation and test-time augmentation; None (plans written before this
    # field existed) means every axis
    mirror_axes: list[int] | None = None
    # normalisation of each channel, 'ct' (clip + dataset z-score) or 'mri' (per-image z-score); None (plans written
    # before this field existed) means every channel follows `modality`
    channel_modalities: list[str] | None = None
    # the label value on disk of each class index (dataset.json's 0, 1, 3 -> classes 0, 1, 2); None means class i is
    # value i. Applied by segment.data.labels.encode_labels / decode_labels
    label_values: list[int] | None = None
    # per-axis stride of each downsampling (depth - 1 lists) and conv kernel of each stage (depth lists), planned for
    # anisotropic spacing; None (isotropic data, and plans written before these fields existed) = 2 and 3 on every axis
    strides: list[list[int]] | None = None
    kernels: list[list[int]] | None = None
    # which rule decided the modality: "--modality", "dataset.json", "detected: ..." (None in older plans)
    modality_source: str | None = None
    # valid padding only (segment.train.plan_valid): the network's output for one `patch_size` input, centred in it
    # (margin = patch_size - output_size); None for same padding, where the output is the patch
    output_size: list[int] | None = None

    def output_margins(self) -> list[int] | None:
        """input - output per axis of a valid-padding plan; None for same padding."""
        if self.output_size is None:
            return None
        return [int(i) - int(o) for i, o in zip(self.patch_size, self.output_size)]

    def tta_axes(self) -> list[int]:
        return list(range(len(self.patch_size))) if self.mirror_axes is None else list(self.mirror_axes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["labels"] = {int(k): v for k, v in d["labels"].items()}
        return cls(**d)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def patch_budget(device: str) -> int:
    """Voxels of the (same-mode) patch the planner aims for on `device`."""
    return 128**3 if device == "cuda" else 64**3


def step_voxels(device: str) -> int:
    """Input voxels per training step (batch x patch) the batch size aims for; CPU: ~0.5 s per step for 16-wide
    4-level nets."""
    return 2 * 128**3 if device == "cuda" else 448_000


def _round_up(n: float, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def plan_patch(median_shape: Sequence[int], budget_voxels: int, max_depth: int = 5, min_bottleneck: int = 4) -> tuple[list[int], int]:
    """Patch covering the median case (shrunk along the longest axis until it fits the budget), and the U-Net depth.

    Depth: as many stride-2 levels as keep the smallest patch axis >= `min_bottleneck` voxels at the bottleneck.
    """
    patch = [float(s) for s in median_shape]
    while np.prod(patch) > budget_voxels:
        i = int(np.argmax(patch))
        patch[i] *= 0.9
    depth = max(2, min(max_depth, int(math.log2(max(min(patch), min_bottleneck) / min_bottleneck)) + 1))
    multiple = 2 ** (depth - 1)
    return [max(multiple * 2, _round_up(p, multiple)) for p in patch], depth


ANISOTROPY = 2.0  # an axis more than this much coarser than the finest is not pooled and gets kernel 1 (per level)
SPACING_ANISOTROPY = 3.0  # nnU-Net's anisotropy_threshold of the target-spacing rule


def is_anisotropic(spacing: Sequence[float]) -> bool:
    """Whether the coarsest axis is more than `ANISOTROPY` times the finest (then pooling is planned per axis)."""
    return max(spacing) > ANISOTROPY * min(spacing) * (1 + 1e-6)


def fullres_target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                           threshold: float = SPACING_ANISOTROPY) -> list[float]:
    """Median spacing per axis; a much coarser axis (> `threshold` x the others, and < 1/threshold of their median
    voxel counts) takes the 10th percentile of its spacings instead, but never below the other axes' spacing.

    nnU-Net's `ExperimentPlanner.determine_fullres_target_spacing`: resampling thick-slice scans of a mixed dataset to
    their median slice thickness would throw away the resolution of the thinner ones.
    """
    sp = np.asarray(spacings, dtype=float)
    target = np.percentile(sp, 50, axis=0)
    size = np.percentile(np.asarray(shapes, dtype=float), 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    if not others:
        return target.tolist()
    other_spacing = max(target[a] for a in others)
    if target[worst] > threshold * other_spacing and size[worst] * threshold < min(size[a] for a in others):
        tenth = float(np.percentile(sp[:, worst], 10))
        target[worst] = tenth if tenth >= other_spacing else max(other_spacing, tenth) + 1e-5
    return target.tolist()


def plan_pooling(patch: Sequence[float], spacing: Sequence[float], max_depth: int = 5,
                 min_bottleneck: int = 4) -> tuple[list[list[int]], list[list[int]]]:
    """Per-axis strides of each level and kernels of each stage, nnU-Net's `get_pool_and_conv_props` with our limits.

    Level by level: an axis is pooled if it still has >= 2 * `min_bottleneck` voxels (a lone axis: 3x) and its current
    spacing is <= 2x the finest current spacing among those axes; a stage's kernel is 1 along an axis > 2x coarser than
    the finest current spacing and 3 once it has caught up (and stays 3); the bottleneck's kernel is 3 on every axis.
    At most `max_depth` stages; at least 2 (one level pools the fine axes even when the patch is tiny).
    Returns (strides: depth - 1 lists, kernels: depth lists).
    """
    dims = len(spacing)
    current, size = [float(v) for v in spacing], [float(v) for v in patch]
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    kernel = [1] * dims

    def close(axis: int, finest: float) -> bool:
        return current[axis] <= ANISOTROPY * finest * (1 + 1e-6)

    while len(strides) < max_depth - 1:
        axes = [a for a in range(dims) if size[a] >= 2 * min_bottleneck]
        if not axes and strides:
            break
        if not axes:  # the patch is too small for any level: still pool the fine axes once (depth 2, as plan_patch)
            axes = list(range(dims))
        finest = min(current[a] for a in axes)
        axes = [a for a in axes if close(a, finest)]
        if strides and len(axes) == 1 and size[axes[0]] < 3 * min_bottleneck:
            break
        kernel = [3 if kernel[a] == 3 or close(a, min(current)) else 1 for a in range(dims)]
        kernels.append(list(kernel))
        strides.append([2 if a in axes else 1 for a in range(dims)])
        for a in axes:
            current[a] *= 2
            size[a] /= 2
    kernels.append([3] * dims)
    return strides, kernels


def _shrink_to_budget(shape: Sequence[int], spacing: Sequence[float], budget_voxels: int) -> list[float]:
    """The median shape, its physically longest axis (mm) shrunk by 0.9 until the patch fits the voxel budget."""
    patch = [float(s) for s in shape]
    while np.prod(patch) > budget_voxels:
        i = int(np.argmax([p * s for p, s in zip(patch, spacing)]))
        patch[i] *= 0.9
    return patch


def _round_to_strides(patch: Sequence[float], strides: Sequence[Sequence[int]]) -> list[int]:
    """Each axis rounded up to a multiple of the product of its strides, and at least twice that."""
    multiples = [int(np.prod([r[a] for r in strides])) for a in range(len(patch))]
    return [max(m * 2, _round_up(p, m)) for p, m in zip(patch, multiples)]


def planned_widths(given: list[int], depth: int) -> list[int]:
    """Channels per stage for a planned depth: the given widths, cut to `depth` or continued by doubling the last
    (so a cheap first stage such as [8, 32, 64, 128] keeps its shape at any depth)."""
    widths = list(given[:depth])
    while len(widths) < depth:
        widths.append(widths[-1] * 2)
    return widths


def make_plan(dataset: Dataset, cfg: Config, device: str = "cpu") -> tuple[Plan, dict]:
    """Plan spacing, patch, depth and batch from the fingerprint; config values override planned ones.

    The plan is for same padding; `segment.train.plan_valid.plan_run` turns it into a valid-padding plan (that needs
    the network's size arithmetic, which lives a layer above this one).
    """
    kinds, source = decide_modalities(dataset, cfg.data.modality)
    fp = fingerprint(dataset, intensity_channels=[c for c, k in enumerate(kinds) if k == "ct"] or [0])
    if cfg.data.target_spacing:
        spacing = list(cfg.data.target_spacing)
    elif cfg.data.anisotropic:
        spacing = fullres_target_spacing(fp["spacings"], fp["shapes"])
    else:
        spacing = list(fp["median_spacing"])
    resampled = [list(resampled_shape(shape, sp, spacing)) for shape, sp in zip(fp["shapes"], fp["spacings"])]
    median_shape = [int(v) for v in np.median(np.array(resampled), axis=0)]
    budget = patch_budget(device)
    strides: list[list[int]] | None = None
    kernels: list[list[int]] | None = None
    if cfg.model.strides is not None or cfg.model.kernels is not None:  # given: the network's shape is the user's
        strides, kernels = cfg.model.strides, cfg.model.kernels
        depth = len(cfg.model.features)
        patch = list(cfg.data.patch_size or _round_to_strides(_shrink_to_budget(median_shape, spacing, budget),
                                                               cfg.model.stride_list()))
    elif cfg.data.anisotropic and is_anisotropic(spacing):
        if cfg.data.patch_size:
            patch = list(cfg.data.patch_size)
            strides, kernels = plan_pooling(patch, spacing, max_depth=len(cfg.model.features))
        else:
            shrunk = _shrink_to_budget(median_shape, spacing, budget)
            strides, kernels = plan_pooling(shrunk, spacing)
            patch = _round_to_strides(shrunk, strides)
        depth = len(kernels)
    else:
        patch, depth = plan_patch(median_shape, budget)
        if cfg.data.patch_size:
            patch = list(cfg.data.patch_size)
            depth = len(cfg.model.features)
    features = [min(f, 320) for f in planned_widths(cfg.model.features, depth)]
    batch = cfg.data.batch_size or int(np.clip(step_voxels(device) // int(np.prod(patch)), 2, 16))
    modality = kinds[0] if len(set(kinds)) == 1 else "mixed"
    labels, values = values_to_classes(dataset.labels)
    p_lo, _, p_hi = fp["fg_percentiles"]
    clip = list(cfg.data.ct_clip or [p_lo, p_hi])
    ndim = len(patch)
    # Every axis by default (as nnU-Net): measured best on hippocampus at a 17-minute budget with --tta, even though its
    # labels keep a fixed order along every axis (BENCHMARKS.md). Ordered axes are reported so that a user whose labels
    # are left/right counterparts can leave that axis out.
    mirror = cfg.data.augment.mirror_axes
    if mirror is None:
        mirror = list(range(ndim))
    plan = Plan(
        spacing=spacing, patch_size=patch, batch_size=batch, features=features, modality=modality,
        channels=dataset.channels, labels=labels, ct_clip=clip, ct_mean=fp["fg_mean"], ct_std=fp["fg_std"],
        median_shape=median_shape, num_cases=len(dataset.cases), mirror_axes=[a for a in mirror if a < ndim],
        channel_modalities=kinds, label_values=values, strides=strides, kernels=kernels, modality_source=source,
    )
    return plan, fp
