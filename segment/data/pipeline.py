"""Training data pipeline: seeded splits, cached preprocessing, MONAI patch sampling and augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, Dataset as MonaiDataset, set_track_meta
from torch.utils.data import DataLoader, Sampler

from segment.config import AugmentConfig, Config
from segment.data.plan import Plan
from segment.data.preprocess import load_case
from segment.errors import InputError
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
            raise ValueError(f"data.fold={fold} but data.folds={folds}: fold must be in 0..{folds - 1}")
        val = shuffled[fold::folds]
    val_set = set(val)
    return {"train": sorted(n for n in order if n not in val_set), "val": sorted(val)}


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
    return out


def train_transforms(plan: Plan, cfg: Config) -> mt.Compose:
    """Load (cached) -> pad -> foreground-oversampled patch -> augment."""
    patch = plan.patch_size
    fg = cfg.data.foreground_fraction
    return mt.Compose([
        LoadCased(plan),
        mt.SpatialPadd(["image", "label"], spatial_size=patch),
        # foreground/background voxel indices are computed once and cached, not at every crop
        mt.FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
        mt.RandCropByPosNegLabeld(
            ["image", "label"], label_key="label", spatial_size=patch, pos=fg, neg=1 - fg, num_samples=1,
            fg_indices_key="label_fg", bg_indices_key="label_bg", allow_smaller=False,
        ),
        *augmentations(cfg.data.augment, len(patch), plan.mirror_axes),
        mt.EnsureTyped(["image", "label"], track_meta=False),
    ])


def val_transforms(plan: Plan) -> mt.Compose:
    return mt.Compose([LoadCased(plan), mt.EnsureTyped(["image", "label"], track_meta=False)])


def _dataset(cases: list[Case], transform: mt.Compose, cache: bool) -> MonaiDataset:
    if cache:
        return CacheDataset(cases, transform=transform, progress=True, num_workers=0)
    return MonaiDataset(cases, transform=transform)


def _first_sample(batch: list) -> list:
    """RandCropByPosNegLabeld returns a list of samples per item; flatten before collation."""
    flat = [s for item in batch for s in (item if isinstance(item, list) else [item])]
    return torch.utils.data.default_collate([{k: s[k] for k in ("image", "label")} for s in flat])


class DrawWithReplacement(Sampler):
    """`num_samples` case indices drawn with replacement, fresh each epoch.

    With a `seed`, the draws of epoch e come from their own torch.Generator seeded by (seed, e) — nothing else touches
    it — and each draw is a pair (case index, augmentation seed) for `SeededDraws`: the data of every epoch are a pure
    function of the seed and the epoch number, whatever the number of workers, the DDP rank or a resume in between.
    Lightning calls `set_epoch` before every epoch (also through its DDP wrapper); without it each iteration moves on
    by one epoch. Without a seed: plain case indices from torch's global RNG.

    Not a `RandomSampler` on purpose: under DDP Lightning replaces a RandomSampler by a DistributedSampler over the
    dataset — one pass over the cases per epoch, whatever `num_samples` says — while any other sampler is wrapped and
    sharded, so each of N ranks runs steps_per_epoch / N steps per epoch (every rank draws the same list).
    """

    def __init__(self, n_items: int, num_samples: int, seed: int | None = None) -> None:
        self.n_items, self.num_samples, self.seed, self.epoch = n_items, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", self.epoch))

    def __iter__(self):  # noqa: ANN204
        if self.seed is None:
            return iter(torch.randint(self.n_items, (self.num_samples,)).tolist())
        mixed = np.random.SeedSequence([self.seed % 2**64, self.epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed))
        cases = torch.randint(self.n_items, (self.num_samples,), generator=g).tolist()
        seeds = torch.randint(2**31 - 1, (self.num_samples,), generator=g).tolist()
        self.epoch += 1
        return iter(list(zip(cases, seeds)))

    def __len__(self) -> int:
        return self.num_samples


class SeededDraws(torch.utils.data.Dataset):
    """A training dataset indexed by (case index, seed) draws: the random transforms are seeded by the draw.

    So the augmentation of a draw does not depend on which worker process makes it, or on what that worker made before
    (MONAI's random transforms keep their own numpy RandomState, which a worker would otherwise inherit from the parent
    unchanged: every worker would repeat the same augmentations). A plain int index is passed through unseeded.
    """

    def __init__(self, base: MonaiDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):  # noqa: ANN204
        if isinstance(key, (tuple, list)):
            key, seed = key
            self.base.transform.set_random_state(seed=int(seed))
        return self.base[key]


def make_loaders(dataset: Dataset, split: dict[str, list[str]], plan: Plan, cfg: Config) -> tuple[DataLoader, DataLoader]:
    """Training loader (steps_per_epoch batches drawn with replacement) and whole-volume validation loader."""
    # Plain tensors: MetaTensor bookkeeping costs more than the augmentations themselves on small patches.
    set_track_meta(False)
    by_name = {c.name: c for c in dataset.cases}
    train_cases = [by_name[n] for n in split["train"] if n in by_name]
    val_cases = [by_name[n] for n in split["val"] if n in by_name]
    train_ds = _dataset(train_cases, train_transforms(plan, cfg), cfg.data.cache)
    val_ds = _dataset(val_cases, val_transforms(plan), cfg.data.cache)
    n_samples = cfg.train.steps_per_epoch * plan.batch_size
    sampler = DrawWithReplacement(len(train_ds), n_samples, seed=cfg.seed)
    workers = cfg.data.num_workers
    # worker processes: Lightning adds its worker_init_fn (distinct numpy/torch/python seeds per worker and rank) after
    # seed_everything(workers=True); the augmentation itself is seeded per draw by SeededDraws
    train_loader = DataLoader(
        SeededDraws(train_ds), batch_size=plan.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=_first_sample, persistent_workers=workers > 0, drop_last=True,
    )
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0, collate_fn=_first_sample)
    return train_loader, val_loader
