"""`segment train --folds K`: K models on disjoint validation folds, planned once, in one run folder.

    RUN/ensemble.json, plan.json, config.yaml, fingerprint.json, scan_profile.json, fold_0/ ... fold_K-1/

Each fold is a normal run folder (`segment.train.runner.train` with the shared plan and fold k's split), so it can be
predicted, evaluated or resumed on its own. On one device the folds run one after another, each with the configured
devices (several GPUs given with --devices N / '0,1' or a strategy: all of them per fold, through Lightning's strategy).
With several GPUs visible and `train.devices` auto or 1 the folds run in parallel, one per GPU, each in its own
process (`segment.train.parallel_folds`: the rule, the fold queue, logs in RUN/fold_k.log). A time budget
(`train.max_time`) is the total wall time: one after another each fold gets total / K; with P GPUs in parallel
total / ceil(K / P) (= total * P / K when P divides K). The cross-validation table and the confidence threshold come
after training (`segment.experiments.crossval`, which also needs the evaluation metrics).

Resume (`--resume -o RUN`): finished folds (summary.json written) are left untouched; a fold with a last checkpoint
continues from it; a fold not started yet (or failed in a parallel run before its first checkpoint: its folder was
removed then) starts. A fold interrupted before its first checkpoint is one line asking to delete that fold folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from segment.config import Config, parse_duration, validate
from segment.data.pipeline import make_split
from segment.device import global_rank, training_accelerator
from segment.errors import ConfigError, InputError
from segment.run_folder import RunFolder
from segment.train import parallel_folds
from segment.train.plan_valid import plan_run
from segment.train.runner import TrainResult, train
from segment.train.setup import apply_plan, load_dataset, warn_ordered_axes

console = Console(stderr=True)


@dataclass
class FoldsResult:
    run_dir: Path
    folds: list[TrainResult] = field(default_factory=list)  # the folds trained (or continued) by this call
    seconds: float = 0.0


def check_folds(folds: int, cases: int, source: str = "--folds") -> None:
    """k-fold needs 2 <= K <= cases: every fold validates on at least one case and trains on the rest."""
    if folds < 2:
        raise ConfigError(f"{source} {folds}: k-fold training needs at least 2 folds (leave out --folds to train one model)")
    if folds > cases:
        raise InputError(f"{source} {folds}: more folds than the {cases} usable case(s) of the dataset; each fold "
                         f"validates on at least one case, so use --folds {cases} or fewer")


def fold_config(cfg: Config, folds: int, fold: int, per_fold_s: float | None) -> Config:
    """Fold `fold`'s config: the k-fold split index and its share of the time budget."""
    raw = cfg.model_dump(mode="json")
    raw["data"].update(folds=folds, fold=fold)
    if per_fold_s is not None:
        raw["train"]["max_time"] = f"{max(1, math.ceil(per_fold_s))}s"
    return validate(raw, f"fold {fold} config")


