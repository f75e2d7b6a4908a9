"""Training data pipeline: seeded splits, cached preprocessing, MONAI patch sampling and augmentation.

Preprocessed cases are kept in RAM (MONAI CacheDataset), in the disk cache of `segment.data.cache` (memory-mapped, read
patch by patch: memory independent of the dataset size) or not at all; `data.cache: auto` picks RAM only when the
estimate fits well in the free memory (`choose_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, Dataset as MonaiDataset, set_track_meta
from torch.utils.data import DataLoader

from segment.config import AugmentConfig, Config, segment_home
from segment.data.cache import DiskCache, estimate_ram_bytes
from segment.data.cache_reads import CachedPosNegCropd, LoadCachedd
from segment.data.mirror import MirrorPadd
from segment.data.plan import Plan
from segment.data.preprocess import load_case
from segment.data.sampling import DrawWithReplacement, LazyCases, SeededDraws, ValOrder, first_sample, only_item
from segment.errors import ConfigError, InputError
from segment.io.dataset import Case, Dataset


def make_split(names: Sequence[str], seed: int, val_fraction: float, folds: int, fold: int | None) -> dict[str, list[str]]:
    """A seeded train/validation split by case name; with `fold`, fold k of a seeded k-fold partition."""
    order = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(order))
    shuffled = [order[i] for i in perm]
    if fold is None:
        n_val = max(1, int(round(len(order) * val_fraction)))
        val = shuffled[:n_val]
    else:
        if fold >= folds:
            raise ConfigError(f"data.fold={fold} but data.folds={folds}: fold must be in 0..{folds - 1}")
        val = shuffled[fold::folds]
    val_set = set(val)
    return {"train": sorted(n for n in order if n not in val_set), "val": sorted(val)}


def training_split(split: dict[str, list[str]], cfg: Config) -> dict[str, list[str]]:
    """The cases training draws from: the split's training half, or with `data.train_on_all` every case of the split
    (the validation cases then only monitor progress)."""
    if not cfg.data.train_on_all:
        return split
    return {"train": sorted(split["train"] + split["val"]), "val": list(split["val"])}


def check_split(split: dict[str, list[str]], dataset: Dataset, source: str = "split") -> None:
    """Every named case must exist, and no case may be in both halves."""
    names = {c.name for c in dataset.cases}
    missing = [n for n in split["train"] + split["val"] if n not in names]
    if missing:
        raise InputError(f"{source}: {len(missing)} case(s) not in {dataset.root}, e.g. {missing[0]!r}")
    both = set(split["train"]) & set(split["val"])
    if both:
        raise InputError(f"{source}: case {sorted(both)[0]!r} is in both train and val")
    if not split["train"] or not split["val"]:
        raise InputError(f"{source}: needs at least one training and one validation case")


class LoadCased(mt.Transform):
    """MONAI transform: a Case -> preprocessed {'image', 'label', 'name'} dict (cached by CacheDataset)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, case: Case) -> dict:
        item = load_case(case.images, case.label, self.plan)
        item.pop("geometry")
        return item


def augmentations(aug: AugmentConfig, ndim: int, mirror_axes: Sequence[int] | None = None) -> list[mt.Transform]:
    """Random spatial and intensity augmentation (MONAI), applied to patches after cropping.

    Flips only along `mirror_axes` (the plan's; None = every axis).
    """
    keys = ["image", "label"]
    rot = np.deg2rad(aug.rotate_deg)
    axes = range(ndim) if mirror_axes is None else mirror_axes
    out: list[mt.Transform] = [mt.RandFlipd(keys, prob=aug.flip_prob, spatial_axis=a) for a in axes]
    if aug.rotate_prob > 0:
        out.append(mt.RandAffined(
            keys, prob=aug.rotate_prob, rotate_range=[rot] * (3 if ndim == 3 else 1),
            scale_range=[aug.scale_range] * ndim, mode=("bilinear", "nearest"), padding_mode="zeros",
        ))
    if aug.intensity_prob > 0:
        out += [
            mt.RandScaleIntensityd("image", factors=0.25, prob=aug.intensity_prob),
            mt.RandShiftIntensityd("image", offsets=0.1, prob=aug.intensity_prob),
            mt.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=aug.intensity_prob),
        ]
    if aug.noise_prob > 0:
        out.append(mt.RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std))
    if aug.blur_prob > 0:  # appended only when on, so the default pipeline draws the same random numbers as before
        out.append(mt.RandGaussianSmoothd(
            "image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=aug.blur_prob,
        ))
    if aug.lowres_prob > 0:
        out.append(mt.RandSimulateLowResolutiond(
            "image", prob=aug.lowres_prob, zoom_range=(0.5, 1.0), upsample_mode="trilinear" if ndim == 3 else "bilinear",
        ))
    return out


