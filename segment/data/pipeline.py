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
from torch.utils.data import DataLoader, Sampler

from segment.config import AugmentConfig, Config, segment_home
from segment.data.cache import CachedPosNegCropd, DiskCache, LoadCachedd, estimate_ram_bytes
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


def train_transforms(plan: Plan, cfg: Config, cache: DiskCache | None = None) -> mt.Compose:
    """Load (cached) -> pad -> foreground-oversampled patch -> augment.

    With a disk `cache`, the first three steps are one transform reading only the patch from the memory-mapped case;
    it is the first random transform, as RandCropByPosNegLabeld is here, so a seeded draw gets the same patch and the
    same augmentation either way.
    """
    patch = plan.patch_size
    fg = cfg.data.foreground_fraction
    if cache is not None:
        return mt.Compose([
            CachedPosNegCropd(cache, patch, fg),
            *augmentations(cfg.data.augment, len(patch), plan.mirror_axes),
            mt.EnsureTyped(["image", "label"], track_meta=False),
        ])
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


def _first_sample(batch: list) -> dict:
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


class CaseHandle:
    """A validation case not loaded yet: the module loads it only if the validation time budget takes it."""

    def __init__(self, dataset: torch.utils.data.Dataset, index: int) -> None:
        self.dataset, self.index = dataset, index

    def load(self) -> dict:
        """The case as a collated batch of one ({'image': (1, C, ...), 'label': (1, 1, ...)})."""
        return _first_sample([self.dataset[self.index]])


class LazyCases(torch.utils.data.Dataset):
    """Validation cases as `CaseHandle`s: skipping a case costs nothing, not even reading it."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> CaseHandle:
        return CaseHandle(self.base, int(index))


def _one(items: list) -> object:
    return items[0]


class ValOrder(Sampler):
    """The order validation cases are offered in: a seeded permutation, its first `monitor` positions (the fixed
    monitor subset, once the module has chosen it) always first, the others rotated by `cursor` so that the cases
    validated beyond the monitor subset change from one validation to the next. Set by `SegmentationModule`."""

    def __init__(self, n_items: int, seed: int | None = None) -> None:
        self.n_items, self.seed = n_items, seed
        self.monitor: int | None = None
        self.cursor = 0

    def permutation(self) -> list[int]:
        return np.random.default_rng([(self.seed or 0) % 2**32, 0x76616C]).permutation(self.n_items).tolist()

    def order(self) -> list[int]:
        perm = self.permutation()
        m = min(self.monitor or 0, self.n_items)
        rest = perm[m:]
        k = self.cursor % len(rest) if rest else 0
        return perm[:m] + rest[k:] + rest[:k]

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        return self.n_items


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
        collate_fn=_first_sample, persistent_workers=workers > 0, drop_last=True,
    )
    val_loader = DataLoader(LazyCases(val_ds), batch_size=1, sampler=ValOrder(len(val_ds), seed=cfg.seed),
                            num_workers=0, collate_fn=_one)
    return train_loader, val_loader
