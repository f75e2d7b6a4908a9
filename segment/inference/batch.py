"""`segment predict`: expand inputs into cases, name outputs, segment case by case, report every failure at the end.

One bad scan never stops a batch: each case's error is printed as one line and listed in the summary, and the
exit code says whether everything succeeded.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


def _group(files: list[Path]) -> list[ScanCase]:
    """Files -> cases; `X_0000`, `X_0001`... of one folder form one multi-channel case when every file there is named so."""
    by_folder: dict[Path, list[Path]] = {}
    for f in files:
        by_folder.setdefault(f.parent, []).append(f)
    cases: list[ScanCase] = []
    for folder, members in by_folder.items():
        stems = {f: _stem(f) or f.name for f in members}
        channels = all(_CHANNEL.match(s) for s in stems.values())
        grouped: dict[str, list[tuple[int, Path]]] = {}
        for f, s in stems.items():
            m = _CHANNEL.match(s)
            name, channel = (m.group(1), int(m.group(2))) if channels and m else (s, 0)
            grouped.setdefault(name, []).append((channel, f))
        cases += [ScanCase(n, [f for _, f in sorted(g)], folder) for n, g in grouped.items()]
    return cases


def _from_folder(folder: Path) -> tuple[list[Path], list[ScanCase]]:
    """Image files in a folder (not our outputs); a folder without any is taken as a DICOM series."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                   and (s := _stem(f)) is not None and not _is_output(s))
    if files:
        return files, []
    return [], [ScanCase(folder.name, [folder], folder.parent)]


def expand_inputs(inputs: list[str]) -> tuple[list[ScanCase], dict[str, str]]:
    """Files, folders, globs and DICOM folders -> cases, plus {input: problem} for inputs that gave nothing."""
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
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return _group(unique) + cases, problems


def output_paths(cases: list[ScanCase], output: Path | None, probabilities: bool) -> dict[str, tuple[Path, Path | None]]:
    """Case name -> (label file, probability file or None): beside the scan, in the -o folder, or -o FILE for one case."""
    single = output is not None and output.name.lower().endswith((".nii", ".nii.gz"))
    if single and len(cases) != 1:
        raise InputError(f"-o {output}: a file name needs exactly one input case, got {len(cases)}; pass a folder")
    paths: dict[str, tuple[Path, Path | None]] = {}
    for case in cases:
        if single:
            assert output is not None
            seg = output
            base = output.name[: -len(".nii.gz")] if output.name.lower().endswith(".gz") else output.stem
            prob = output.with_name(f"{base}_probabilities.nii.gz")
        else:
            folder = output if output is not None else case.origin
            seg, prob = folder / f"{case.name}_seg.nii.gz", folder / f"{case.name}_probabilities.nii.gz"
        paths[case.key] = (seg, prob if probabilities else None)
    return paths


def _summary(result: dict) -> str:
    volumes = ", ".join(f"{name} {ml:.2f} ml" for name, ml in result["volumes_ml"].items())
    return (f"[green]ok[/] {escape(result['case'])}: {result['seconds']:.2f} s, {result['voxels_per_s']:.3g} voxels/s; "
            f"{escape(volumes) or 'no foreground'} -> {escape(result['output'])}")


def run_predict(inputs: list[str], *, output: Path | None, model: str | Path | None, device: str, tta: bool,
                overlap: float | None, largest_component: bool, save_probabilities: bool, overwrite: bool) -> int:
    """Segment every case; 0 when all succeeded, 1 when any input or case failed (all are listed at the end)."""
    from segment.inference.predictor import Predictor
    from segment.run_folder import resolve_checkpoint

    console = Console(highlight=False, soft_wrap=True)
    cases, failures = expand_inputs(list(inputs))
    if not cases:
        for message in failures.values():
            console.print(f"[red]failed[/] {escape(message)}")
        console.print("nothing to segment")
        return 1
    targets = output_paths(cases, Path(output) if output is not None else None, save_probabilities)
    seen: dict[Path, str] = {}
    for case in cases:
        seg = targets[case.key][0].resolve()
        if seg in seen:
            failures[case.key] = f"{case.images[0]}: output {seg} would also be written by {seen[seg]}"
        seen.setdefault(seg, case.key)
    todo = [c for c in cases if c.key not in failures]
    if todo:
        ckpt = resolve_checkpoint(model)
        predictor = Predictor.from_checkpoint(ckpt, device, overlap=overlap, tta=tta, largest_component=largest_component)
        console.print(f"model {escape(str(ckpt))} on {predictor.device} ({len(todo)} case(s))")
        if tta:
            axes = predictor.plan.tta_axes()
            console.print(f"--tta: mirroring axes {axes} (those the model was trained to mirror)" if axes else
                          "[yellow]--tta: this model was trained without mirroring (data.augment.mirror_axes=[]), "
                          "so there is nothing to mirror; predicting without TTA[/]")
        _run_cases(predictor, todo, targets, overwrite, failures, console)
    for message in failures.values():
        console.print(f"[red]failed[/] {escape(message)}")
    console.print(f"{len(todo) - sum(c.key in failures for c in todo)} of {len(cases)} case(s) segmented"
                  + (f"; {len(failures)} failed" if failures else ""))
    return 1 if failures else 0


def _run_cases(predictor: Predictor, cases: list[ScanCase], targets: dict[str, tuple[Path, Path | None]], overwrite: bool,
               failures: dict[str, str], console: Console) -> None:
    """Predict case by case under one progress bar; an error is recorded and the next case goes on."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("segmenting", total=len(cases))
        for case in cases:
            progress.update(task, description=f"segmenting {escape(case.name)}")
            seg, prob = targets[case.key]
            try:
                result = predictor.predict_file(case.images, seg, overwrite=overwrite, probabilities=prob)
                progress.console.print(_summary(result))
            except SegmentError as err:
                failures[case.key] = str(err)
                progress.console.print(f"[red]error[/] {escape(str(err))}")
            except (RuntimeError, OSError, ValueError, MemoryError) as err:  # e.g. out of memory on a huge scan
                failures[case.key] = f"{case.images[0]}: {type(err).__name__}: {err}"
                progress.console.print(f"[red]error[/] {escape(failures[case.key])}")
            progress.advance(task)