def valid_border(plan: Plan) -> list[tuple[int, int]] | None:
    """(before, after) voxels per axis around a case for a valid-padding plan: half the margin each side (the extra
    voxel of an odd margin after, as the network's centre crop and the tiler place it); None for same padding.

    A patch is cut around a sampled voxel c as [c - patch // 2, c - patch // 2 + patch), shifted inwards only as far as
    it must to stay inside the (padded) case (MONAI's `correct_crop_centers`). With this border around the case, a
    sampled voxel always lies in the patch's output region [margin // 2, margin // 2 + output), also next to the edge
    of the scan, so foreground oversampling puts foreground where the loss sees it (tests/test_valid_mode.py).
    """
    margins = plan.output_margins()
    return None if margins is None else [(m // 2, m - m // 2) for m in margins]


def train_transforms(plan: Plan, cfg: Config, cache: DiskCache | None = None) -> mt.Compose:
    """Load (cached) -> pad -> foreground-oversampled patch -> augment.

    With a disk `cache`, the first three steps are one transform reading only the patch from the memory-mapped case;
    it is the first random transform, as RandCropByPosNegLabeld is here, so a seeded draw gets the same patch and the
    same augmentation either way. Valid padding first pads each case by half the network's margin (`valid_border`),
    the image mirrored as overlap-tile prediction pads it (`MirrorPadd`, also where the case is still smaller than
    the patch), the label with background.
    """
    patch = plan.patch_size
    fg = cfg.data.foreground_fraction
    border = valid_border(plan)
    if cache is not None:
        return mt.Compose([
            CachedPosNegCropd(cache, patch, fg, border=border),
            *augmentations(cfg.data.augment, len(patch), plan.mirror_axes),
            mt.EnsureTyped(["image", "label"], track_meta=False),
        ])
    pad = MirrorPadd(border, patch) if border else mt.SpatialPadd(["image", "label"], spatial_size=patch)
    return mt.Compose([
        LoadCased(plan),
        pad,
        # foreground/background voxel indices are computed once and cached, not at every crop
        mt.FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
        mt.RandCropByPosNegLabeld(
            ["image", "label"], label_key="label", spatial_size=patch, pos=fg, neg=1 - fg, num_samples=1,
            fg_indices_key="label_fg", bg_indices_key="label_bg", allow_smaller=False,
        ),
        *augmentations(cfg.data.augment, len(patch), plan.mirror_axes),
        mt.EnsureTyped(["image", "label"], track_meta=False),
    ])


def val_transforms(plan: Plan, cache: DiskCache | None = None) -> mt.Compose:
    load = LoadCachedd(cache) if cache is not None else LoadCased(plan)
    return mt.Compose([load, mt.EnsureTyped(["image", "label"], track_meta=False)])


RAM_SHARE = 0.25  # data.cache=auto keeps the cases in RAM only when they take less than this share of the free memory


def cache_root(cfg: Config) -> Path:
    """The disk cache folder: data.cache_dir, else cache/ in the segment home."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else segment_home() / "cache"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_cache(cfg: Config, plan: Plan, train_cases: Sequence[Case], val_cases: Sequence[Case]) -> tuple[str, str]:
    """('ram' | 'disk' | 'none', why): data.cache as set, or for 'auto' the RAM cache only when it fits."""
    mode = cfg.data.cache
    if mode != "auto":
        return mode, "data.cache=" + mode
    from segment.device import available_memory_bytes

    need = estimate_ram_bytes(plan, len(train_cases), len(val_cases), [*train_cases, *val_cases])
    free = available_memory_bytes()
    if free is None:
        return "ram", f"auto: ~{_gb(need)} preprocessed, free memory unknown"
    if need < RAM_SHARE * free:
        return "ram", f"auto: ~{_gb(need)} preprocessed < {RAM_SHARE:.0%} of {_gb(free)} free memory"
    return "disk", f"auto: ~{_gb(need)} preprocessed >= {RAM_SHARE:.0%} of {_gb(free)} free memory"


def _dataset(cases: list[Case], transform: mt.Compose, cache: bool) -> MonaiDataset:
    if cache:
        return CacheDataset(cases, transform=transform, progress=True, num_workers=0)
    return MonaiDataset(cases, transform=transform)


def make_loaders(dataset: Dataset, split: dict[str, list[str]], plan: Plan, cfg: Config) -> tuple[DataLoader, DataLoader]:
    """Training loader (steps_per_epoch batches drawn with replacement) and whole-volume validation loader.

    The validation loader yields `CaseHandle`s in `ValOrder`; `SegmentationModule.validation_step` loads the ones
    its time budget takes.
    """
    from rich.console import Console

    from segment.device import global_rank

    # Plain tensors: MetaTensor bookkeeping costs more than the augmentations themselves on small patches.
    set_track_meta(False)
    by_name = {c.name: c for c in dataset.cases}
    train_cases = [by_name[n] for n in split["train"] if n in by_name]
    val_cases = [by_name[n] for n in split["val"] if n in by_name]
    mode, why = choose_cache(cfg, plan, train_cases, val_cases)
    console = Console(stderr=True)
    say = console.print if global_rank() == 0 else (lambda *a, **k: None)
    if mode == "disk":
        cache = DiskCache(cache_root(cfg), plan)
        say(f"data cache: disk, {cache.dir} ({why})", highlight=False)

        def progress(items: list, total: int):
            say(f"disk cache: preprocessing {total} of {len(train_cases) + len(val_cases)} case(s)", highlight=False)
            if not console.is_terminal or global_rank() != 0:
                return items
            from rich.progress import track

            return track(items, total=total, description="caching", console=console, transient=True)

        cache.prepare([*train_cases, *val_cases], progress=progress)
        train_ds: torch.utils.data.Dataset = MonaiDataset(train_cases, transform=train_transforms(plan, cfg, cache))
        val_ds: torch.utils.data.Dataset = MonaiDataset(val_cases, transform=val_transforms(plan, cache))
    else:
        say(f"data cache: {mode} ({why})", highlight=False)
        train_ds = _dataset(train_cases, train_transforms(plan, cfg), mode == "ram")
        val_ds = _dataset(val_cases, val_transforms(plan), mode == "ram")
    n_samples = cfg.train.steps_per_epoch * plan.batch_size
    sampler = DrawWithReplacement(len(train_ds), n_samples, seed=cfg.seed)
    workers = cfg.data.num_workers
    # worker processes: Lightning adds its worker_init_fn (distinct numpy/torch/python seeds per worker and rank) after
    # seed_everything(workers=True); the augmentation itself is seeded per draw by SeededDraws
    train_loader = DataLoader(
        SeededDraws(train_ds), batch_size=plan.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=first_sample, persistent_workers=workers > 0, drop_last=True,
    )
    val_loader = DataLoader(LazyCases(val_ds), batch_size=1, sampler=ValOrder(len(val_ds), seed=cfg.seed),
                            num_workers=0, collate_fn=only_item)
    return train_loader, val_loader
