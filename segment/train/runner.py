"""`segment train`: discover -> plan -> cache -> fit with Lightning -> checkpoints, logs and curves in one run folder."""

from __future__ import annotations

import csv
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table

from segment.config import Config, parse_duration, validate
from segment.data.pipeline import check_split, make_loaders, make_split
from segment.data.plan import Plan
from segment.device import cpu_bf16_speedup, global_rank, training_accelerator, training_precision
from segment.errors import InputError
from segment.io.dataset import Dataset, discover
from segment.run_folder import RunFolder, read_checkpoint
from segment.train.plan_valid import plan_run
from segment.train.resume import RunState, clock, resumed_config

console = Console(stderr=True)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    val_dice: dict[str, float]
    steps: int
    seconds: float


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tips; keep its real information (devices, precision, stops)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    # a new run's folder is always empty (RunFolder refuses another); a resumed run's holds its own checkpoints
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _rank_zero() -> bool:
    """Only global rank 0 writes run files (plan, split, config): see `segment.device.global_rank`."""
    return global_rank() == 0


def load_dataset(cfg: Config) -> Dataset:
    """The configured dataset (or the embedded demo dataset), every case of it read and checked before training.

    Any problem stops here with the full list (one line per case); with `data.skip_bad` the bad cases are left out and
    `dataset.skipped` maps each one to its reason (for the run folder's skipped.json).
    """
    from rich.markup import escape

    from segment.data.check import check_dataset

    if cfg.data.root is None:
        from segment.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset()
        console.print(f"[bold]No --data given:[/] training on the embedded demo dataset in {root}")
    else:
        root = cfg.data.root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = discover(root, check=False)  # pairing only: structural problems land in dataset.skipped
    for w in [w for w in caught if not str(w.message).startswith("skipping ")][:10]:  # skips are listed by the check
        console.print(f"[yellow]warning:[/] {escape(str(w.message))}")
    if dataset.unpaired:
        console.print(f"[yellow]{len(dataset.unpaired)} unpaired file(s) ignored[/], e.g. {escape(str(dataset.unpaired[0]))}")
    if cfg.data.max_cases:  # the first N cases by name, bad ones included, so a quick run checks only what it uses
        first = set(sorted([c.name for c in dataset.cases] + list(dataset.skipped))[: cfg.data.max_cases])
        dataset.cases = [c for c in dataset.cases if c.name in first]
        dataset.skipped = {n: r for n, r in dataset.skipped.items() if n in first}
    check_dataset(dataset, skip_bad=cfg.data.skip_bad)
    if dataset.skipped:
        console.print(f"[yellow]skipping {len(dataset.skipped)} case(s)[/] (data.skip_bad):")
        for reason in dataset.skipped.values():
            console.print(f"  {escape(reason)}", soft_wrap=True)
    if len(dataset.cases) < 2:
        raise InputError(f"{root}: need at least 2 labelled cases (one to train, one to validate), found {len(dataset.cases)}")
    return dataset


def _checked_dataset(cfg: Config, run: RunFolder) -> Dataset:
    """`load_dataset`, recording the cases left out by --skip-bad (and why) in the run folder."""
    dataset = load_dataset(cfg)
    if dataset.skipped and _rank_zero():
        run.write_json(run.SKIPPED, dataset.skipped)
    return dataset


def _apply_plan(cfg: Config, plan: Plan) -> Config:
    """The model config follows the plan (depth, widths, strides) and the dataset (channels, classes), so a checkpoint's
    config alone rebuilds its network. Patch, batch and spacing stay in the plan only (plan.json, read through
    RunFolder): config.yaml keeps what the user asked for (null = planned), not a second copy that could disagree."""
    raw = cfg.model_dump(mode="json")
    raw["model"].update(features=plan.features, in_channels=plan.channels, out_channels=len(plan.labels),
                        strides=plan.strides, kernels=plan.kernels)
    return validate(raw, "planned config")


def plan_table(plan: Plan, precision: str, accelerator: str, seed: int | None = None) -> Table:
    table = Table(title="Plan", show_header=False)
    for key, value in [
        ("cases", plan.num_cases), ("classes", ", ".join(f"{k}:{v}" for k, v in plan.labels.items())),
        ("modality", plan.modality + (f" ({plan.modality_source})" if plan.modality_source else "")),
        ("spacing (mm)", plan.spacing), ("median shape", plan.median_shape),
        ("patch", plan.patch_size), ("batch", plan.batch_size), ("features", plan.features),
        *([("output (valid padding) / margin", f"{plan.output_size} / {plan.output_margins()}")] if plan.output_size else []),
        *([("strides / kernels", f"{plan.strides} / {plan.kernels}")] if plan.strides or plan.kernels else []),
        ("mirrored axes", plan.tta_axes() or "none"),
        ("device", accelerator), ("precision", precision), *([("seed", seed)] if seed is not None else []),
    ]:
        table.add_row(key, str(value))
    return table


