"""The run folder: the one place that knows the name of every file a run writes, and how each is read and written.

train, resume, predict, evaluate and ablate all go through `RunFolder`, so renaming a file or changing a format is
one edit. Checkpoints are read here too, without unpickling code (`torch.load(weights_only=True)`): a run folder
another site sends is data, not a program.

    RUN/
      config.yaml        the validated config the run used (planned values filled in)
      plan.json          preprocessing and network shape (also embedded in every checkpoint)
      fingerprint.json   dataset statistics the plan came from
      split.json         training / validation case names
      checkpoints/best.ckpt, checkpoints/last.ckpt
      logs/              Lightning CSV logs (logs/resumeN/ for each resumed part), tensorboard/
      metrics.csv, curves.png, summary.json
      scan_profile.json  raw intensity percentiles, spacing and extent of the training scans (out-of-distribution check)
      confidence.json    the "check this case" threshold chosen on the validation cases
      val_cases.csv      a single run's validation cases as predict writes them: Dice, HD95, NSD, confidence

    A k-fold run (`segment train --folds K`) is a folder of K normal run folders plus what they share:

    RUN/
      ensemble.json      marks the run as an ensemble: {"folds": K, "members": ["fold_0", ...]}
      plan.json, config.yaml, fingerprint.json, scan_profile.json, confidence.json
      fold_0/ ... fold_K-1/   one run folder each (same plan, disjoint validation cases)
      cv.csv             cross-validation table: Dice, HD95, NSD per fold and their mean
      cv_cases.csv       the validation cases' scores behind it (Dice, HD95, NSD, confidence)
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from segment.config import Config, dump_config, stored_config, validate
from segment.data.plan import Plan
from segment.errors import InputError
from segment.io.files import replaced_atomically

DEFAULT_RUNS = Path("runs")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def read_split_file(path: Path) -> dict[str, list[str]]:
    """A split file written by a run: {"train": [names], "val": [names]}."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable split file ({err})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        raise InputError(f"{path}: expected a JSON object with 'train' and 'val' lists of case names")
    return {"train": [str(n) for n in split["train"]], "val": [str(n) for n in split["val"]]}


