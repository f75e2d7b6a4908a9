"""`segment predict`: expand inputs into cases, name outputs, segment case by case, report every failure at the end.

One bad scan never stops a batch: each case's error is printed as one line and listed in the summary, and the
exit code says whether everything succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from segment.errors import SegmentError
from segment.inference.inputs import (
    CONFIDENCE_CSV,
    CaseOutputs,
    ScanCase,
    expand_inputs,
    group_numbered,
    output_paths,
    parse_formats,
)

if TYPE_CHECKING:
    from segment.inference.predictor import Predictor


def _summary(result: dict) -> str:
    volumes = ", ".join(f"{name} {ml:.2f} ml" for name, ml in result["volumes_ml"].items())
    written = result["output"] + (f", {result['dicom_seg']}" if result.get("dicom_seg") not in (None, result["output"])
                                  else "")
    confidence = f"; confidence {result['confidence']:.3f}" if result.get("confidence") is not None else ""
    return (f"[green]ok[/] {escape(result['case'])}: {result['seconds']:.2f} s, {result['voxels_per_s']:.3g} voxels/s; "
            f"{escape(volumes) or 'no foreground'}{confidence} -> {escape(written)}")


def confidence_path(cases: list[ScanCase], targets: dict[str, CaseOutputs], output: Path | None) -> Path:
    """confidence.csv beside the outputs: in the -o folder, beside -o FILE, beside the scans when they share a folder,
    else in the current folder."""
    folders = {p.parent for c in cases for p in targets[c.key].all()[:1]}
    folder = next(iter(folders)) if len(folders) == 1 else (Path(output) if output is not None else Path("."))
    return folder / CONFIDENCE_CSV


def _free(path: Path, overwrite: bool) -> Path:
    """`path`, or confidence-2.csv, -3, ... when it exists and --overwrite was not given (never another file)."""
    candidate, n = path, 2
    while candidate.exists() and not (overwrite and candidate.read_text(errors="replace").startswith("case,confidence")):
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def run_predict(inputs: list[str], *, output: Path | None, model: str | Path | None, device: str, tta: bool | None,
                overlap: float | None, largest_component: bool | None, save_probabilities: bool, overwrite: bool,
                series: str | None = None, debug: bool = False, precision: str | None = None,
                formats: str | Sequence[str] = "nifti") -> int:
    """Segment every case; 0 when all succeeded, 1 when any input or case failed (all are listed at the end).

    `formats`: "nifti" (default), "dicom-seg" (DICOM folders only) or both ("nifti,dicom-seg").
    """
    from segment.inference.predictor import Predictor
    from segment.run_folder import resolve_checkpoint

    formats = parse_formats(formats)
    console = Console(highlight=False, soft_wrap=True)
    notes: list[str] = []
    files, dicom_cases, failures = expand_inputs(list(inputs), notes)
    for line in notes:
        console.print(f"[yellow]note:[/] {escape(line)}")
    if not files and not dicom_cases:
        for message in failures.values():
            console.print(f"[red]failed[/] {escape(message)}")
        console.print("nothing to segment")
        return 1
    ckpt = resolve_checkpoint(model)
    predictor = Predictor.from_checkpoint(ckpt, device, overlap=overlap, tta=tta, largest_component=largest_component,
                                          precision=precision)
    cases, note = group_numbered(files, predictor.plan.channels)
    cases += dicom_cases
    if note:
        console.print(note)
    targets = output_paths(cases, Path(output) if output is not None else None, save_probabilities, formats)
    seen: dict[Path, str] = {}
    for case in cases:
        for target in (t.resolve() for t in targets[case.key].all()):
            if target in seen and case.key not in failures:
                failures[case.key] = f"{case.images[0]}: output {target} would also be written by {seen[target]}"
            seen.setdefault(target, case.key)
    todo = [c for c in cases if c.key not in failures]
    if todo:
        console.print(f"model {escape(str(ckpt))} on {predictor.device} ({len(todo)} case(s))")
        if predictor.tta:
            axes = predictor.plan.tta_axes()
            console.print(f"--tta: mirroring axes {axes} (those the model was trained to mirror)" if axes else
                          "[yellow]--tta: this model was trained without mirroring (data.augment.mirror_axes=[]), "
                          "so there is nothing to mirror; predicting without TTA[/]")
        if len(predictor.members) > 1:
            console.print(f"ensemble of {len(predictor.members)} folds: their probabilities are averaged")
        results = _run_cases(predictor, todo, targets, overwrite, failures, console, series=series, debug=debug)
        _report_confidence(results, predictor, confidence_path(todo, targets, output), overwrite, console)
    for message in failures.values():
        console.print(f"[red]failed[/] {escape(message)}")
    console.print(f"{len(todo) - sum(c.key in failures for c in todo)} of {len(cases)} case(s) segmented"
                  + (f"; {len(failures)} failed" if failures else ""))
    return 1 if failures else 0


def _is_dicom(case: ScanCase) -> bool:
    return len(case.images) == 1 and case.images[0].is_dir()


def _report_confidence(results: list[dict], predictor: Predictor, path: Path, overwrite: bool, console: Console) -> None:
    """Write confidence.csv and say which cases to check (low confidence or unlike the training scans)."""
    from segment.inference.confidence import flag_text, write_confidence_csv

    if not results:
        return
    written = write_confidence_csv(results, _free(path, overwrite))
    flagged = [r for r in results if flag_text(r)]
    for r in flagged:
        console.print(f"[bold yellow]{escape(flag_text(r))}[/] - {escape(r['case'])}")
    console.print(f"confidence per case: {escape(str(written))} ({len(flagged)} of {len(results)} flagged; threshold "
                  f"{predictor.threshold:.3f}{'' if predictor.profile else ', no scan profile: no out-of-distribution check'})")


def _run_cases(predictor: Predictor, cases: list[ScanCase], targets: dict[str, CaseOutputs], overwrite: bool,
               failures: dict[str, str], console: Console, *, series: str | None = None,
               debug: bool = False) -> list[dict]:
    """Predict case by case under one progress bar; any error is one line for that case, and the next case goes on.

    `debug` adds the traceback (for bug reports); without it no failure of one case prints more than one line.
    A DICOM-SEG asked for a case that is no DICOM series fails that case in one line; its NIfTI, when also asked
    for, is still written.
    """
    results: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("segmenting", total=len(cases))
        for case in cases:
            progress.update(task, description=f"segmenting {escape(case.name)}")
            label, prob, dicom_seg = targets[case.key]
            no_seg = dicom_seg is not None and label is not None and not _is_dicom(case)
            try:
                result = predictor.predict_file(case.images, label, overwrite=overwrite, probabilities=prob,
                                                series=series, dicom_seg=None if no_seg else dicom_seg)
                progress.console.print(_summary(result))
                results.append(result)
                for warning in result.get("warnings", []):
                    progress.console.print(f"[yellow]warning[/] {escape(warning)}")
                if no_seg:
                    failures[case.key] = (f"{case.images[0]}: DICOM-SEG needs a DICOM source series (a DICOM "
                                          "folder); only the NIfTI label map was written")
                    progress.console.print(f"[red]error[/] {escape(failures[case.key])}")
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - one bad case (or an out-of-memory) never ends the batch
                failures[case.key] = case_error(case, err)
                progress.console.print(f"[red]error[/] {escape(failures[case.key])}")
                if debug:
                    progress.console.print_exception()
            progress.advance(task)
    return results


def case_error(case: ScanCase, err: BaseException) -> str:
    """One line naming the case's file and the problem (our own errors already name the file)."""
    if isinstance(err, SegmentError):
        return str(err).replace("\n", " ")
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, MemoryError) or "out of memory" in text.lower():
        text = f"out of memory ({text or 'MemoryError'}); try --device cpu, a smaller --overlap or a machine with more memory"
    return f"{case.images[0]}: {type(err).__name__}: {text[:300]}"