def _warn_ordered_axes(ordered: dict[str, str], plan: Plan) -> None:
    """Say when training mirrors an axis along which two labels always keep the same order."""
    names = "left-right", "back-front", "down-up"
    for axis, reason in sorted(ordered.items()):
        if int(axis) in plan.tta_axes() and _rank_zero():
            console.print(f"[yellow]note:[/] mirroring axis {axis} ({names[int(axis)]}) although {reason}; if those labels "
                          "are left/right or front/back counterparts, leave the axis out: --set data.augment.mirror_axes=[...]")


def _setup_run(cfg: Config, run: RunFolder, resume: bool, accelerator: str, plan: Plan | None = None,
               given: dict[str, Any] | None = None) -> tuple[Config, Plan, Dataset]:
    """Plan a new run (saved in the run folder) or reload a resumed run's saved config and plan.

    A given `plan` (e.g. shared by the variants of an ablation) is used instead of planning anew. A resumed run keeps
    its own config except for the values `given` explicitly (see `resumed_config`).
    """
    if resume:
        cfg = resumed_config(run, given, cfg, console if _rank_zero() else None)
        plan = run.read_plan()
        return cfg, plan, _checked_dataset(cfg, run)
    dataset = _checked_dataset(cfg, run)
    fp: dict = {}
    if plan is None:
        plan, fp = plan_run(dataset, cfg, device=accelerator)  # make_plan, for valid padding made valid
        _warn_ordered_axes(fp.get("ordered_axes", {}), plan)
    cfg = _apply_plan(cfg, plan)
    if _rank_zero():
        from segment.data.profile import dataset_profile

        run.write_plan(plan)
        if fp:
            run.write_fingerprint(fp)
        run.write_config(cfg)
        run.write_json(run.PROFILE, dataset_profile(dataset))  # for predict's out-of-distribution check
    return cfg, plan, dataset


def _choose_split(run: RunFolder, dataset: Dataset, cfg: Config, given: dict[str, list[str]] | None,
                  resume: bool) -> dict[str, list[str]]:
    """The same split on every rank: the one given (--split), the run's own (resume), or a new seeded one.

    Only global rank 0 writes it; the others compute the identical split instead of racing to read the file.
    """
    split = run.read_split() if resume else given
    if split is None:
        split = make_split([c.name for c in dataset.cases], cfg.seed, cfg.data.val_fraction, cfg.data.folds, cfg.data.fold)
    check_split(split, dataset, str(run.split_path) if resume else "split")
    if _rank_zero() and not resume:
        run.write_split(split)
    return split


def _trainer(cfg: Config, run: RunFolder, precision: str, accelerator: str, extra: list) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    t = cfg.train
    # A resumed run logs into a new logs/resumeN/ so the CSV of the earlier parts is kept (CSVLogger deletes an existing
    # file); N counts every earlier part, also one that logged nothing (a resume of a finished run)
    resumed = [p for p in run.logs_dir.glob("resume*") if p.is_dir()]
    version = f"resume{len(resumed) + 1}" if resumed or run.metric_logs() else ""
    loggers: list = [CSVLogger(run.path, name=run.LOGS, version=version)]
    if t.tensorboard:
        loggers.append(TensorBoardLogger(run.path, name=run.TENSORBOARD, version=""))
    # val_dice_mean is the Dice over the fixed monitor subset of the validation cases (all of them when validation fits
    # train.val_time_fraction): the same cases at every validation, so best.ckpt compares like with like
    # (segment.train.validation.ValidationBudget)
    best = ModelCheckpoint(dirpath=run.checkpoint_dir, filename=run.BEST, monitor="val_dice_mean", mode="max")
    # last.ckpt from its own unmonitored callback: in Lightning 2.6 (checked) `save_last=True` on a monitored callback only
    # writes `last` when the monitored value improved, so an epoch without a new best left last.ckpt (and --resume) behind
    last = ModelCheckpoint(dirpath=run.checkpoint_dir, filename=run.LAST, monitor=None, save_top_k=1,
                           enable_version_counter=False)
    strategy = t.strategy
    if strategy in ("ddp", "ddp_spawn") and not cfg.model.deep_supervision:
        # the auxiliary heads are always built (stable checkpoint keys) but get no gradient without deep supervision
        strategy = f"{strategy}_find_unused_parameters_true"
    return pl.Trainer(
        accelerator=accelerator, devices=t.devices, strategy=strategy, num_nodes=t.num_nodes, precision=precision,
        # no max_time: the budget is kept by the Timer in `extra` (segment.train.resume.clock), over all parts of a run
        max_epochs=t.max_epochs, max_time=None,
        check_val_every_n_epoch=t.val_every, logger=loggers, callbacks=[best, last, *extra, RichProgressBar()],
        default_root_dir=run.path, log_every_n_steps=min(50, t.steps_per_epoch), num_sanity_val_steps=0,
        enable_model_summary=False, deterministic=False,
    )


