"""Validation within a share of the wall time: which validation cases to score, and when to skip a validation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

VAL_FREE_S = 5.0  # a validation may always take this long, whatever the share (small data sets: everything, always)


class ValidationBudget:
    """Keeps whole-volume validation to `fraction` of the wall time (0 or 1: no limit), deciding case by case.

    Time outside validation counts as training. At a validation the credit is fraction / (1 - fraction) x the training
    time so far minus the validation time so far (but at least VAL_FREE_S), so over a run validation takes about
    `fraction` of the wall time (plus at most one case's estimate), or VAL_FREE_S per validation where that is more.
    Cases come in `ValOrder`: a seeded permutation of the validation cases.

    - The first validation takes cases while the next one (at the mean time per case measured so far) fits the
      credit, at least one. Those cases become the fixed *monitor subset*, validated at every later validation.
    - A later validation runs only if the credit covers the monitor subset; otherwise it is skipped ("validate less
      often"; never the first validation of a process, so a resumed run has a monitored value at once). After the
      monitor subset it takes further cases from a position that rotates between validations, while they fit.

    Why a fixed monitor subset: best.ckpt is chosen on `val_dice_mean`, and a Dice over 12 other cases each epoch
    is a different quantity every epoch (an easy subset would win). Validating the full set only now and then would
    keep the comparison fair too, but it gives the checkpoint choice far fewer, far apart chances, and the full set
    may never fit the budget at all; a fixed subset sized to the budget is compared at every validation. When the
    whole set fits (the usual case on small data sets) the monitor subset is the whole set.

    Decisions are made by `steps` (batch indices: one case per step and rank) so that under DDP rank 0 can decide and
    every rank follow (`SegmentationModule._agree`).
    """

    def __init__(self, fraction: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.fraction = float(fraction)
        self.clock = clock
        self.train_s = 0.0  # wall time outside validation, all parts of a resumed run
        self.val_s = 0.0  # wall time in validation
        self.monitor_steps: int | None = None  # size of the monitor subset (steps); None until the first validation
        self.step_s = 0.0  # mean measured seconds per validated step (load + sliding window)
        self.timed = 0
        self._mark: float | None = None
        self._v0 = 0.0
        self._credit = math.inf
        self._open = True
        self._fresh = True  # no validation yet in this process
        self.skipped = False
        self.taken: list[int] = []

    @property
    def unlimited(self) -> bool:
        return not 0 < self.fraction < 1

    def state_dict(self) -> dict[str, Any]:
        return {"train_s": self.train_s, "val_s": self.val_s, "monitor_steps": self.monitor_steps,
                "step_s": self.step_s, "timed": self.timed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("train_s", "val_s", "monitor_steps", "step_s", "timed"):
            if key in state:
                setattr(self, key, state[key])

    def training_started(self) -> None:
        if self._mark is None:
            self._mark = self.clock()

    def credit(self) -> float:
        """Seconds of validation the budget allows now (negative: overdrawn)."""
        if self.unlimited:
            return math.inf
        return self.fraction / (1 - self.fraction) * self.train_s - self.val_s

    def begin(self) -> bool:
        """A validation starts: whether it runs at all (False: skipped, the monitor subset does not fit the credit)."""
        now = self.clock()
        if self._mark is not None:
            self.train_s += now - self._mark
            self._mark = None
        self._v0, self.taken, self._open = now, [], True
        self._credit = max(self.credit(), VAL_FREE_S)
        self.skipped = (not self.unlimited and not self._fresh and self.monitor_steps is not None
                        and self._credit < self.monitor_steps * self.step_s)
        return not self.skipped

    def wants(self, step: int) -> bool:
        """Whether to validate step `step` of this validation."""
        if self.unlimited:
            return True
        if self.skipped:
            return False
        if self.monitor_steps is None:
            if not self.taken:  # the first validation takes at least one case
                return True
        elif step < self.monitor_steps:
            return True
        return self._open and self.clock() - self._v0 + self.step_s <= self._credit

    def record(self, step: int, taken: bool, seconds: float | None = None) -> None:
        """What was done at `step` (as agreed by every rank): the cases taken are a prefix beyond the monitor subset."""
        if not taken:
            self._open = False
            return
        self.taken.append(step)
        if seconds is not None:
            self.timed += 1
            self.step_s += (seconds - self.step_s) / self.timed

    def is_monitor(self, step: int) -> bool:
        return self.unlimited or self.monitor_steps is None or step < self.monitor_steps

    def end(self) -> int:
        """The validation is over: returns the number of steps taken beyond the monitor subset (rotating cases)."""
        now = self.clock()
        self.val_s += now - self._v0
        self._mark, self._fresh = now, False
        if self.unlimited:
            return 0
        if self.monitor_steps is None and self.taken:
            self.monitor_steps = len(self.taken)
            return 0
        return max(0, len(self.taken) - (self.monitor_steps or 0))
