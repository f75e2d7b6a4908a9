"""`segment evaluate`: predict labelled cases in their own geometry and score them in millimetres.

Each scan is predicted on its own voxel grid (exactly what `segment predict` would write) and compared with its label
there, with the scan's spacing, so the numbers describe what a user actually gets, not a resampled proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segment.data.labels import encode_labels
from segment.errors import ConfigError, InputError
from segment.evaluation.splits import check_split
from segment.io.dataset import Case, Dataset

if TYPE_CHECKING:
    from segment.config import EvaluateConfig
    from segment.inference.predictor import Predictor
    from segment.io.image import Geometry

CaseHook = Callable[[str, list[np.ndarray], "Geometry", np.ndarray, np.ndarray], None]


def resolve_model(model: Path) -> tuple[Path, Path | None]:
    """`(checkpoint, run folder or None)` for a run folder (best.ckpt, else last.ckpt) or a .ckpt file."""
    from segment.run_folder import RunFolder, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(Path(model))
    except InputError as err:
        raise InputError(f"--model {err}") from None
    if Path(model).is_dir():
        return ckpt, Path(model)
    run = RunFolder.of_checkpoint(ckpt)
    return ckpt, run.path if run else None


def choose_cases(dataset: Dataset, split: str, run_dir: Path | None, model: Path) -> list[Case]:
    """The cases to score: the run's validation cases (`val`), its training cases (`train`: what the model has seen,
    beside `val` it shows the generalisation gap) or every labelled case (`all`)."""
    check_split(split)
    cases = [c for c in dataset.cases if c.label is not None]
    if split == "all":
        return cases
    from segment.run_folder import RunFolder

    which = "validation" if split == "val" else "training"
    saved = RunFolder(run_dir).read_split() if run_dir is not None else None
    if saved is None:
        raise InputError(f"--model {model}: no run folder with split.json, so the {which} cases are unknown; "
                         "use --split all to score every case in --data")
    names = set(saved[split])
    chosen = [c for c in cases if c.name in names]
    if not chosen:
        raise InputError(f"{dataset.root}: none of the {len(names)} {which} cases of {run_dir} are in this dataset; "
                         "use --split all to score every case in --data")
    return chosen


def read_case_arrays(case: Case) -> tuple[list[np.ndarray], Geometry, np.ndarray]:
    """Channel images, their geometry, and the label checked to lie on the same grid (the one case reader)."""
    from segment.io.case import read_case

    if case.label is None:
        raise InputError(f"case {case.name}: no label to evaluate against")
    data = read_case(case.images, case.label)
    assert data.label is not None
    return data.channels, data.geometry, data.label


def predict_labels(predictor: Predictor, channels: list[np.ndarray], geometry: Geometry) -> np.ndarray:
    """Label map on the scan's own grid (argmax of the predictor's probabilities)."""
    if hasattr(predictor, "predict_labels"):
        return np.asarray(predictor.predict_labels(channels, geometry)[0])
    return np.asarray(predictor.predict_probabilities(channels, geometry)).argmax(0).astype(np.uint8)


def load_predictor(ckpt: Path, device: str = "auto") -> Predictor:
    """A Predictor with the checkpoint's own predict settings (overlap, precision, blending) from its config."""
    from segment.inference.loading import load_checkpoint
    from segment.inference.predictor import Predictor

    model, plan, config = load_checkpoint(ckpt)
    return Predictor(model, plan, config, device=device)  # None settings: the checkpoint's own predict config


def class_names(predictor: Predictor) -> dict[int, str]:
    """Class index -> name from the checkpoint's plan (background included; metrics skip it)."""
    k = int(predictor.config.model.out_channels)
    labels = {int(i): str(n) for i, n in predictor.plan.labels.items()}
    return {i: labels.get(i, f"class_{i}") for i in range(k)}


def _metric_inputs(predictor: Predictor, cases: Iterable[Case],
                   on_case: CaseHook | None) -> Iterator[tuple[str, np.ndarray, np.ndarray, Sequence[float]]]:
    for case in cases:
        channels, geometry, ref = read_case_arrays(case)
        ref = encode_labels(ref, predictor.plan, case.label)  # class indices, as the predictor's labels are
        pred = predict_labels(predictor, channels, geometry)
        if on_case is not None:
            on_case(case.name, channels, geometry, pred, ref)
        yield case.name, pred, ref, geometry.spacing


def score_cases(predictor: Predictor, cases: Sequence[Case], eval_cfg: EvaluateConfig,
                on_case: CaseHook | None = None) -> list[dict[str, Any]]:
    """Predict and score each case in its own geometry; `on_case` sees every prediction (e.g. for figures)."""
    from segment.evaluation.metrics import evaluate_cases

    return evaluate_cases(_metric_inputs(predictor, cases, on_case), class_names(predictor), eval_cfg)


def free_path(path: Path) -> Path:
    """`path`, or `stem-2.csv`, `stem-3.csv`, ... when it exists: results are never silently overwritten."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _eval_config(predictor: Predictor, tolerance: float | None) -> EvaluateConfig:
    from segment.config import EvaluateConfig

    cfg = predictor.config.evaluate
    if tolerance is None:
        return cfg
    return EvaluateConfig.model_validate({**cfg.model_dump(), "nsd_tolerance_mm": float(tolerance)})


def run_evaluate(model: Path, data: Path, output: Path | None = None, split: str = "val",
                 tolerance: float | None = None, device: str = "auto") -> list[dict[str, Any]]:
    """Score a trained model on labelled data; write one CSV row per case and class and print a summary."""
    from rich.console import Console

    from segment.evaluation.metrics import summary_table, write_csv
    from segment.io.dataset import discover

    check_split(split)
    if tolerance is not None and not tolerance > 0:
        raise ConfigError(f"--tolerance {tolerance}: the NSD tolerance must be a positive distance in mm")
    ckpt, run_dir = resolve_model(model)
    dataset = discover(data)
    cases = choose_cases(dataset, split, run_dir, model)
    predictor = load_predictor(ckpt, device)
    console = Console()
    if split == "val" and predictor.config.data.train_on_all:
        console.print("[yellow]note: this model trained with data.train_on_all=true, so its validation cases were "
                      "training cases too: these scores are optimistic[/]")
    eval_cfg = _eval_config(predictor, tolerance)
    rows = score_cases(predictor, cases, eval_cfg)
    wanted = Path(output) if output is not None else (run_dir or ckpt.parent) / f"evaluation-{split}.csv"
    path = write_csv(rows, free_path(wanted))
    if path != wanted:
        console.print(f"[yellow]{wanted} exists; not overwriting it[/]")
    console.print(summary_table(rows, title=f"{len(cases)} {split} case(s), NSD tolerance "
                                            f"{eval_cfg.nsd_tolerance_mm:g} mm (mean ± std)"))
    console.print(f"per-case metrics: {path}")
    return rows