def train(
    cfg: Config, output: Path | None = None, resume: bool = False, *,
    plan: Plan | None = None, split: dict[str, list[str]] | None = None, given: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a model as configured; return where its checkpoints and metrics are.

    `plan` and `split` let several runs (an ablation) share exactly the same preprocessing, patch and cases.
    `resume` continues the run in `output` exactly as it was started: its own config, changed only by the values
    `given` explicitly ({"train.max_epochs": 8}; None: `cfg`'s max_epochs and max_time where they differ), and the
    state in its last checkpoint (weights, optimiser, scaler, LR-schedule position, time spent, sampler, RNG).
    """
    _quiet_lightning()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    accelerator = training_accelerator(cfg.train.accelerator)
    name = (Path(cfg.data.root).name if cfg.data.root else "demo") + time.strftime("-%Y%m%d-%H%M%S")
    run = RunFolder(Path(output) if output else Path("runs") / name).create(resume=resume, writer=_rank_zero())
    if resume:
        ckpt = read_checkpoint(run.last_checkpoint)  # one line, not a traceback, for a corrupt or foreign file
        if _rank_zero():
            console.print(f"resuming {run.path} after epoch {ckpt.get('epoch')} (step {ckpt.get('global_step')})")
    cfg, plan, dataset = _setup_run(cfg, run, resume, accelerator, plan, given)
    if resume and cfg.train.threads:  # the resumed run's own settings
        torch.set_num_threads(cfg.train.threads)
    accelerator = training_accelerator(cfg.train.accelerator) if resume else accelerator
    precision = _precision(cfg, plan, accelerator)
    console.print(plan_table(plan, precision, accelerator, cfg.seed))
    split = _choose_split(run, dataset, cfg, split, resume)
    console.print(f"split: {len(split['train'])} training / {len(split['val'])} validation cases (saved in {run.split_path})")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the run's seed (a resumed run's own), after planning
    train_loader, val_loader = make_loaders(dataset, split, plan, cfg)

    from segment.train.module import SegmentationModule

    max_time_s = parse_duration(cfg.train.max_time)
    module = SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict(), max_time_s=max_time_s)
    module.clock = clock(max_time_s)
    module.val_cases = val_loader.sampler  # the ValOrder whose monitor subset and rotation the module sets
    trainer = _trainer(cfg, run, precision, accelerator, [module.clock, RunState(train_loader.sampler)])
    t0 = time.monotonic()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(run.last_checkpoint) if resume else None)
    return _finish(trainer, run, time.monotonic() - t0)


def _precision(cfg: Config, plan: Plan, accelerator: str) -> str:
    """`train.precision`, with 'auto' decided by the device policy on this network and one planned patch."""

    def measure() -> float:
        from segment.nets import build_model

        torch.manual_seed(0)
        example = torch.randn(1, plan.channels, *plan.patch_size)
        return cpu_bf16_speedup(build_model(cfg.model), example, train=True)

    return training_precision(cfg.train.precision, accelerator, measure)


def merge_metrics(run: RunFolder) -> Path:
    """One `metrics.csv` in the run folder joining the logs of the first part and every resumed part."""
    rows: list[dict] = []
    for part in run.metric_logs():
        with part.open(newline="") as f:
            rows.extend(csv.DictReader(f))
    fields = sorted({k for r in rows for k in r})
    out = run / run.METRICS
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def _finish(trainer: pl.Trainer, run: RunFolder, seconds: float) -> TrainResult:
    """Plot curves, print the final per-class validation Dice, write summary.json."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_dice")}
    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else None
    last = run.last_checkpoint
    summary = {
        "steps": trainer.global_step, "seconds": round(seconds, 1), "val_dice": metrics,
        "best_val_dice_mean": float(ckpt_cb.best_model_score) if ckpt_cb and ckpt_cb.best_model_score is not None else None,
        "best_checkpoint": str(best) if best else None,
    }
    if trainer.is_global_zero:
        run.write_summary(summary)
        try:
            from segment.figures import plot_training_curves

            plot_training_curves({"run": merge_metrics(run)}, run / run.CURVES)
        except Exception as err:  # a plotting problem must not hide a finished training run
            console.print(f"[yellow]could not plot training curves: {err}[/]")
        table = Table(title=f"Validation Dice after {trainer.global_step} steps ({seconds / 60:.1f} min)")
        table.add_column("class")
        table.add_column("Dice", justify="right")
        for key, value in metrics.items():
            table.add_row(key.removeprefix("val_dice_"), f"{value:.4f}")
        console.print(table)
        console.print(f"run folder: {run.path}  (best checkpoint: {best})")
    return TrainResult(run.path, best, last if last.is_file() else None, metrics, trainer.global_step, seconds)