def train_folds(cfg: Config, folds: int, output: Path | None = None, resume: bool = False, *,
                devices: list[str] | None = None, launcher: parallel_folds.Launcher | None = None) -> FoldsResult:
    """Train K fold models into one ensemble run folder; returns each fold's result.

    `devices`: GPU ids to run one fold each on in parallel (None: `parallel_folds.gpus_for_folds` decides; [] or one
    device: one after another in this process). `launcher` replaces the worker processes' launcher (tests).
    """
    if cfg.data.fold is not None:
        raise ConfigError(f"--folds {folds} trains every fold; leave out --fold / data.fold={cfg.data.fold}")
    if cfg.data.train_on_all:
        raise ConfigError(f"--folds {folds} scores every fold on cases it did not train on; data.train_on_all=true "
                          "would train each fold on all of them: leave one out")
    name = (Path(cfg.data.root).name if cfg.data.root else "demo") + time.strftime("-%Y%m%d-%H%M%S") + f"-{folds}fold"
    root = RunFolder(Path(output) if output else Path("runs") / name)
    writer = global_rank() == 0
    if resume:  # the run's own config and plan; the folds' own configs (and budgets) when they continue
        if not root.is_ensemble():
            raise InputError(f"{root.path}: nothing to resume as a k-fold run (no {root.ENSEMBLE})")
        saved = root.read_ensemble()["folds"]
        if int(saved) != folds:
            raise ConfigError(f"--folds {folds}: {root.path} was started with {saved} folds; resume it with --folds {saved}")
        cfg = root.read_config()
    elif writer and root.path.exists() and (not root.path.is_dir() or any(root.path.iterdir())):
        root.create(resume=False)  # the one-line refusal of a non-empty folder, before the data is read
    dataset = load_dataset(cfg)
    check_folds(folds, len(dataset.cases))
    if resume:
        plan = root.read_plan()
    else:
        root.create(resume=False, writer=writer)
        plan, fp = plan_run(dataset, cfg, device=training_accelerator(cfg.train.accelerator))  # valid padding too
        warn_ordered_axes(fp.get("ordered_axes", {}), plan)
        cfg = apply_plan(cfg, plan)
        if writer:
            from segment.data.profile import dataset_profile

            profile = fp.pop("scan_profile", None) or dataset_profile(dataset)
            root.write_plan(plan)
            root.write_fingerprint(fp)
            root.write_config(cfg)
            root.write_json(root.PROFILE, profile)
            root.write_ensemble(folds, [root.fold(k).path.name for k in range(folds)], complete=False)
    total_s = parse_duration(cfg.train.max_time)
    per_fold = total_s / folds if total_s is not None else None
    gpus = parallel_folds.gpus_for_folds(cfg) if devices is None else list(devices)
    if len(gpus or []) > 1:
        return _train_parallel(root, cfg, folds, resume, gpus or [], total_s, launcher)
    console.print(f"[bold]{folds}-fold training[/] into {root.path}: "
                  + (f"time budget {total_s / 60:.1f} min in total, {per_fold / 60:.1f} min per fold"
                     if total_s is not None and per_fold is not None else "no time budget (train.max_time)"))
    names = [c.name for c in dataset.cases]
    result = FoldsResult(root.path)
    t0 = time.monotonic()
    for k in range(folds):
        fold = root.fold(k)
        split = make_split(names, cfg.seed, cfg.data.val_fraction, folds, k)
        fcfg = fold_config(cfg, folds, k, per_fold)
        if fold.read_summary() is not None and fold.checkpoints():
            console.print(f"fold {k}: finished earlier, kept as it is")
            continue
        if resume and fold.can_resume():
            console.print(f"fold {k}: continuing from {fold.last_checkpoint}")
            result.folds.append(train(fcfg, output=fold.path, resume=True))
            continue
        if fold.path.exists() and any(fold.path.iterdir()):
            raise InputError(f"{fold.path}: fold {k} was interrupted before its first checkpoint; delete this folder "
                             f"and run again with --resume -o {root.path}")
        console.print(f"[bold]fold {k + 1} of {folds}[/]: {len(split['val'])} validation case(s)")
        result.folds.append(train(fcfg, output=fold.path, plan=plan, split=split))
    if writer:
        root.write_ensemble(folds, [root.fold(k).path.name for k in range(folds)], complete=True)
    result.seconds = time.monotonic() - t0
    return result


def _train_parallel(root: RunFolder, cfg: Config, folds: int, resume: bool, gpus: list[str], total_s: float | None,
                    launcher: parallel_folds.Launcher | None) -> FoldsResult:
    """One fold per GPU in worker processes (`segment.train.parallel_folds`); ensemble.json complete once all are."""
    todo = []
    for k in range(folds):
        fold = root.fold(k)
        if fold.read_summary() is not None and fold.checkpoints():
            console.print(f"fold {k}: finished earlier, kept as it is")
        elif fold.path.exists() and any(fold.path.iterdir()) and not (resume and fold.can_resume()):
            raise InputError(f"{fold.path}: fold {k} was interrupted before its first checkpoint; delete this folder "
                             f"and run again with --resume -o {root.path}")
        else:
            todo.append(k)
    parallel = min(len(gpus), folds)
    per_fold = total_s / math.ceil(folds / parallel) if total_s is not None else None
    console.print(f"[bold]{folds}-fold training[/] into {root.path}, {parallel} folds at a time, one per GPU "
                  f"({', '.join(gpus[:parallel])}); logs in {root.path / 'fold_<k>.log'}: "
                  + (f"time budget {total_s / 60:.1f} min in total, {per_fold / 60:.1f} min per fold"
                     if total_s is not None and per_fold is not None else "no time budget (train.max_time)"),
                  soft_wrap=True)
    t0 = time.monotonic()
    parallel_folds.run_parallel(root.path, folds, todo, gpus[:parallel], per_fold, launcher,
                                report=lambda line: console.print(line, highlight=False, soft_wrap=True))
    result = FoldsResult(root.path)
    for k in todo:
        member = root.fold(k)
        summary = member.read_summary() or {}
        best = member.best_checkpoint if member.best_checkpoint.is_file() else None
        last = member.last_checkpoint if member.last_checkpoint.is_file() else None
        result.folds.append(TrainResult(member.path, best, last, summary.get("val_dice", {}), int(summary.get("steps", 0)),
                                        float(summary.get("seconds", 0.0))))
    root.write_ensemble(folds, [root.fold(k).path.name for k in range(folds)], complete=True)
    result.seconds = time.monotonic() - t0
    return result
