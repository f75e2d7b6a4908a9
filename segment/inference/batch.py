"""`segment predict`: expand inputs into cases, name outputs, segment case by case, report every failure at the end.

One bad scan never stops a batch: each case's error is printed as one line and listed in the summary, and the
exit code says whether everything succeeded.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from segment.errors import InputError, SegmentError

if TYPE_CHECKING:
    from segment.inference.predictor import Predictor

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
OUTPUT_TAGS = ("_seg", "_probabilities")  # our own outputs, never treated as scans
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass
class ScanCase:
    """One case to segment: its name (for output files) and its channel images (or one DICOM folder)."""

    name: str
    images: list[Path]
    origin: Path  # where `scan_seg.nii.gz` goes when no -o is given

    @property
    def key(self) -> str:
        return str(self.images[0])


def _stem(path: Path) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _is_output(stem: str) -> bool:
    return stem.endswith(OUTPUT_TAGS)


def group_numbered(files: list[Path], channels: int) -> tuple[list[ScanCase], str]:
    """Files -> cases, and a sentence saying how numbered files were grouped.

    `X_0000`, `X_0001`, ... of one folder are the channels of one case only when the model has that many channels and
    the numbers run 0000..C-1; for a one-channel model (or numbers that do not fit) each file is a scan of its own —
    `scan_0001` and `scan_0002` from a series export are two scans, not two channels.
    """
    cases: list[ScanCase] = []
    grouped_any = separate_any = False
    for folder in dict.fromkeys(f.parent for f in files):
        members = [f for f in files if f.parent == folder]
        by_base: dict[str, dict[int, Path]] = {}
        for f in members:
            m = _CHANNEL.match(_stem(f) or f.name)
            if m and channels > 1:
                by_base.setdefault(m.group(1), {})[int(m.group(2))] = f
        for f in members:
            m = _CHANNEL.match(_stem(f) or f.name)
            group = by_base.get(m.group(1)) if m and channels > 1 else None
            if group is not None and sorted(group) == list(range(channels)):
                if f == group[0]:
                    cases.append(ScanCase(m.group(1), [group[c] for c in range(channels)], folder))
                    grouped_any = True
            else:
                cases.append(ScanCase(_stem(f) or f.name, [f], folder))
                separate_any = separate_any or bool(m)
    if grouped_any:
        note = f"numbered files _0000.._{channels - 1:04d} grouped as the {channels} channels of one case"
    elif separate_any:
        note = (f"numbered files (_0000, _0001, ...) taken as separate scans: the model has {channels} channel(s)"
                + ("" if channels == 1 else f" and their numbers do not run _0000.._{channels - 1:04d}"))
    else:
        note = ""
    return cases, note


def _from_folder(folder: Path) -> tuple[list[Path], list[ScanCase]]:
    """Image files in a folder (not our outputs); a folder without any is taken as a DICOM series."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                   and (s := _stem(f)) is not None and not _is_output(s))
    if files:
        return files, []
    return [], [ScanCase(folder.name, [folder], folder.parent)]


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[ScanCase], dict[str, str]]:
    """Files, folders, globs and DICOM folders -> (image files, DICOM folder cases, {input: problem})."""
    files: list[Path] = []
    cases: list[ScanCase] = []
    problems: dict[str, str] = {}
    for item in inputs:
        matches = [Path(item)] if Path(item).exists() else [
            Path(p) for p in sorted(glob.glob(item)) if not _is_output(_stem(Path(p)) or "")]  # skip earlier outputs
        if not matches:
            problems[item] = f"{item}: no such file or folder, and no file matches it as a pattern"
        for path in matches:
            if path.is_dir():
                found, dicom = _from_folder(path)
                files += found
                cases += dicom
            else:
                files.append(path)
    return list(dict.fromkeys(p.resolve() for p in files)), cases, problems


FORMATS = ("nifti", "dicom-seg")
_SUFFIX = {"nifti": ".nii.gz", "dicom-seg": ".dcm"}
CONFIDENCE_CSV = "confidence.csv"


class CaseOutputs(NamedTuple):
    """Where one case's outputs go; None for an output not asked for."""

    label: Path | None
    probabilities: Path | None
    dicom_seg: Path | None = None

    def all(self) -> list[Path]:
        return [p for p in self if p is not None]


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """`--format nifti`, `dicom-seg` or `nifti,dicom-seg` -> the formats, in FORMATS order; anything else: one line."""
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = {item.strip().lower().replace("_", "-") for item in items if item.strip()}
    unknown = sorted(wanted - set(FORMATS))
    if unknown or not wanted:
        raise InputError(f"--format {','.join(items) if not isinstance(text, str) else text}: expected "
                         f"{' or '.join(FORMATS)}, or both separated by a comma (nifti,dicom-seg)")
    return tuple(f for f in FORMATS if f in wanted)


def output_paths(cases: list[ScanCase], output: Path | None, probabilities: bool,
                 formats: Sequence[str] = ("nifti",)) -> dict[str, CaseOutputs]:
    """Case key -> its outputs: beside the scan, in the -o folder, or -o FILE for one case.

    Beside the scan or in a folder: `<case>_seg.nii.gz` and/or `<case>_seg.dcm`. With -o FILE (.nii, .nii.gz or
    .dcm, of a format asked for) the other output takes FILE's base name with its own suffix.
    """
    lower = output.name.lower() if output is not None else ""
    single = output is not None and lower.endswith((".nii", ".nii.gz", ".dcm"))
    if single and len(cases) != 1:
        raise InputError(f"-o {output}: a file name needs exactly one input case, got {len(cases)}; pass a folder")
    if single and ("dicom-seg" if lower.endswith(".dcm") else "nifti") not in formats:
        raise InputError(f"-o {output}: the file name does not fit --format {','.join(formats)}; name it "
                         + " or ".join(f"*{_SUFFIX[f]}" for f in formats))
    paths: dict[str, CaseOutputs] = {}
    for case in cases:
        if single:
            assert output is not None
            base = next(output.name[: -len(s)] for s in (".nii.gz", ".nii", ".dcm") if lower.endswith(s))
            label = output if not lower.endswith(".dcm") else output.with_name(f"{base}.nii.gz")
            seg = output if lower.endswith(".dcm") else output.with_name(f"{base}.dcm")
            prob = output.with_name(f"{base}_probabilities.nii.gz")
        else:
            folder = output if output is not None else case.origin
            label, seg = folder / f"{case.name}_seg.nii.gz", folder / f"{case.name}_seg.dcm"
            prob = folder / f"{case.name}_probabilities.nii.gz"
        paths[case.key] = CaseOutputs(label if "nifti" in formats else None, prob if probabilities else None,
                                      seg if "dicom-seg" in formats else None)
    return paths


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
    files, dicom_cases, failures = expand_inputs(list(inputs))
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
