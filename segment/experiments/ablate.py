"""`segment ablate`: train U-Nets that differ only in their long skip connections and report what that changes.

Everything else is held fixed: one plan (spacing, patch, batch, widths), one split, one seed, one time budget. Each
variant is then scored on the same validation cases in their original geometry, and the report says what the paired
differences show, including when they show nothing.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segment.config import Config, SkipSpec, TrainConfig, validate
from segment.errors import ConfigError, InputError

DEFAULT_BUDGET = "25m"
TIME_LIMITED_EPOCHS = 100_000  # with the default epoch count, the budget (not the epochs) ends each run
GRAD_CASES, GRAD_BATCH = 8, 2  # gradient norms: 8 training cases in 4 batches of 2


def _split_outside_brackets(text: str) -> list[str]:
    tokens, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ConfigError(f"--variants {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            tokens.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ConfigError(f"--variants {text!r}: '[' without ']'")
    return tokens + [current]


def parse_variants(text: str) -> list[SkipSpec]:
    """'all,none,[0]' -> ['all', 'none', [0]]: skip settings, split on commas outside brackets."""
    specs: list[SkipSpec] = []
    for token in (t.strip() for t in _split_outside_brackets(text)):
        value = yaml.safe_load(token) if token else None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        ok = value in ("all", "none") or (isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise ConfigError(f"--variants {text!r}: {token!r} is not a skip setting; "
                              "use all, none or a list of levels such as [0,1]")
        specs.append(value if isinstance(value, str) else sorted(set(value)))
    names = [variant_name(s) for s in specs]
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"--variants {text!r}: need at least two different skip settings, e.g. all,none")
    return sorted(specs, key=lambda s: -_kept_count(s))  # the with-skips variant is the reference


def _kept_count(spec: SkipSpec) -> float:
    return float("inf") if spec == "all" else (0 if spec == "none" else len(spec))


def variant_name(spec: SkipSpec) -> str:
    """Folder-safe name: skips-all, skips-none, skips-0-1."""
    return "skips-" + (spec if isinstance(spec, str) else "-".join(str(v) for v in spec) or "none")


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


def _variant_config(cfg: Config, spec: SkipSpec, features: list[int]) -> Config:
    """The shared config with only the skips changed (checked against the planned depth before any training)."""
    raw = cfg.model_dump(mode="json")
    raw["model"]["skip_connections"] = spec
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
    best = Path(s["best_checkpoint"]) if s.get("best_checkpoint") else None
    last = run.last_checkpoint
    return TrainResult(run_dir, best, last if last.is_file() else None, s.get("val_dice", {}), int(s["steps"]),
                       float(s["seconds"]))


def _train_all(cfgs: dict[str, Config], out: Path, plan: Any, split: dict[str, list[str]]) -> dict[str, Any]:
    from segment.train.runner import console, train

    results = {}
    for name, vcfg in cfgs.items():
        run_dir = out / "runs" / name
        results[name] = _finished_run(run_dir, split)
        if results[name] is not None:
            console.print(f"[bold]{name}:[/] reusing the finished run in {run_dir}")
            continue
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise InputError(f"{run_dir}: holds an unfinished run of {name}, or one on a different split; "
                             "delete that folder or choose another --output")
        console.rule(f"training {name} (model.skip_connections={vcfg.model.skip_connections})")
        results[name] = train(vcfg, output=run_dir, plan=plan, split=split)
    return results


def _checkpoint(result: Any, name: str) -> Path:
    ckpt = result.best_checkpoint or result.last_checkpoint
    if ckpt is None or not Path(ckpt).is_file():
        raise InputError(f"{result.run_dir}: variant {name} left no checkpoint to evaluate")
    return Path(ckpt)


def _evaluate_all(ckpts: dict[str, Path], cases: list[Any], cfg: Config) -> tuple[dict[str, list], dict[str, dict]]:
    """Rows and pooled boundary-error profiles per variant, all on the same validation cases."""
    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.figures import boundary_error_profile, pool_profiles

    variants, profiles = {}, {}
    for name, ckpt in ckpts.items():
        found: list[dict[str, Any]] = []

        def hook(case: str, channels: Any, geometry: Any, pred: np.ndarray, ref: np.ndarray) -> None:
            found.append(boundary_error_profile(pred, ref, geometry.spacing))

        predictor = load_predictor(ckpt)
        variants[name] = score_cases(predictor, cases, cfg.evaluate, on_case=hook)
        profiles[name] = pool_profiles(found)
    return variants, profiles


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
    for name, run_dir in run_dirs.items():
        planned = RunFolder(run_dir).read_config().model_dump(mode="json")  # the config train() actually used
        pl.seed_everything(seed, verbose=False)
        module = SegmentationModule(planned, plan.to_dict()).to(device)
        norms[name] = mean_encoder_grad_norms(module, batches)
    return norms


def pick_cases(variants: dict[str, list[dict[str, Any]]], n: int = 3) -> list[tuple[str, float]]:
    """Cases worth looking at: largest Dice gap for the reference, the median gap, largest gap the other way.

    The gap is the first variant (most skips) minus the last one (fewest skips): the contrast the ablation is about.
    """
    from segment.evaluation.stats import per_case_values

    rows_a, rows_b = list(variants.values())[0], list(variants.values())[-1]
    va, vb = per_case_values(rows_a, "dice"), per_case_values(rows_b, "dice")
    gap = {c: va[c] - vb[c] for c in sorted(set(va) & set(vb))}
    order = sorted(gap, key=lambda c: gap[c])
    picks = [order[-1], order[len(order) // 2], order[0]] if order else []
    return [(c, gap[c]) for c in dict.fromkeys(picks)][:n]


def _figures(out: Path, ckpts: dict[str, Path], variants: dict[str, list], profiles: dict[str, dict],
             run_dirs: dict[str, Path], norms: dict[str, list[float]], cases: list[Any]) -> dict[str, Path]:
    from segment.evaluation.evaluate import load_predictor, predict_labels, read_case_arrays
    from segment.figures import (plot_boundary_error, plot_contours, plot_gradient_norms,
                                            plot_training_curves)
    from segment.run_folder import RunFolder

    fig_dir, figures = out / "figures", {}
    predictors = {name: load_predictor(ckpt) for name, ckpt in ckpts.items()}
    by_name = {c.name: c for c in cases}
    ref_name, other = list(variants)[0], list(variants)[-1]
    for i, (case, gap) in enumerate(pick_cases(variants)):
        channels, geometry, ref = read_case_arrays(by_name[case])
        preds = {name: predict_labels(p, channels, geometry) for name, p in predictors.items()}
        caption = f"Contours, case {case} (Dice {ref_name} − {other}: {gap:+.3f})"
        figures[caption] = plot_contours(channels[0], ref, preds, fig_dir / f"contours_{i}.png", title=caption,
                                         spacing=geometry.spacing)
    figures["Boundary error vs distance from the reference surface (all validation cases pooled)"] = \
        plot_boundary_error(profiles, fig_dir / "boundary_error.png")
    logs = {n: parts[0] for n, d in run_dirs.items() if (parts := RunFolder(d).metric_logs())}
    if logs:
        figures["Training curves"] = plot_training_curves(logs, fig_dir / "training_curves.png")
    figures["Gradient norm per encoder depth at initialisation"] = plot_gradient_norms(norms, fig_dir / "grad_norms.png")
    return figures


def _machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.platform()}; {os.cpu_count()} CPUs; torch {torch.__version__}; device {device}"


def _meta(cfg: Config, dataset: Any, split: dict, budget: str, plan: Any, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": str(dataset.root), "cases": len(dataset.cases), "train cases": len(split["train"]),
        "validation cases": len(split["val"]), "budget per variant": f"{budget} or {cfg.train.max_epochs} epochs of {cfg.train.steps_per_epoch} steps, "
                              "whichever ends first",
        "steps": {n: r.steps for n, r in results.items()},
        "minutes": {n: round(r.seconds / 60, 1) for n, r in results.items()}, "seed": cfg.seed,
        "precision": cfg.train.precision,
        "plan": {"spacing": plan.spacing, "patch": plan.patch_size, "batch": plan.batch_size,
                 "features": plan.features, "modality": plan.modality, "labels": plan.labels},
        "machine": _machine(),
    }


def _print_summary(variants: dict[str, list], results: dict[str, Any], report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from segment.evaluation.metrics import LABELS, METRICS, fmt_value
    from segment.evaluation.stats import per_case_values

    table = Table(title="Ablation (validation cases, mean over cases and classes)")
    for col in ["variant", *(LABELS[m] for m in METRICS), "steps", "minutes"]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, rows in variants.items():
        means = [float(np.nanmean(list(per_case_values(rows, m).values()))) for m in METRICS]
        table.add_row(name, *(fmt_value(v, m) for v, m in zip(means, METRICS)), str(results[name].steps),
                      f"{results[name].seconds / 60:.1f}")
    console = Console()
    console.print(table)
    console.print(f"report: {report}  (also report.html, metrics.csv and figures/ beside it)")


def run_ablation(cfg: Config, output: Path | None = None, budget: str | None = None, variants: str = "all,none") -> Path:
    """Train one model per skip setting under identical conditions, evaluate, and write the report; returns report.md."""
    from segment.data.plan import make_plan
    from segment.device import training_accelerator
    from segment.evaluation.metrics import write_csv
    from segment.evaluation.report import write_report
    from segment.train.runner import load_dataset

    specs = parse_variants(variants)
    cfg, budget_text = _with_budget(cfg, budget)
    out = Path(output) if output else Path("runs") / time.strftime("ablation-%Y%m%d-%H%M%S")
    dataset = load_dataset(cfg)
    split = _shared_split(cfg, [c.name for c in dataset.cases])
    plan, _ = make_plan(dataset, cfg, device=training_accelerator(cfg.train.accelerator))
    cfgs = {variant_name(s): _variant_config(cfg, s, plan.features) for s in specs}
    results = _train_all(cfgs, out, plan, split)
    ckpts = {name: _checkpoint(r, name) for name, r in results.items()}
    by_name = {c.name: c for c in dataset.cases}
    val_cases = [by_name[n] for n in split["val"]]
    rows, profiles = _evaluate_all(ckpts, val_cases, cfg)
    run_dirs = {name: Path(r.run_dir) for name, r in results.items()}
    norms = _grad_norms(run_dirs, plan, [by_name[n] for n in split["train"]], cfg.seed)
    figures = _figures(out, ckpts, rows, profiles, run_dirs, norms, val_cases)
    write_csv([{"variant": name, **row} for name, vrows in rows.items() for row in vrows], out / "metrics.csv")
    report = write_report(out, variants=rows, meta=_meta(cfg, dataset, split, budget_text, plan, results),
                          figures=figures, grad_norms=norms, bootstrap=cfg.evaluate.bootstrap)
    _print_summary(rows, results, report)
    return report
