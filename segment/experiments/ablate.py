"""`segment ablate`: train U-Nets that differ only in their long skip connections and report what that changes.

Everything else is held fixed: one plan (spacing, patch, batch, widths), one split, one time budget, and the same
training seeds for every variant (`--seeds 0,1` trains each variant once per seed). Each model is scored on the same
validation cases in their original geometry, and the report says what the paired differences show, beside the
seed-to-seed differences, including when they show nothing. The variant language is in `variants.py`.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from segment.config import Config, SkipSpec, TrainConfig, validate
from segment.errors import ConfigError, InputError
from segment.experiments.ablate_figures import make_figures, pick_cases
from segment.experiments.variants import (describe, dropped_alone, kept_levels, parse_seeds, parse_tokens,
                                          parse_variants, variant_name)

__all__ = ["parse_variants", "variant_name", "pick_cases", "run_ablation", "DEFAULT_BUDGET", "TIME_LIMITED_EPOCHS"]
Key = tuple[str, int]  # (variant, seed)

DEFAULT_BUDGET = "25m"
TIME_LIMITED_EPOCHS = 100_000  # with the default epoch count, the budget (not the epochs) ends each run
GRAD_CASES, GRAD_BATCH = 8, 2  # gradient norms: 8 training cases in 4 batches of 2


def _with_budget(cfg: Config, budget: str | None) -> tuple[Config, str]:
    """Same wall-clock budget for every variant; with the default epoch count, time is what ends a run."""
    from segment.train.runner import parse_duration

    text = budget or cfg.train.max_time or DEFAULT_BUDGET
    parse_duration(text)  # raises ConfigError naming train.max_time for e.g. "20 minutes"
    raw = cfg.model_dump(mode="json")
    raw["train"]["max_time"] = text
    if raw["train"]["max_epochs"] == TrainConfig.model_fields["max_epochs"].default:
        raw["train"]["max_epochs"] = TIME_LIMITED_EPOCHS
    return validate(raw, "--budget"), text


def _variant_config(cfg: Config, spec: SkipSpec, features: list[int], seed: int) -> Config:
    """The shared config with only the skips and the training seed changed (checked against the planned depth)."""
    raw = cfg.model_dump(mode="json")
    raw["model"]["skip_connections"] = spec
    raw["seed"] = seed
    validate({**raw, "model": {**raw["model"], "features": features}}, f"--variants {variant_name(spec)}")
    return validate(raw, f"--variants {variant_name(spec)}")


def _shared_split(cfg: Config, names: list[str]) -> dict[str, list[str]]:
    from segment.data.pipeline import make_split

    try:
        return make_split(names, cfg.seed, cfg.data.val_fraction, cfg.data.folds, cfg.data.fold)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _finished_run(run_dir: Path, split: dict[str, list[str]]) -> Any:
    """A previous, finished run of this variant on the same split (so a crashed ablation can continue), or None."""
    from segment.run_folder import RunFolder
    from segment.train.runner import TrainResult

    run = RunFolder(run_dir)
    s = run.read_summary()
    if s is None or run.read_split() != split:
        return None
    # the run folder's own files, not the absolute path summary.json recorded: the folder may have been moved
    best, last = run.best_checkpoint, run.last_checkpoint
    return TrainResult(run_dir, best if best.is_file() else None, last if last.is_file() else None, s.get("val_dice", {}), int(s["steps"]),
                       float(s["seconds"]))


def _run_dir(out: Path, name: str, seed: int, several_seeds: bool) -> Path:
    """runs/<variant> with one seed (as before seeds existed), runs/<variant>/seed-<seed> with several."""
    return out / "runs" / name / f"seed-{seed}" if several_seeds else out / "runs" / name


def _key(name: str, seed: int, several_seeds: bool) -> str:
    return f"{name} seed {seed}" if several_seeds else name


def _train_all(cfgs: dict[Key, Config], out: Path, plan: Any, split: dict[str, list[str]]) -> dict[Key, Any]:
    """Train every (variant, seed) into its run folder (`_run_dir`), reusing finished runs on the same split."""
    from segment.train.runner import console, train

    results = {}
    several = len({seed for _, seed in cfgs}) > 1
    for (name, seed), vcfg in cfgs.items():
        run_dir = _run_dir(out, name, seed, several)
        results[name, seed] = _finished_run(run_dir, split)
        if results[name, seed] is not None:
            console.print(f"[bold]{name} seed {seed}:[/] reusing the finished run in {run_dir}")
            continue
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise InputError(f"{run_dir}: holds an unfinished run of {name} (seed {seed}), or one on a different "
                             "split; delete that folder or choose another --output")
        console.rule(f"training {name}, seed {seed} (model.skip_connections={vcfg.model.skip_connections})")
        results[name, seed] = train(vcfg, output=run_dir, plan=plan, split=split)
    return results


def _checkpoint(result: Any, name: str) -> Path:
    ckpt = result.best_checkpoint or result.last_checkpoint
    if ckpt is None or not Path(ckpt).is_file():
        raise InputError(f"{result.run_dir}: variant {name} left no checkpoint to evaluate")
    return Path(ckpt)


def _evaluate_all(ckpts: dict[Key, Path], cases: list[Any],
                  cfg: Config) -> tuple[dict[str, dict[int, list]], dict[str, dict]]:
    """Rows per variant and seed, and boundary-error profiles per variant (cases and seeds pooled)."""
    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.figures import boundary_error_profile, pool_profiles

    rows: dict[str, dict[int, list]] = {}
    found: dict[str, list[dict[str, Any]]] = {}
    for (name, seed), ckpt in ckpts.items():
        mine = found.setdefault(name, [])

        def hook(case: str, channels: Any, geometry: Any, pred: np.ndarray, ref: np.ndarray,
                 mine: list = mine) -> None:
            mine.append(boundary_error_profile(pred, ref, geometry.spacing))

        rows.setdefault(name, {})[seed] = score_cases(load_predictor(ckpt), cases, cfg.evaluate, on_case=hook)
    return rows, {name: pool_profiles(p) for name, p in found.items()}


def _grad_norms(run_dirs: dict[str, Path], plan: Any, cases: list[Any], seed: int) -> dict[str, list[float]]:
    """Encoder gradient norms at initialisation, same seed and same deterministic patches for every variant."""
    import pytorch_lightning as pl

    from segment.data.preprocess import load_case
    from segment.experiments.gradients import foreground_patches, mean_encoder_grad_norms
    from segment.train.module import SegmentationModule

    items = [load_case(c.images, c.label, plan) for c in cases[:GRAD_CASES]]
    batches = foreground_patches(items, plan.patch_size, GRAD_BATCH)
    from segment.device import resolve_device
    from segment.run_folder import RunFolder

    device = resolve_device("auto")
    norms = {}
    for name, run_dir in run_dirs.items():  # each variant's first-seed run
        planned = RunFolder(run_dir).read_config().model_dump(mode="json")  # the config train() actually used
        pl.seed_everything(seed, verbose=False)
        module = SegmentationModule(planned, plan.to_dict()).to(device)
        norms[name] = mean_encoder_grad_norms(module, batches)
    return norms


def _machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.platform()}; {os.cpu_count()} CPUs; torch {torch.__version__}; device {device}"


def _meta(cfg: Config, dataset: Any, split: dict, budget: str, plan: Any, results: dict[Key, Any],
          seeds: list[int]) -> dict[str, Any]:
    return {
        "data": str(dataset.root), "cases": len(dataset.cases), "train cases": len(split["train"]),
        "validation cases": len(split["val"]),
        "budget per variant and seed": f"{budget} or {cfg.train.max_epochs} epochs of {cfg.train.steps_per_epoch} "
                                       "steps, whichever ends first",
        "steps": {_key(n, s, len(seeds) > 1): r.steps for (n, s), r in results.items()},
        "minutes": {_key(n, s, len(seeds) > 1): round(r.seconds / 60, 1) for (n, s), r in results.items()},
        "seed": cfg.seed, "training seeds": seeds, "split seed": cfg.seed,
        "precision": cfg.train.precision,
        "plan": {"spacing": plan.spacing, "patch": plan.patch_size, "batch": plan.batch_size,
                 "features": plan.features, "modality": plan.modality, "labels": plan.labels},
        "machine": _machine(),
    }


def _variant_info(specs: list[SkipSpec], n_levels: int, results: dict[Key, Any]) -> dict[str, dict[str, Any]]:
    info = {}
    for spec in specs:
        name = variant_name(spec)
        mine = [r for (n, _), r in results.items() if n == name]
        info[name] = {"kept": kept_levels(spec, n_levels), "description": describe(spec, n_levels),
                      "dropped_alone": dropped_alone(spec, n_levels),
                      "steps": " / ".join(str(r.steps) for r in mine),
                      "minutes": " / ".join(f"{r.seconds / 60:.1f}" for r in mine)}
    return info


def _print_summary(variants: dict[str, list], info: dict[str, dict[str, Any]], report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from segment.evaluation.metrics import LABELS, METRICS, fmt_value
    from segment.evaluation.stats import per_case_values

    table = Table(title="Ablation (validation cases, mean over cases and classes; per case the mean over seeds)")
    for col in ["variant", *(LABELS[m] for m in METRICS), "steps", "minutes"]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, rows in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a metric missing in every case prints as n/a
            means = [float(np.nanmean(list(per_case_values(rows, m).values()))) for m in METRICS]
        table.add_row(name, *(fmt_value(v, m) for v, m in zip(means, METRICS)), info[name]["steps"],
                      info[name]["minutes"])
    console = Console()
    console.print(table)
    console.print(f"report: {report}  (also report.html, metrics.csv and figures/ beside it)")


def run_ablation(cfg: Config, output: Path | None = None, budget: str | None = None, variants: str = "all,none",
                 seeds: str | None = None) -> Path:
    """Train one model per skip setting and seed under identical conditions, evaluate, and write the report.

    `variants` is the language of `variants.py` (e.g. "levels"); `seeds` e.g. "0,1" (default: the config's seed).
    Returns the path of report.md.
    """
    from segment.evaluation.seed_noise import average_seeds
    from segment.device import training_accelerator
    from segment.evaluation.metrics import write_csv
    from segment.evaluation.report import write_report
    from segment.train.plan_valid import plan_run
    from segment.train.setup import load_dataset

    parse_tokens(variants)  # a typo fails before the data are read
    if cfg.data.train_on_all:
        raise ConfigError("segment ablate compares variants on validation cases they did not train on; "
                          "data.train_on_all=true would train on them: leave it out")
    seed_list = parse_seeds(seeds, cfg.seed)
    cfg, budget_text = _with_budget(cfg, budget)
    out = Path(output) if output else Path("runs") / time.strftime("ablation-%Y%m%d-%H%M%S")
    dataset = load_dataset(cfg)
    split = _shared_split(cfg, [c.name for c in dataset.cases])
    plan, _ = plan_run(dataset, cfg, device=training_accelerator(cfg.train.accelerator))
    specs = parse_variants(variants, depth=len(plan.features))
    cfgs = {(variant_name(s), seed): _variant_config(cfg, s, plan.features, seed) for s in specs for seed in seed_list}
    results = _train_all(cfgs, out, plan, split)
    ckpts = {key: _checkpoint(r, f"{key[0]} seed {key[1]}") for key, r in results.items()}
    by_name = {c.name: c for c in dataset.cases}
    val_cases = [by_name[n] for n in split["val"]]
    seed_rows, profiles = _evaluate_all(ckpts, val_cases, cfg)
    rows = {name: average_seeds(by_seed) for name, by_seed in seed_rows.items()}
    run_dirs = {name: Path(results[name, seed_list[0]].run_dir) for name in seed_rows}
    norms = _grad_norms(run_dirs, plan, [by_name[n] for n in split["train"]], seed_list[0])
    figures = make_figures(out, ckpts, seed_rows, rows, profiles, run_dirs, norms, val_cases)
    write_csv([{"variant": name, "seed": seed, **row} for name, by_seed in seed_rows.items()
               for seed, vrows in by_seed.items() for row in vrows], out / "metrics.csv")
    info = _variant_info(specs, len(plan.features) - 1, results)
    report = write_report(out, variants=rows, meta=_meta(cfg, dataset, split, budget_text, plan, results, seed_list),
                          figures=figures, grad_norms=norms, bootstrap=cfg.evaluate.bootstrap, seed_rows=seed_rows,
                          variant_info=info)
    _print_summary(rows, info, report)
    return report