class RunFolder:
    """A training run on disk. Paths are properties; reads and writes are methods."""

    CONFIG, PLAN, FINGERPRINT, SPLIT = "config.yaml", "plan.json", "fingerprint.json", "split.json"
    SUMMARY, METRICS, CURVES, SKIPPED = "summary.json", "metrics.csv", "curves.png", "skipped.json"
    CHECKPOINTS, LOGS, TENSORBOARD = "checkpoints", "logs", "tensorboard"
    BEST, LAST = "best", "last"  # checkpoint stems, as Lightning's ModelCheckpoint wants them
    ENSEMBLE, CV_TABLE, CV_CASES = "ensemble.json", "cv.csv", "cv_cases.csv"
    VAL_CASES = "val_cases.csv"  # a single run's validation cases scored as predict writes them (confidence threshold)
    PROFILE, CONFIDENCE = "scan_profile.json", "confidence.json"
    FOLD_PREFIX = "fold_"
    MARKER = ".segment-run"  # written by `create`: what proves a folder without a checkpoint is ours to start again

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- paths ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / f"{self.BEST}.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / f"{self.LAST}.ckpt"

    @property
    def logs_dir(self) -> Path:
        return self.path / self.LOGS

    @property
    def split_path(self) -> Path:
        return self.path / self.SPLIT

    def checkpoints(self) -> list[Path]:
        """Existing checkpoints, best first (also accepts best/last.ckpt lying directly in the folder)."""
        names = (f"{self.BEST}.ckpt", f"{self.LAST}.ckpt")
        return [f for folder in (self.checkpoint_dir, self.path) for n in names if (f := folder / n).is_file()]

    def can_resume(self) -> bool:
        return self.last_checkpoint.is_file() and (self.path / self.CONFIG).is_file() and (self.path / self.PLAN).is_file()

    def stopped_before_training(self) -> bool:
        """True for a run folder of ours that holds no checkpoint: a start that stopped in planning or its first epoch
        (interrupted, a bad --split). It holds only what that start wrote, so a new start may use the folder again."""
        setup = {self.MARKER, self.CONFIG, self.PLAN, self.FINGERPRINT, self.SPLIT, self.SKIPPED, self.PROFILE}
        try:
            names = {p.name for p in self.path.iterdir()}
            return (self.MARKER in names and names <= setup | {self.LOGS, self.TENSORBOARD, self.CHECKPOINTS}
                    and not self.checkpoint_dir.is_file()
                    and not (self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir())))
        except OSError:
            return False

    # ---- k-fold ensembles -------------------------------------------------------------------------------------
    def fold(self, index: int) -> RunFolder:
        """The run folder of fold `index` inside a k-fold run."""
        return RunFolder(self.path / f"{self.FOLD_PREFIX}{int(index)}")

    def is_ensemble(self) -> bool:
        return (self.path / self.ENSEMBLE).is_file()

    def read_ensemble(self) -> dict[str, Any]:
        """ensemble.json, checked: {"folds": K, "members": [folder names inside this run]}."""
        path = self.path / self.ENSEMBLE
        try:
            data = json.loads(path.read_text())
            members = [str(m) for m in data["members"]]
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise InputError(f"{path}: not a readable ensemble marker ({type(err).__name__}: {err})") from None
        if not members or any("/" in m or "\\" in m or m in ("", ".", "..") for m in members):
            raise InputError(f"{path}: 'members' must name the fold folders inside {self.path}")
        return {**data, "members": members}

    def write_ensemble(self, folds: int, members: list[str], **extra: Any) -> Path:
        return atomic_write_text(self.path / self.ENSEMBLE, json.dumps({"folds": folds, "members": members, **extra},
                                                                        indent=1))

    def member_checkpoints(self) -> list[Path]:
        """Each member's best checkpoint (else last); one line naming the first member without any."""
        found = []
        for name in self.read_ensemble()["members"]:
            ckpts = RunFolder(self.path / name).checkpoints()
            if not ckpts:
                raise InputError(f"{self.path / name}: fold of the ensemble {self.path} has no checkpoint (unfinished? "
                                 f"continue it with segment train --folds ... --resume -o {self.path})")
            found.append(ckpts[0])
        return found

    def read_optional_json(self, name: str) -> dict[str, Any] | None:
        """A small JSON file of the run (scan_profile.json, confidence.json), or None when absent or unreadable."""
        path = self.path / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # ---- creation -------------------------------------------------------------------------------------------
    def create(self, *, resume: bool, writer: bool = True) -> RunFolder:
        """Make a new run folder (refusing a non-empty one: a user's run is never overwritten) or check a resumable one.

        `writer` is False on every process but global rank 0: they neither create nor check for emptiness.
        """
        if resume:
            if not self.can_resume():
                hint = (" (it stopped before its first checkpoint: start it again with the same --output, without "
                        "--resume)" if self.stopped_before_training() else "")
                raise InputError(f"{self.path}: nothing to resume (a run folder has {self.CONFIG}, {self.PLAN} and "
                                 f"{self.CHECKPOINTS}/{self.LAST}.ckpt){hint}")
            return self
        if writer and self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: is a file, not a run folder; choose another --output")
        if writer and self.path.exists() and any(self.path.iterdir()):
            if not self.stopped_before_training():
                raise InputError(f"{self.path}: run folder already exists and is not empty; use --resume to continue "
                                 "it or choose another --output")
            print(f"{self.path}: an earlier start stopped before its first checkpoint; its files are replaced by this "
                  "start", file=sys.stderr)
            for entry in list(self.path.iterdir()):  # only names stopped_before_training allows: all written by us
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / self.MARKER).write_text("a run folder of segment (segment train); see config.yaml\n")
        return self

    # ---- config, plan, split, summary ----------------------------------------------------------------------------
    def read_config(self) -> Config:
        import yaml

        path = self.path / self.CONFIG
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise InputError(f"{path}: not a readable run config ({type(err).__name__})") from None
        return validate(stored_config(raw) if isinstance(raw, dict) else {}, str(path))

    def write_config(self, cfg: Config) -> Path:
        return atomic_write_text(self.path / self.CONFIG, dump_config(cfg))

    def read_plan(self) -> Plan:
        path = self.path / self.PLAN
        try:
            return Plan.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise InputError(f"{path}: not a readable plan ({type(err).__name__}: {err})") from None

    def write_plan(self, plan: Plan) -> Path:
        return atomic_write_text(self.path / self.PLAN, json.dumps(plan.to_dict(), indent=2))

    def write_fingerprint(self, fingerprint: dict[str, Any]) -> Path:
        return atomic_write_text(self.path / self.FINGERPRINT, json.dumps(fingerprint, indent=1))

    def read_split(self) -> dict[str, list[str]] | None:
        return read_split_file(self.split_path) if self.split_path.is_file() else None

    def write_split(self, split: dict[str, list[str]]) -> Path:
        return atomic_write_text(self.split_path, json.dumps(split, indent=1))

    def read_summary(self) -> dict[str, Any] | None:
        path = self.path / self.SUMMARY
        return json.loads(path.read_text()) if path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return atomic_write_text(self.path / self.SUMMARY, json.dumps(summary, indent=2))

    def write_json(self, name: str, data: Any) -> Path:
        return atomic_write_text(self.path / name, json.dumps(data, indent=1))

    def metric_logs(self) -> list[Path]:
        """Lightning CSV logs of the first part and of every resumed part, in order."""
        logs = self.logs_dir
        return sorted(logs.glob(self.METRICS)) + sorted(logs.glob(f"resume*/{self.METRICS}"),
                                                        key=lambda p: int(p.parent.name[6:] or 0))

    # ---- finding a model ----------------------------------------------------------------------------------------
    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> RunFolder | None:
        """The run folder a checkpoint belongs to (one with split.json), or None for a loose .ckpt."""
        ckpt = Path(ckpt)
        run = ckpt.parent.parent if ckpt.parent.name == cls.CHECKPOINTS else ckpt.parent
        return cls(run) if (run / cls.SPLIT).is_file() else None


