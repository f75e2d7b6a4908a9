"""Exact resume: the run's own config (only explicitly given values change), and the state a checkpoint must carry.

Lightning restores the weights, optimiser, AMP scaler, LR-scheduler position, loop counters and the state of every
callback. The rest is here:

- `RunState`, a callback whose state (global torch/CUDA/numpy/python RNG states and the training sampler's position)
  is saved in every checkpoint and put back on resume;
- `clock`, Lightning's own `Timer` always attached (no budget: it only counts): its state is the training time spent
  so far, saved in the checkpoint and restored on resume, so `train.max_time` counts the time of every part of a run
  and the time-aware LR schedule (`SegmentationModule._progress`) reads the same clock and continues where it was.
"""

from __future__ import annotations

import copy
import random
from datetime import timedelta
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from rich.console import Console

from segment.config import Config, set_values, validate
from segment.errors import ConfigError
from segment.run_folder import RunFolder

# Keys a resumed run cannot change: the network in the checkpoint and the preprocessing in the run's plan.json.
FIXED = ("model.", "data.patch_size", "data.batch_size", "data.target_spacing", "data.modality", "data.ct_clip",
         "data.anisotropic")


def _get(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resumed_config(run: RunFolder, given: dict[str, Any] | None, cfg: Config | None = None,
                   console: Console | None = None) -> Config:
    """The run's saved config, changed only where a value was given explicitly (dotted key -> value), saying so.

    `given=None` (Python callers that pass a whole `cfg`): `cfg`'s train.max_epochs and train.max_time count as given
    where they differ from the run's.
    """
    saved = run.read_config().model_dump(mode="json")
    where = "given on the command line"
    if given is None:
        where, given = "given in the config", {}
        if cfg is not None:
            new = cfg.model_dump(mode="json")
            given = {k: _get(new, k) for k in ("train.max_epochs", "train.max_time") if _get(new, k) != _get(saved, k)}
    for key in given:
        if any(key == f or key.startswith(f) for f in FIXED):
            raise ConfigError(f"--resume: {key} cannot change in a resumed run (fixed by its checkpoint and plan.json); "
                              "start a new run instead")
    resumed = validate(set_values(copy.deepcopy(saved), given, "--resume"), "--resume")
    now = resumed.model_dump(mode="json")
    for key in given:
        if _get(now, key) != _get(saved, key) and console is not None:
            console.print(f"--resume: {key.removeprefix('train.')} {_get(saved, key)} -> {_get(now, key)} ({where})",
                          highlight=False)
    return resumed


def clock(max_time_s: float | None) -> Timer:
    """Lightning's Timer, stopping the run after `max_time_s` of training in all its parts (None: only counting)."""
    return Timer(duration=None if max_time_s is None else timedelta(seconds=max_time_s), interval="step")


def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (a checkpoint is read back with `weights_only=True`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RunState(pl.Callback):
    """Saves the global RNG states and the sampler's position in each checkpoint; restores them on resume."""

    def __init__(self, sampler: Any = None) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": rng_states()}
        if self.sampler is not None and hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])
        if "sampler" in state_dict and self.sampler is not None:
            self.sampler.load_state_dict(state_dict["sampler"])
