"""Before the first training step: the dataset read and checked in full, the config that follows the plan, and the
plan table printed at the start of `segment train` (and of each fold)."""

from __future__ import annotations


from rich.console import Console
from rich.table import Table

from segment.config import Config, validate
from segment.data.plan import Plan
from segment.device import global_rank
from segment.errors import InputError
from segment.io.dataset import Dataset, discover_quietly
from segment.run_folder import RunFolder

console = Console(stderr=True)


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
    # pairing only: structural problems land in dataset.skipped, listed once by the check below
    dataset, notes = discover_quietly(root, check=False)
    for note in notes[:10]:
        console.print(f"[yellow]warning:[/] {escape(note)}")
    if cfg.data.max_cases:  # the first N cases by name, bad ones included, so a quick run checks only what it uses
        first = set(sorted([c.name for c in dataset.cases] + list(dataset.skipped))[: cfg.data.max_cases])
        dataset.cases = [c for c in dataset.cases if c.name in first]
        dataset.skipped = {n: r for n, r in dataset.skipped.items() if n in first}
    for note in check_dataset(dataset, skip_bad=cfg.data.skip_bad).notes:
        console.print(f"[yellow]warning:[/] {escape(note)}")
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


def apply_plan(cfg: Config, plan: Plan) -> Config:
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


def warn_ordered_axes(ordered: dict[str, str], plan: Plan) -> None:
    """Say when training mirrors an axis along which two labels always keep the same order."""
    names = "left-right", "back-front", "down-up"
    for axis, reason in sorted(ordered.items()):
        if int(axis) in plan.tta_axes() and _rank_zero():
            console.print(f"[yellow]note:[/] mirroring axis {axis} ({names[int(axis)]}) although {reason}; if those labels "
                          "are left/right or front/back counterparts, leave the axis out: --set data.augment.mirror_axes=[...]")