def resolve_checkpoint(model: str | Path | None, runs: Path = DEFAULT_RUNS) -> Path:
    """A .ckpt file, a run folder (best.ckpt, else last.ckpt), a model package folder (returned as it is: it holds
    model.json, see `segment.inference.export`), a k-fold ensemble run (returned as it is: it holds ensemble.json) or,
    with None, the newest run under `runs/`."""
    if model is None:
        found = [c for run in runs.glob("*") for c in RunFolder(run).checkpoints()[:1]] if runs.is_dir() else []
        found += [run for run in runs.glob("*") if RunFolder(run).is_ensemble()] if runs.is_dir() else []
        if not found:
            raise InputError("no trained model found; run `segment train` or pass --model")
        return max(found, key=lambda c: c.stat().st_mtime)
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "model.json").is_file():  # a model package (segment.inference.export.MODEL_JSON)
            return path
        if RunFolder(path).is_ensemble():  # a k-fold run: the predictor loads every member
            return path
        found = RunFolder(path).checkpoints()
        if found:
            return found[0]
        raise InputError(f"{path}: no checkpoints/best.ckpt or checkpoints/last.ckpt in this folder; "
                         "pass a run folder, a .ckpt or a model package (segment export)")
    raise InputError(f"{path}: model not found (expected a run folder, a .ckpt file or a model package folder)")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, read without running any code from it.

    `weights_only=True` lets torch's unpickler build only tensors, containers and plain values; a file that asks for
    anything else (a class, a function — e.g. `os.system` smuggled in by a `__reduce__`) is refused before that object is
    created, so it has no side effect. Lightning's own checkpoints hold only such plain data.
    """
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+)", str(err), flags=re.IGNORECASE)
        if found is None:  # a corrupt or foreign file, not one that asks for code
            raise InputError(f"{path}: not a segment checkpoint (corrupt, truncated or not a torch file)") from None
        raise InputError(f"{path}: refused: the checkpoint asks to load code ({found.group(1)}); segment reads only "
                         "weights and plain data from a model file") from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise InputError(f"{path}: not a segment checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]})") \
            from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise InputError(f"{path}: not a segment checkpoint (no state_dict / hyper_parameters)")
    return ckpt
