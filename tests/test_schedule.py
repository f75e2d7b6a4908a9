"""Learning rate at known steps: linear warm-up, poly (1 - p)^0.9 or cosine with a 1e-3 floor, progress by steps or by
wall clock (time budget), and a restored run that continues on the uninterrupted run's schedule."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from segment.config import Config, ModelConfig, TrainConfig
from segment.data.plan import Plan
from segment.train.module import SegmentationModule

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.01


def _module(max_time_s: float | None = None, **train: object) -> SegmentationModule:
    cfg = Config(model=ModelConfig(features=[2, 4], out_channels=2), train=TrainConfig(lr=LR, **train))
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[8, 8, 8], batch_size=2, features=[2, 4], modality="mri",
                channels=1, labels={0: "background", 1: "fg"})
    return SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict(), max_time_s=max_time_s)


def _optimisers(module: SegmentationModule) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    conf = module.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"  # stepped every optimiser step, not every epoch
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _lrs(module: SegmentationModule, steps: int) -> list[float]:
    """The optimiser's learning rate at steps 0..steps-1, stepping the scheduler as Lightning does."""
    opt, sched = _optimisers(module)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# max_epochs 2 x steps_per_epoch 5 = 10 steps, 2 of them warm-up: p = step / 10
POLY = {
    0: 1 / 2,  # warm-up: (step + 1) / warmup_steps
    1: 2 / 2,
    2: 0.8**0.9,  # warm-up ended, p = 0.2
    5: 0.5**0.9,  # half-way
    9: 0.1**0.9,  # the last step of the run
}
COSINE = {
    0: 1 / 2,
    1: 1.0,
    2: 0.5 * (1 + math.cos(math.pi * 0.2)),
    5: 0.5,
    9: 0.5 * (1 + math.cos(math.pi * 0.9)),  # 0.0245
}


@pytest.mark.parametrize("scheduler, expected", [("poly", POLY), ("cosine", COSINE),
                                                 ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 5: 1.0, 9: 1.0})])
def test_learning_rate_at_known_steps(scheduler: str, expected: dict[int, float]) -> None:
    lrs = _lrs(_module(max_epochs=2, steps_per_epoch=5, warmup_steps=2, scheduler=scheduler), 10)
    for step, factor in expected.items():
        assert lrs[step] == pytest.approx(LR * factor, rel=1e-9), f"step {step}"


def test_schedule_without_warmup_starts_at_the_peak_and_floors_at_one_thousandth() -> None:
    _, sched = _optimisers(_module(max_epochs=1, steps_per_epoch=5000, scheduler="poly"))
    factor = sched.lr_lambdas[0]
    assert factor(0) == 1.0
    assert factor(2500) == pytest.approx(0.5**0.9)
    assert factor(4999) == 1e-3  # (1/5000)^0.9 = 4.7e-4 is below the floor
    assert factor(5000) == 1e-3 and factor(7000) == 1e-3  # past the end (Lightning's last step) it stays there
    _, cos = _optimisers(_module(max_epochs=1, steps_per_epoch=5000, scheduler="cosine"))
    assert cos.lr_lambdas[0](4999) == 1e-3 and cos.lr_lambdas[0](5000) == 1e-3


class Clock:
    """A stand-in for time.monotonic that the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _fake_time(c: Clock) -> SimpleNamespace:
    fake = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fake.monotonic = c
    return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The module and Lightning's Timer see a `time` whose monotonic() is the test's clock (nothing else is affected)."""
    c = Clock()
    monkeypatch.setattr("segment.train.module.time", _fake_time(c))
    monkeypatch.setattr("pytorch_lightning.callbacks.timer.time", _fake_time(c))
    return c


def _timer_api() -> bool:
    """Whether the runner gives the module a training clock (segment.train.resume.clock, a Lightning Timer whose
    state is saved in checkpoints), as `segment train` does."""
    try:
        from segment.train.resume import clock  # noqa: F401
    except ImportError:
        return False
    return hasattr(_module(), "clock")


HAS_TIMER = _timer_api()


def _attach_clock(module: SegmentationModule, max_time_s: float | None, state: dict | None = None) -> object | None:
    """What the runner does before fit: the module's clock is the Timer callback; on resume Lightning loads its state."""
    if not HAS_TIMER:
        return None
    from segment.train.resume import clock

    module.clock = clock(max_time_s)
    if state is not None:
        module.clock.load_state_dict(state)
    return module.clock


def _start_training(module: SegmentationModule, timer: object | None) -> None:
    """Lightning's on_train_start, for the module and for the Timer callback."""
    if timer is not None:
        timer.on_train_start(None, module)
    module.on_train_start()


def test_time_budget_sets_progress_by_wall_clock_when_it_runs_out_first(clock: Clock) -> None:
    """Budget 100 s, 1000 steps planned: after 50 s the run is half done whatever the step count."""
    module = _module(max_time_s=100.0, max_epochs=10, steps_per_epoch=100, scheduler="poly")
    timer = _attach_clock(module, 100.0)
    opt, sched = _optimisers(module)
    _start_training(module, timer)  # the clock starts here (t = 1000)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR)
    for now, expected in [(1050.0, 0.5**0.9), (1060.0, 0.4**0.9), (1099.0, 0.01**0.9), (1200.0, 1e-3)]:
        clock.now = now
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(LR * expected, rel=1e-9), now


