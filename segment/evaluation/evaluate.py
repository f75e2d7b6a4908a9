"""`segment evaluate`: predict labelled cases in their own geometry and score them in millimetres.

Each scan is predicted on its own voxel grid (exactly what `segment predict` would write) and compared with its label
there, with the scan's spacing, so the numbers describe what a user actually gets, not a resampled proxy.

One bad case never ends an evaluation: a case that cannot be paired, read, predicted or scored is skipped with one line
naming its file and the problem, the others are scored, and the command then exits 1 (like `segment predict`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segment.data.labels import encode_labels
from segment.errors import ConfigError, InputError, few
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


def split_names(split: str, run_dir: Path | None, model: Path) -> set[str] | None:
    """Names of the run's `val` or `train` cases (from its split.json); None for `all` (every labelled case)."""
    check_split(split)
    if split == "all":
        return None
    from segment.run_folder import RunFolder

    saved = RunFolder(run_dir).read_split() if run_dir is not None else None
    if saved is None:
        raise InputError(f"--model {model}: no run folder with split.json, so the {_which(split)} cases are unknown; "
                         "use --split all to score every case in --data")
    return set(saved[split])


def _which(split: str) -> str:
    return {"val": "validation", "train": "training"}.get(split, split)


def choose_cases(dataset: Dataset, split: str, run_dir: Path | None, model: Path) -> list[Case]:
    """The cases to score: the run's validation cases (`val`), its training cases (`train`: what the model has seen,
    beside `val` it shows the generalisation gap) or every labelled case (`all`)."""
    names = split_names(split, run_dir, model)
    cases = [c for c in dataset.cases if c.label is not None]
    if names is None:
        return cases
    chosen = [c for c in cases if c.name in names]
    if not chosen:
        bad = len(names & set(dataset.skipped))
        if bad:
            absent = f", {len(names) - bad} not in this dataset" if bad < len(names) else ""
            raise InputError(f"{dataset.root}: none of the {len(names)} {_which(split)} cases of {run_dir} can be "
                             f"scored: {bad} left out as unusable{absent}")
        raise InputError(f"{dataset.root}: none of the {len(names)} {_which(split)} cases of {run_dir} are in this "
                         "dataset; use --split all to score every case in --data")
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
                on_case: CaseHook | None = None, skipped: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Predict and score each case in its own geometry; `on_case` sees every prediction (e.g. for figures).

    With `skipped`, a case that cannot be read, predicted or scored is left out and its one-line reason stored there
    under its name, and the next case goes on; without it the first such error is raised.
    """
    from rich.progress import track

    from segment.evaluation.metrics import evaluate_cases
    from segment.inference.batch import case_error

    classes = class_names(predictor)
    rows: list[dict[str, Any]] = []
    for case in track(cases, description="Evaluating", transient=True):
        try:
            rows += evaluate_cases(_metric_inputs(predictor, [case], on_case), classes, eval_cfg, progress=False)
        except Exception as err:  # one bad case (or an out-of-memory) never ends the evaluation
            if skipped is None:
                raise
            skipped[case.name] = case_error(case, err)  # type: ignore[arg-type]  # needs only `images`
    return rows


def model_labels(predictor: Predictor) -> dict[int, str]:
    """Label value -> class name of the model (background included), as its predictions write them."""
    from segment.data.labels import class_values

    names = class_names(predictor)
    return dict(zip(class_values(predictor.plan, len(names)), names.values()))


def label_differences(data_labels: dict[int, str], model: dict[int, str], declared: bool = True) -> list[str]:
    """How the dataset's labels (value -> name) differ from the model's, one short phrase per kind of difference.

    Names and values the model lacks are compared only for `declared` labels (dataset.json); labels inferred from the
    values found count by value alone (a class of the model may simply be absent from these cases).
    """
    out = []
    extra = [f"{v} ({data_labels[v]})" if declared else str(v) for v in sorted(set(data_labels) - set(model))]
    if extra:
        out.append(f"value{'s' if len(extra) > 1 else ''} {few(extra, 4, total=True)} not a class of the model "
                   "(not scored)")
    if not declared:
        return out
    renamed = [f"{v} {data_labels[v]} (model: {model[v]})" for v in sorted(set(data_labels) & set(model) - {0})
               if data_labels[v].strip().casefold() != model[v].strip().casefold()]  # background is not scored
    if renamed:
        out.append(f"names differ: {few(renamed, 4, total=True)}")
    absent = [f"{v} ({model[v]})" for v in sorted(set(model) - set(data_labels))]
    if absent:
        out.append(f"the model's class{'es' if len(absent) > 1 else ''} {few(absent, 4, total=True)} not declared "
                   "here (no reference voxels in any case)")
    return out


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


def output_path(output: Path | None, default: Path, split: str) -> Path:
    """The CSV to write: `output` (a .csv file, or an existing folder: evaluation-<split>.csv in it) or `default`,
    checked to be writable now, before any case is scored (one line naming the path, not a traceback at the end)."""
    wanted = default if output is None else Path(output)
    if output is not None and wanted.is_dir():
        wanted = wanted / f"evaluation-{split}.csv"
    elif output is not None and wanted.suffix.lower() != ".csv":
        raise InputError(f"-o {output}: expected a .csv file or an existing folder (for evaluation-{split}.csv)")
    folder = next((p for p in (wanted.parent, *wanted.parent.parents) if p.exists() or p.is_symlink()), None)
    flag = "-o " if output is not None else ""
    if folder is None or not folder.is_dir():
        raise InputError(f"{flag}{wanted}: cannot write there: {folder} is not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        hint = "" if output is not None else "; choose another CSV path with -o"
        reason = err.strerror or type(err).__name__
        raise InputError(f"{flag}{wanted}: cannot write in {folder} ({reason}){hint}") from None
    return wanted


def run_evaluate(model: Path, data: Path, output: Path | None = None, split: str = "val",
                 tolerance: float | None = None, device: str = "auto") -> int:
    """Score a trained model on labelled data; write one CSV row per case and class and print a summary.

    Every case that cannot be scored is skipped in one line and the others are scored. Returns the exit status: 0,
    or 1 when any case was skipped (as `segment predict` for failed cases).
    """
    from rich.console import Console
    from rich.markup import escape

    from segment.evaluation.metrics import summary_table, write_csv
    from segment.io.dataset import discover_quietly

    check_split(split)
    if tolerance is not None and not tolerance > 0:
        raise ConfigError(f"--tolerance {tolerance}: the NSD tolerance must be a positive distance in mm")
    ckpt, run_dir = resolve_model(model)
    wanted = output_path(output, (run_dir or ckpt.parent) / f"evaluation-{split}.csv", split)
    console = Console(highlight=False)
    dataset, notes = discover_quietly(Path(data))
    for note in notes:
        console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
    names = split_names(split, run_dir, model)
    skipped = {n: r for n, r in dataset.skipped.items() if names is None or n in names}
    for reason in skipped.values():
        console.print(f"[yellow]skipping[/] {escape(reason)}", soft_wrap=True)
    missing = sorted(names - {c.name for c in dataset.cases} - set(dataset.skipped)) if names is not None else []
    if missing:
        console.print(f"[yellow]warning:[/] {len(missing)} of {len(names or ())} {_which(split)} case(s) of "
                      f"{escape(str(run_dir))} not found in --data {escape(str(data))}: "
                      f"{escape(few(missing, 4, total=True))}",
                      soft_wrap=True)
    cases = choose_cases(dataset, split, run_dir, model)
    total = len(names) if names is not None else len(cases) + len(skipped)
    predictor = load_predictor(ckpt, device)
    if split == "val" and predictor.config.data.train_on_all:
        console.print("[yellow]note: this model trained with data.train_on_all=true, so its validation cases were "
                      "training cases too: these scores are optimistic[/]")
    differences = label_differences(dataset.labels, model_labels(predictor), dataset.labels_declared)
    if differences:
        where = Path(data) / "dataset.json" if dataset.labels_declared else f"{data} (label values found)"
        console.print(f"[yellow]warning:[/] {escape(str(where))}: labels differ from the model's: "
                      f"{escape('; '.join(differences))}; scores are by label value, under the model's names",
                      soft_wrap=True)
    eval_cfg = _eval_config(predictor, tolerance)
    failed: dict[str, str] = {}
    rows = score_cases(predictor, cases, eval_cfg, skipped=failed)
    for reason in failed.values():
        console.print(f"[yellow]skipping[/] {escape(reason)}", soft_wrap=True)
    skipped.update(failed)
    scored = len(cases) - len(failed)
    counts = (f"{scored} of {total} {split} case(s) scored"
              + (f"; {len(skipped)} skipped (see the skipping lines above)" if skipped else "")
              + (f"; {len(missing)} not in --data" if missing else ""))
    if not scored:
        raise InputError(f"{data}: no case could be scored ({counts})")
    path = write_csv(rows, free_path(wanted))
    if path != wanted:
        console.print(f"[yellow]{escape(str(wanted))} exists; not overwriting it[/]", soft_wrap=True)
    console.print(summary_table(rows, title=f"{scored} {split} case(s), NSD tolerance "
                                            f"{eval_cfg.nsd_tolerance_mm:g} mm (mean ± std)"))
    console.print(f"per-case metrics: {escape(str(path))}", soft_wrap=True)
    console.print(counts, soft_wrap=True)
    return 1 if skipped else 0
