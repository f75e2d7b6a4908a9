"""Whole-volume validation takes a bounded share of the wall time (issue 15.4): a fixed seeded monitor subset when
everything does not fit, rotating extra cases, skipped validations; everything when it is fast."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch

from segment.config import load_config
from segment.data.demo import make_demo_dataset

TINY = [
    "model.features=[4,8,16]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=8",
    "train.precision=32", "data.augment.rotate_prob=0", "train.threads=1", "train.accelerator=cpu",
    "data.val_fraction=0.8", "train.max_epochs=4", "data.cache=ram",
]


@pytest.fixture(scope="module")
def ten_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=10, seed=2, progress=False)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_takes_a_monitor_subset_then_rotates_or_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.train import validation as module

    monkeypatch.setattr(module, "VAL_FREE_S", 0.0)
    clock = Clock()
    b = module.ValidationBudget(0.1, clock=clock)
    b.training_started()

    def validate(case_s: float, steps: int = 8) -> list[int]:
        b.begin()
        for step in range(steps):
            take = b.wants(step)
            if take:
                clock.t += case_s
            b.record(step, take, case_s if take else None)
        b.end()
        return list(b.taken)

    clock.t += 9.0  # 9 s of training: 1 s of validation allowed (10% of 10 s)
    assert validate(0.4) == [0, 1]  # a third case would end at 1.2 s
    assert b.monitor_steps == 2  # the fixed monitor subset
    clock.t += 9.0  # credit: 18 / 9 - 0.8 = 1.2 s: the monitor subset, and one rotating case
    assert validate(0.4) == [0, 1, 2]
    clock.t += 1.0  # a short stretch of training: the monitor subset does not fit, so no validation at all
    assert validate(0.4) == [] and b.skipped
    assert b.val_s <= 0.1 / 0.9 * b.train_s + 1e-9
    for fraction in (0.0, 1.0):  # no limit
        free = module.ValidationBudget(fraction, clock=clock)
        free.begin()
        assert all(free.wants(s) for s in range(100))


def test_val_order_keeps_the_monitor_subset_first_and_rotates_the_rest() -> None:
    from segment.data.sampling import ValOrder

    order = ValOrder(8, seed=3)
    first = order.order()
    assert sorted(first) == list(range(8)) and first == ValOrder(8, seed=3).order() != ValOrder(8, seed=4).order()
    order.monitor, order.cursor = 3, 2
    second = order.order()
    assert second[:3] == first[:3] and second[3:] == first[5:] + first[3:5]


def _run(data: Path, out: Path, *extra: str) -> tuple[list[dict], dict]:
    from segment.train.runner import train

    result = train(load_config(overrides=[f"data.root={data}", *TINY, *extra]), output=out)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)["val_budget"]
    return [r for r in rows if r.get("val_cases")], state


def _fake_sliding(seconds: float):
    def sliding(model, image, patch_size, **kwargs):
        time.sleep(seconds)
        return torch.zeros(image.shape[0], model.cfg.out_channels, *image.shape[2:])

    return sliding


def test_slow_validation_keeps_to_its_share_and_says_so(ten_cases: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    from segment.train import module, validation

    monkeypatch.setattr(validation, "VAL_FREE_S", 0.0)
    monkeypatch.setattr(module, "sliding_logits", _fake_sliding(0.4))
    rows, state = _run(ten_cases, tmp_path / "run")
    out = capsys.readouterr()
    log = out.out + out.err
    assert "of 8 cases this epoch (10% time budget)" in log, log[-3000:]
    # every case validated would have taken 8 x 0.4 s per epoch, far over 10% of a training epoch
    assert rows and all(float(r["val_cases"]) < 8 for r in rows)
    # validation stayed within its share, give or take the one case a first validation always takes
    assert state["val_s"] <= 0.1 / 0.9 * state["train_s"] + state["step_s"] + 0.05, state
    assert state["monitor"] is not None and state["monitor"] < 8


def test_fast_validation_validates_every_case(ten_cases: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    from segment.train import module, validation

    monkeypatch.setattr(validation, "VAL_FREE_S", 0.0)
    monkeypatch.setattr(module, "sliding_logits", _fake_sliding(0.0))
    # ~0.02 s a case (the Dice of a real label), 8 cases: well under 10% of 50 training steps
    rows, state = _run(ten_cases, tmp_path / "run", "train.steps_per_epoch=50", "train.max_epochs=3")
    assert [float(r["val_cases"]) for r in rows] == [8.0] * 3, state
    assert state["monitor"] == 8  # the monitor subset is the whole validation set
    out = capsys.readouterr()
    assert "time budget" not in out.out + out.err