def test_time_budget_never_slows_a_run_whose_steps_end_first(clock: Clock) -> None:
    module = _module(max_time_s=100.0, max_epochs=1, steps_per_epoch=4, scheduler="poly")
    timer = _attach_clock(module, 100.0)
    opt, sched = _optimisers(module)
    _start_training(module, timer)
    clock.now = 1001.0
    lrs = []
    for _ in range(3):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # steps 1, 2, 3 of 4 at 1 % of the budget: progress by steps, 0.25, 0.5, 0.75
    assert lrs == pytest.approx([LR * 0.75**0.9, LR * 0.5**0.9, LR * 0.25**0.9], rel=1e-9)


@pytest.mark.xfail(not HAS_TIMER, strict=True, reason="SegmentationModule starts the time-budget clock at the first "
                   "step after warm-up (_progress sets _t0 lazily), so time spent in warm-up is not counted, while "
                   "Lightning's max_time counts it")
def test_time_budget_counts_the_warmup(clock: Clock) -> None:
    module = _module(max_time_s=100.0, max_epochs=10, steps_per_epoch=100, warmup_steps=3, scheduler="poly")
    timer = _attach_clock(module, 100.0)
    opt, sched = _optimisers(module)
    _start_training(module, timer)  # t = 1000
    for now in (1010.0, 1020.0, 1040.0):  # steps 1, 2, 3; step 3 is the first after warm-up, 40 % of the budget gone
        clock.now = now
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.6**0.9, rel=1e-6)


# ---- resume ---------------------------------------------------------------------------------------------------------
def _checkpoint(module: SegmentationModule, opt: torch.optim.Optimizer, sched: object, timer: object | None = None) -> dict:
    """What Lightning stores (state dict, optimiser, scheduler and callback states), plus the module's own hook."""
    ckpt = {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [sched.state_dict()], "hyper_parameters": dict(module.hparams),
            "callbacks": {"Timer": timer.state_dict()} if timer is not None else {}}
    module.on_save_checkpoint(ckpt)
    return ckpt


def _restore(ckpt: dict) -> tuple[SegmentationModule, torch.optim.Optimizer, object]:
    """Lightning's order on resume: module hook and weights, callback states, configure_optimizers, optimiser and
    scheduler states, then on_train_start."""
    module = SegmentationModule(**ckpt["hyper_parameters"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    timer = None
    if module.max_time_s:
        timer = _attach_clock(module, module.max_time_s, ckpt["callbacks"].get("Timer"))
    opt, sched = _optimisers(module)
    opt.load_state_dict(ckpt["optimizer_states"][0])
    sched.load_state_dict(ckpt["lr_schedulers"][0])
    _start_training(module, timer)
    return module, opt, sched


def _step(opt: torch.optim.Optimizer, sched: object) -> float:
    opt.step()
    sched.step()
    return opt.param_groups[0]["lr"]


def test_restored_run_continues_the_step_schedule() -> None:
    kw = {"max_epochs": 2, "steps_per_epoch": 5, "warmup_steps": 2, "scheduler": "poly"}
    full = _lrs(_module(**kw), 10)
    module = _module(**kw)
    opt, sched = _optimisers(module)
    module.on_train_start()
    for _ in range(4):
        _step(opt, sched)
    ckpt = _checkpoint(module, opt, sched)
    _, opt2, sched2 = _restore(ckpt)
    assert opt2.param_groups[0]["lr"] == pytest.approx(full[4], rel=1e-12)  # the LR at the saved step k = 4
    assert [_step(opt2, sched2) for _ in range(5)] == pytest.approx(full[5:], rel=1e-12)


@pytest.mark.xfail(not HAS_TIMER, strict=True, reason="the time-budget clock (_t0) is not saved in checkpoints: after "
                   "--resume with train.max_time the schedule restarts its clock and the LR jumps back up, while "
                   "Lightning's Timer restores the elapsed time and stops on the original budget")
def test_restored_run_continues_the_time_budget_schedule(clock: Clock) -> None:
    """Budget 100 s; saved at step 5 after 50 s; resumed much later. Step 6, 1 s of training later, is at 51 %."""
    module = _module(max_time_s=100.0, max_epochs=10, steps_per_epoch=100, scheduler="poly")
    timer = _attach_clock(module, 100.0)
    opt, sched = _optimisers(module)
    _start_training(module, timer)
    for i in range(5):
        clock.now = 1010.0 + 10 * i
        _step(opt, sched)
    ckpt = _checkpoint(module, opt, sched, timer)
    clock.now = 1051.0
    uninterrupted = _step(opt, sched)
    assert uninterrupted == pytest.approx(LR * 0.49**0.9, rel=1e-9)

    clock.now = 9000.0  # resumed the next day
    _, opt2, sched2 = _restore(ckpt)
    assert opt2.param_groups[0]["lr"] == pytest.approx(LR * 0.5**0.9, rel=1e-9)
    clock.now = 9001.0
    assert _step(opt2, sched2) == pytest.approx(uninterrupted, rel=1e-6)
