"""`seed` makes training reproducible: initialisation, sampler, augmentation, whatever the number of loader workers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from segment.config import load_config
from segment.data.demo import make_demo_dataset
from segment.train.runner import train

TINY = [
    "model.features=[4,8,16]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
    "train.precision=32", "data.augment.rotate_prob=0", "train.threads=1", "train.accelerator=cpu", "train.max_epochs=2",
    "data.augment.intensity_prob=0.5", "data.augment.noise_prob=0.5",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=4, seed=3, progress=False)


def _losses(data: Path, out: Path, seed: int, workers: int = 0) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    result = train(load_config(overrides=[f"data.root={data}", *TINY, f"seed={seed}", f"data.num_workers={workers}"]),
                   output=out)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    losses = [(r["step"], k, float(r[k])) for r in rows for k in ("train_loss_step", "train_loss") if r.get(k)]
    assert len(losses) >= 2  # an epoch mean per epoch (and a step loss)
    weights = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return losses, weights


def test_same_seed_same_losses_other_seed_other_losses(tiny_data: Path, tmp_path: Path) -> None:
    a, wa = _losses(tiny_data, tmp_path / "a", seed=11)
    b, wb = _losses(tiny_data, tmp_path / "b", seed=11)
    assert a == b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c, _ = _losses(tiny_data, tmp_path / "c", seed=12)
    assert [x[2] for x in c] != [x[2] for x in a]


def test_a_loader_worker_draws_the_same_data_as_the_main_process(tiny_data: Path, tmp_path: Path) -> None:
    """Augmentation is seeded per draw, so the worker count does not change the data (or the losses)."""
    main, _ = _losses(tiny_data, tmp_path / "w0", seed=5, workers=0)
    worker, _ = _losses(tiny_data, tmp_path / "w1", seed=5, workers=1)
    assert main == worker


def test_seeded_sampler_is_a_function_of_seed_and_epoch() -> None:
    from segment.data.sampling import DrawWithReplacement

    s = DrawWithReplacement(3, 20, seed=4)
    s.set_epoch(0)
    first = list(s)
    torch.manual_seed(123)  # the global RNG plays no part
    s.set_epoch(0)
    assert list(s) == first and len(first) == 20 and {c for c, _ in first} <= {0, 1, 2}
    second = list(s)  # without set_epoch: the next epoch
    assert second != first
    s.set_epoch(1)
    assert list(s) == second
    assert list(DrawWithReplacement(3, 20, seed=5)) != first
    resumed = DrawWithReplacement(3, 20, seed=4)
    resumed.load_state_dict({"seed": 4, "epoch": 1})
    assert s.state_dict() == {"seed": 4, "epoch": 2} and list(resumed) == second


def test_augmentation_follows_the_draw_seed_not_the_process(tiny_data: Path) -> None:
    from monai.data import Dataset as MonaiDataset

    from segment.data.pipeline import train_transforms
    from segment.data.sampling import SeededDraws
    from segment.data.plan import make_plan
    from segment.io.dataset import discover

    cfg = load_config(overrides=[f"data.root={tiny_data}", *TINY, "data.augment.flip_prob=0.5"])
    dataset = discover(tiny_data)
    plan, _ = make_plan(dataset, cfg, device="cpu")
    draws = SeededDraws(MonaiDataset(dataset.cases[:1], transform=train_transforms(plan, cfg)))
    one = draws[(0, 7)][0]["image"]
    draws[(0, 8)]  # noqa: B018 (something else drawn in between)
    again = draws[(0, 7)][0]["image"]
    other = draws[(0, 9)][0]["image"]
    assert torch.equal(torch.as_tensor(one), torch.as_tensor(again))
    assert not torch.equal(torch.as_tensor(one), torch.as_tensor(other))
