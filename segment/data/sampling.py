"""Samplers and datasets of the training and validation loaders: seeded draws with replacement (`DrawWithReplacement`,
`SeededDraws`) and validation cases loaded only when the validation budget takes them (`LazyCases`, `CaseHandle`,
`ValOrder`)."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from torch.utils.data import Sampler


def first_sample(batch: list) -> dict:
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
        return first_sample([self.dataset[self.index]])


class LazyCases(torch.utils.data.Dataset):
    """Validation cases as `CaseHandle`s: skipping a case costs nothing, not even reading it."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> CaseHandle:
        return CaseHandle(self.base, int(index))


def only_item(items: list) -> object:
    """The validation loader's collate: its batches hold one `CaseHandle`."""
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
