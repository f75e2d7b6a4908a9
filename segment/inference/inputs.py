"""What `segment predict` segments and where each result goes: files, folders, globs and DICOM folders become cases
(numbered `_0000` files are channels only when the model has that many), and every case gets its output paths
(`<case>_seg.nii.gz` / `_seg.dcm` beside the scan, in the -o folder, or -o FILE for one case). Our own earlier outputs
are never taken as scans.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from segment.errors import InputError, few
from segment.io.dataset import CHANNEL_FILE, IMAGE_SUFFIXES
from segment.io.files import broken_link

OUTPUT_TAGS = ("_seg", "_probabilities")  # our own outputs, never treated as scans


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
            m = CHANNEL_FILE.match(_stem(f) or f.name)
            if m and channels > 1:
                by_base.setdefault(m.group(1), {})[int(m.group(2))] = f
        for f in members:
            m = CHANNEL_FILE.match(_stem(f) or f.name)
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


def _from_folder(folder: Path, notes: list[str] | None = None) -> tuple[list[Path], list[ScanCase], dict[str, str]]:
    """Image files in a folder (not our outputs) and its broken links to images; a folder with neither is taken as a
    DICOM series. Subfolders beside image files are not searched: `notes` gets one line naming them."""
    listing = [f for f in folder.iterdir() if not f.name.startswith(".")]
    entries = sorted(f for f in listing if (s := _stem(f)) is not None and not _is_output(s))
    files = [f for f in entries if f.is_file()]
    broken = {str(f): problem for f in entries if (problem := broken_link(f))}
    if files or broken:
        subfolders = sorted(f.name for f in listing if f.is_dir() and f not in entries)
        if subfolders and notes is not None:
            notes.append(f"{folder}: {len(subfolders)} subfolder(s) not searched ({few(subfolders)}); give a "
                         "subfolder as an input of its own to segment what is in it (a DICOM series, more scans)")
        return files, [], broken
    return [], [ScanCase(folder.name, [folder], folder.parent)], {}


def expand_inputs(inputs: list[str],
                  notes: list[str] | None = None) -> tuple[list[Path], list[ScanCase], dict[str, str]]:
    """Files, folders, globs and DICOM folders -> (image files, DICOM folder cases, {input: problem}); `notes` gets
    what the user should know about inputs that are not cases (subfolders not searched)."""
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
                try:
                    found, dicom, broken = _from_folder(path, notes)
                except OSError as err:  # a folder we may not list: its case fails, the other inputs go on
                    problems[str(path)] = f"{path}: cannot read this folder ({err.strerror or type(err).__name__})"
                    continue
                files += found
                cases += dicom
                problems.update(broken)
            elif problem := broken_link(path):
                problems[str(path)] = problem
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
