"""The pre-training check: every image and label of a dataset is read once, in full, before the first step.

`discover` pairs files and looks at headers; this reads the voxels too, through the same reader training uses
(`segment.io.case.read_case`), so everything that would stop a run hours in stops it here instead, one line per case
naming the file: a truncated or unreadable file, NaN/inf intensities, a degenerate or NaN affine, channels or a label
on another voxel grid, a wrong channel count, a non-integer or negative label map, a label value that `dataset.json`
does not declare. By default any problem stops training with the full list; with `skip_bad` the bad cases are left
out and returned (the caller records them, e.g. in the run folder's skipped.json).

Files are read in a thread pool (decompression and numpy release the GIL) sized to the usable CPUs. The voxels are
not kept: preprocessing reads them again when the cache is filled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field

from segment.errors import InputError, SegmentError
from segment.io.case import read_case
from segment.io.geometry import require_volume
from segment.io.dataset import (
    Case,
    Dataset,
    check_label_values,
    label_values,
    labels_from_values,
)


@dataclass
class CheckReport:
    """What `check_dataset` found: cases read, problems by case name (one line each), label values present."""

    checked: int
    problems: dict[str, str] = field(default_factory=dict)
    values: set[int] = field(default_factory=set)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # not fatal, for the user to read (a declared class never found)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under a scheduler), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_case_data(case: Case, channels: int | None, declared: set[int] | None) -> tuple[set[int], list[str]]:
    """Read one case in full (every channel, the label): its label values and notes (a blank channel), or a
    SegmentError naming the file. A single slice is an error, as `segment predict` refuses one."""
    data = read_case(case.images, case.label, expected_channels=channels)
    require_volume(data.geometry)
    notes = []
    for i, channel in enumerate(data.channels):
        low, high = float(channel.min()), float(channel.max())
        if low == high:
            which = f" channel {i}" if len(data.channels) > 1 else ""
            path = case.images[min(i, len(case.images) - 1)]
            notes.append(f"{path}{which}: every voxel is {low:g} (a blank export?): the network learns nothing from "
                         "it; check the file, or leave the case out")
    if data.label is None:
        return set(), notes
    values = label_values(data.label)
    check_label_values(case.label, values, declared)
    return values, notes


def describe(case: Case, err: BaseException) -> str:
    """One line naming the file and the problem (our own errors already name the file)."""
    if isinstance(err, SegmentError):
        text = str(err)
    else:  # an unexpected failure of a reader: name every file of the case
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        files = ", ".join(str(p) for p in (*case.images, *([case.label] if case.label else [])))
        text = f"{files}: could not be read ({type(err).__name__}{': ' + detail if detail else ''})"
    return " ".join(text.split())


def problem_list(problems: dict[str, str], total: int) -> str:
    """The message that stops training: one summary line, then one line per case."""
    head = (f"{len(problems)} of {total} cases have problems; fix or remove them, or train on the other "
            f"{total - len(problems)} with --skip-bad (data.skip_bad: true):")
    return "\n".join([head, *(f"  {reason}" for _, reason in sorted(problems.items()))])


@contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None]]:
    if not show or total == 0:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("checking dataset"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("check", total=total)
        yield lambda: progress.advance(task)


def check_dataset(dataset: Dataset, workers: int | None = None, *, skip_bad: bool = False,
                  progress: bool = True) -> CheckReport:
    """Read every case of `dataset` in full, in parallel; stop with the list of problems or (`skip_bad`) drop them.

    Problems `discover` already found (a missing channel, a name clash: `dataset.skipped`) are part of the list.
    Without `skip_bad` any problem raises one InputError listing every one of them, one line each. With it, the bad
    cases leave `dataset.cases` and `dataset.skipped` maps each one to its reason. A dataset without declared labels
    gets them from the values found (background + class_<value>); declared labels are enforced.
    """
    start = time.perf_counter()
    cases = list(dataset.cases)
    declared = set(dataset.labels) if dataset.labels else None
    report = CheckReport(checked=len(cases), problems=dict(dataset.skipped))
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers or usable_cpus(), len(cases) or 1)),
                              thread_name_prefix="check")
    try:
        with _progress(progress, len(cases)) as advance:
            futures: dict[Future[tuple[set[int], list[str]]], Case] = {
                pool.submit(check_case_data, case, dataset.channels, declared): case for case in cases}
            for future in as_completed(futures):
                case = futures[future]
                try:
                    values, notes = future.result()
                    report.values |= values
                    report.notes += notes
                except Exception as err:  # noqa: BLE001 - every failure of one case is one line of the list
                    report.problems[case.name] = describe(case, err)
                advance()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report.seconds = time.perf_counter() - start
    report.notes.sort()  # the cases finish in any order
    total = len(cases) + len(dataset.skipped)
    if report.problems and not skip_bad:
        raise InputError(problem_list(report.problems, total))
    dataset.skipped = dict(sorted(report.problems.items()))
    dataset.cases = [c for c in cases if c.name not in report.problems]
    if not dataset.labels:
        dataset.labels = labels_from_values(report.values)
    if not dataset.cases:
        raise InputError(f"{dataset.root}: none of the {total} cases passed the check; "
                         + problem_list(report.problems, total))
    if not report.values - {0}:
        raise InputError(f"{dataset.root}: every label map is all background (0) in all {len(dataset.cases)} cases: "
                         "nothing to learn; are these the right label files?")
    for value in sorted((declared or set()) - report.values - {0}):
        report.notes.append(f"label {value} ({dataset.labels.get(value, '?')}) is declared in dataset.json but "
                            "found in no case: the model cannot learn to predict it")
    return report
