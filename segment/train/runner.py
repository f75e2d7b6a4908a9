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

from segment.config import Config, parse_duration
from segment.data.pipeline import check_split, make_loaders, make_split, training_split
from segment.data.plan import Plan
from segment.device import cpu_bf16_speedup, training_accelerator, training_precision
from segment.io.dataset import Dataset
from segment.run_folder import RunFolder, read_checkpoint
from segment.train.plan_valid import plan_run
from segment.train.resume import RunState, clock, resumed_config
from segment.train.setup import _checked_dataset, _rank_zero, apply_plan, plan_table, warn_ordered_axes

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
    # MONAI's note when a patch is drawn from a case without foreground (a scan without a lesion is normal data)
    warnings.filterwarnings("ignore", message=r"Num foregrounds 0, Num backgrounds")


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
        warn_ordered_axes(fp.get("ordered_axes", {}), plan)
    cfg = apply_plan(cfg, plan)
    if _rank_zero():
        from segment.data.profile import dataset_profile

        # for predict's out-of-distribution check: the fingerprint's, when planning read the cases; else read them now
        profile = fp.pop("scan_profile", None) or dataset_profile(dataset)
        run.write_plan(plan)
        if fp:
            run.write_fingerprint(fp)
        run.write_config(cfg)
        run.write_json(run.PROFILE, profile)
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
    if cfg.data.train_on_all:  # a final model from every case: the validation cases only monitor progress
        split = training_split(split, cfg)
        console.print(f"data.train_on_all: training on all {len(split['train'])} cases; the {len(split['val'])} "
                      "validation cases are trained on too, so validation Dice is optimistic")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the run's seed (a resumed run's own), after planning
    train_loader, val_loader = make_loaders(dataset, split, plan, cfg)

    from segment.train.module import SegmentationModule

    max_time_s = parse_duration(cfg.train.max_time)
    module = SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict(), max_time_s=max_time_s)
    module.clock = clock(max_time_s)
    module.val_cases = val_loader.sampler  # the ValOrder whose monitor subset and rotation the module sets
    extra: list = [module.clock, RunState(train_loader.sampler)]
    if cfg.train.ema_decay is not None:
        from segment.train.ema import EMA

        extra.append(EMA(cfg.train.ema_decay))
    trainer = _trainer(cfg, run, precision, accelerator, extra)
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


UNLEARNED_DICE = 0.05  # a class below this validation Dice at the end of a run has in effect not been learned


def unlearned_note(metrics: dict[str, float], steps: int) -> str | None:
    """The note printed after training when some class still has (almost) no validation Dice, else None.

    A short run can end before the network predicts every class: with the default plain encoder and a narrow
    full-resolution stage, one structure can stay unpredicted for a few hundred steps (BENCHMARKS.md, "The default's
    slow start"). The user should hear that from us, not from a label map without the structure.
    """
    per_class = {k.removeprefix("val_dice_"): v for k, v in metrics.items()
                 if k.startswith("val_dice_") and k not in ("val_dice_mean",)}
    low = [name for name, value in per_class.items() if value < UNLEARNED_DICE]
    if not low:
        return None
    which = ", ".join(repr(n) for n in low)
    return (f"note: {which} scored validation Dice < {UNLEARNED_DICE} after {steps} steps: the network does not "
            f"predict {'it' if len(low) == 1 else 'them'} yet. Train longer (--max-epochs, --set train.max_time=30m); "
            "on short runs --set model.encoder_block=residual starts faster (BENCHMARKS.md, \"The default's slow start\")")


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
            console.print(f"[yellow]could not plot training curves: {err or type(err).__name__}[/]")
        table = Table(title=f"Validation Dice after {trainer.global_step} steps ({seconds / 60:.1f} min)")
        table.add_column("class")
        table.add_column("Dice", justify="right")
        for key, value in metrics.items():
            table.add_row(key.removeprefix("val_dice_"), f"{value:.4f}")
        console.print(table)
        note = unlearned_note(metrics, trainer.global_step)
        if note:
            console.print(f"[yellow]{note}[/]")
        console.print(f"run folder: {run.path}  (best checkpoint: {best})")
    return TrainResult(run.path, best, last if last.is_file() else None, metrics, trainer.global_step, seconds)
