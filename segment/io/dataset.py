"""Find image/label pairs in a dataset folder and check them before any training starts.

Two layouts are understood: MSD / nnU-Net (`dataset.json`, `imagesTr/`, `labelsTr/`, channels as `_0000`, `_0001`
files or as the volumes of one 4D file per case) and plain folders (`images/` + `labels/`, or `X.nii.gz` beside
`X_seg.nii.gz`). Pairing is by exact case name; anything that does not pair is reported, never guessed, so an image can
never be trained against the wrong label. `discover` reads headers (and, with `check`, label values); the full read of
every voxel before training is `segment.data.check.check_dataset`.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from segment.errors import ConfigError, GeometryError, InputError, SegmentError, few
from segment.io.dataset_json import channel_kinds, declared_labels, declared_modality, listing_note, read_dataset_json
from segment.io.files import broken_link
from segment.io.image import (
    read_channel_geometry,
    read_geometry,
    read_label,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_SUFFIXES = ("_seg", "_labels", "_label", "_mask")
CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net channel files: case_0000, case_0001, ...


@dataclass(frozen=True)
class Case:
    """One training example: its channel images (sorted by channel) and its label map."""

    name: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class Dataset:
    """What `discover` found: usable cases plus everything it had to leave out, with the reason."""

    root: Path
    cases: list[Case]
    labels: dict[int, str]  # label value -> name (values may have gaps: 0, 1, 3); empty when unknown (check=False)
    modality: str
    channels: int
    unpaired: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # kind of each channel as declared in dataset.json ('ct', 'mri', other lower-case text); empty when undeclared
    channel_modalities: list[str] = field(default_factory=list)
    labels_declared: bool = False  # `labels` come from dataset.json, not from the values found in the label maps


def label_values(label: np.ndarray) -> set[int]:
    """The distinct values of a non-negative integer label map (as `read_label` returns it)."""
    return {int(v) for v in np.flatnonzero(np.bincount(np.asarray(label).ravel()))}


def check_label_values(path: str | Path, values: Collection[int], declared: Collection[int] | None) -> None:
    """One-line InputError naming `path` when the label map holds a value that is not declared (None: anything goes)."""
    if declared is None:
        return
    extra = sorted(set(values) - set(declared))
    if not extra:
        return
    keys = sorted(declared)
    if keys == list(range(len(keys))):
        raise InputError(f"{path}: label value {extra[-1]} found, but only {len(keys)} classes (0..{len(keys) - 1}) "
                         "are declared")
    raise InputError(f"{path}: label value{'s' if len(extra) > 1 else ''} {', '.join(map(str, extra))} found, not "
                     f"declared in dataset.json (declared: {', '.join(map(str, keys))})")


def labels_from_values(values: Collection[int]) -> dict[int, str]:
    """Class names for a dataset without declared labels: background plus one `class_<value>` per value found."""
    return {0: "background", **{v: f"class_{v}" for v in sorted(values) if v != 0}}


def _split(path: Path) -> str | None:
    """File stem without the image suffix, or None for files that are not images (hidden files, .raw, .json).

    A broken symbolic link or a folder with an image name keeps its stem, so that its case is reported (`_pair`), not
    dropped."""
    name = path.name
    if name.startswith(".") or not (path.is_file() or path.is_dir() or broken_link(path)):
        return None
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _not_a_file(path: Path) -> str | None:
    """Why an image-named entry cannot be read as an image (a broken link, a folder), else None."""
    if problem := broken_link(path):
        return problem
    return f"{path}: is a folder, not an image file" if path.is_dir() else None


def _scan(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """stem -> file for every image in `folder`; stems present twice (X.nii and X.nii.gz) are returned as clashes."""
    found: dict[str, Path] = {}
    clashes = []
    for path in sorted(folder.iterdir()):
        stem = _split(path)
        if stem is None:
            continue
        if stem in found:
            clashes.append(stem)
        found[stem] = path
    return found, clashes


def _folders(root: Path) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """(image stems, label names, clashing stems) for whichever layout `root` uses."""
    for images, labels in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (root / images).is_dir():
            if not (root / labels).is_dir():
                raise InputError(f"{root / labels}: label folder not found (expected beside {root / images})")
            found_images, clash_i = _scan(root / images)
            found_labels, clash_l = _scan(root / labels)
            return found_images, found_labels, clash_i + clash_l
    found, clashes = _scan(root)
    label_files: dict[str, Path] = {}
    for stem in list(found):
        base = next((stem[: -len(s)] for s in LABEL_SUFFIXES if stem.lower().endswith(s)), None)
        if base:
            label_files[base] = found.pop(stem)
    return found, label_files, clashes


def _group(images: dict[str, Path], labels: dict[str, Path]) -> dict[str, dict[int, Path]]:
    """Case name -> {channel: file}. `_0000` suffixes count as channels only if that pairs at least as well."""
    matches = {stem: CHANNEL_FILE.match(stem) for stem in images}
    as_channels = all(matches.values()) and (
        sum(m.group(1) in labels for m in matches.values() if m) >= sum(s in labels for s in images))
    cases: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        m = matches[stem]
        name, channel = (m.group(1), int(m.group(2))) if as_channels and m else (stem, 0)
        cases.setdefault(name, {})[channel] = path
    return cases


def discover(root: str | Path, *, check: bool = True, on_problem: Literal["error", "skip"] = "skip") -> Dataset:
    """Pair images with labels under `root`, report what does not pair, and (with check) verify every pair."""
    root = Path(root)
    if on_problem not in ("error", "skip"):
        raise ConfigError(f"on_problem={on_problem!r}: expected 'error' or 'skip'")
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    meta = read_dataset_json(root)
    modality, declared = declared_modality(meta)
    images, label_files, clashes = _folders(root)
    grouped = _group(images, label_files)
    counts = Counter(len(c) for c in grouped.values())
    channels = declared or (counts.most_common(1)[0][0] if counts else 1)
    if declared is None and channels == 1 and grouped:  # undeclared: one 4D file per case gives the channel count
        try:
            channels = read_channel_geometry(next(iter(grouped[min(grouped)].values())))[1]
        except SegmentError:
            pass  # that case is reported by the check
    unpaired = sorted([p for n, c in grouped.items() if n not in label_files for p in c.values()]
                      + [p for n, p in label_files.items() if n not in grouped])
    lost = {p.name: problem for p in unpaired if (problem := _not_a_file(p))}  # reported as such, not as unpaired
    unpaired = [p for p in unpaired if p.name not in lost]
    if unpaired:
        names = few([p.name for p in unpaired], 5)
        warnings.warn(f"{root}: {len(unpaired)} files without a partner, left out: {names}", stacklevel=2)
    if note := listing_note(meta, root, [n for n in grouped if n in label_files]):
        warnings.warn(note, stacklevel=2)
    cases, problems = _pair(root, grouped, label_files, clashes, channels)
    problems.update(lost)
    labels = declared_labels(meta, root)
    dataset = Dataset(root, cases, labels, modality, channels, unpaired, {}, channel_kinds(meta), bool(labels))
    _handle(problems, dataset, on_problem)
    if check:
        _check_all(dataset, on_problem)
    if not dataset.cases:
        first = next(iter(dataset.skipped.values()), "")
        detail = f"; {len(dataset.skipped)} skipped, e.g. {first}" if first else ""
        raise InputError(f"{root}: no usable image/label pairs found (expected dataset.json + imagesTr/ + labelsTr/, "
                         f"images/ + labels/, or X.nii.gz beside X_seg.nii.gz){detail}")
    return dataset


def _pair(root: Path, grouped: dict[str, dict[int, Path]], label_files: dict[str, Path], clashes: list[str],
          channels: int) -> tuple[list[Case], dict[str, str]]:
    """Cases whose name has both images and a label; structural problems (clashes, missing channels) by case name."""
    cases, problems = [], {}
    for name in sorted(n for n in grouped if n in label_files):
        by_channel = grouped[name]
        links = [problem for p in (*by_channel.values(), label_files[name]) if (problem := _not_a_file(p))]
        if links:
            problems[name] = f"case {name}: {links[0]}"
        elif name in clashes or any(_split(p) in clashes for p in by_channel.values()):
            problems[name] = f"case {name}: several files with the same name and different suffixes in {root}"
        elif sorted(by_channel) == list(range(channels)):
            cases.append(Case(name, tuple(by_channel[c] for c in range(channels)), label_files[name]))
        elif channels > 1 and list(by_channel) == [0] and (volumes := _volumes(by_channel[0])) == channels:
            cases.append(Case(name, (by_channel[0],), label_files[name]))  # MSD multi-modal: one 4D file
        else:
            single = channels > 1 and list(by_channel) == [0]
            detail = f"; as one 4D file it would need {channels} volumes, it has {volumes}" if single else ""
            problems[name] = (f"case {name}: channels {sorted(by_channel)} found, expected 0..{channels - 1} "
                              f"({[p.name for p in by_channel.values()]}{detail})")
    return cases, problems


def _volumes(path: Path) -> int | str:
    """Channel count of one image file from its header, or why it could not be read."""
    try:
        return read_channel_geometry(path)[1]
    except SegmentError as err:
        return f"an unreadable header: {err}"


def _handle(problems: dict[str, str], dataset: Dataset, on_problem: str) -> None:
    """Raise on the first problem, or move each problem case into `skipped` with a warning."""
    for name, reason in problems.items():
        if on_problem == "error":
            raise InputError(reason)
        dataset.skipped[name] = reason
        dataset.cases = [c for c in dataset.cases if c.name != name]
        warnings.warn(f"skipping {reason}", stacklevel=3)
        log.warning("skipping %s", reason)


def _check_all(dataset: Dataset, on_problem: str) -> None:
    """Check every case; for plain folders without declared labels, infer the classes from the values found."""
    declared = set(dataset.labels) if dataset.labels else None
    problems: dict[str, str] = {}
    found: set[int] = set()
    for case in dataset.cases:
        try:
            found |= _check_case(case, declared, dataset.channels)
        except (InputError, GeometryError) as err:
            if on_problem == "error":
                raise
            problems[case.name] = str(err)
    _handle(problems, dataset, on_problem)
    if not dataset.labels and dataset.cases:
        dataset.labels = labels_from_values(found)


def _check_case(case: Case, declared: Collection[int] | None, channels: int | None = None) -> set[int]:
    """Headers of every file (4D channel files allowed) plus the label's values; returns those values."""
    reference, count = read_channel_geometry(case.images[0])
    for path in case.images[1:]:
        other, n = read_channel_geometry(path)
        if not other.same_grid(reference):
            raise GeometryError(f"channel {path} does not share the voxel grid of {case.images[0]}: "
                                f"{other.difference(reference)}")
        count += n
    if channels is not None and count != channels:
        raise InputError(f"{case.images[0]}: case {case.name} has {count} channel(s) in {len(case.images)} file(s), "
                         f"expected {channels}")
    if case.label is None:
        return set()
    label_geometry = read_geometry(case.label)
    if not label_geometry.same_grid(reference):
        raise GeometryError(f"label {case.label} does not share the voxel grid of image {case.images[0]}: "
                            f"{label_geometry.difference(reference)}")
    values = label_values(read_label(case.label))
    check_label_values(case.label, values, declared)
    return values


def check_case(case: Case, num_classes: int | None, *, values: Collection[int] | None = None,
               channels: int | None = None) -> None:
    """Raise GeometryError/InputError (naming the files) unless the case's images and label share a grid and its
    label values are integers below `num_classes` (or, given `values`, among those declared values)."""
    _check_case(case, values if values is not None else (range(num_classes) if num_classes is not None else None),
                channels)


def discover_quietly(root: str | Path, *, check: bool = True) -> tuple[Dataset, list[str]]:
    """`discover(root, check=check)` with nothing printed: the dataset (bad cases in `dataset.skipped`, with the reason)
    and its other warnings (unpaired files, unreadable headers) as one-line texts, each once, for the caller to print
    (a command lists the skipped cases itself, once, instead of a Python warning plus a log line each)."""
    level = log.level
    log.setLevel(logging.ERROR)  # its "skipping" lines repeat dataset.skipped
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = discover(root, check=check)
    finally:
        log.setLevel(level)
    texts = [str(w.message) for w in caught]
    return dataset, list(dict.fromkeys(t for t in texts if not t.startswith("skipping ")))
