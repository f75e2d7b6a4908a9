"""The case sets `segment evaluate --split` scores: one home for their names, meanings and the check (light: the CLI
builds its help from it without importing torch)."""

from __future__ import annotations

from segment.errors import InputError

SPLITS: dict[str, str] = {
    "val": "the run's validation cases",
    "train": "its training cases: beside val, the generalisation gap",
    "all": "every labelled case in --data",
}


def check_split(split: str) -> str:
    """`split` if it names a case set, else a one-line error listing them."""
    if split not in SPLITS:
        raise InputError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def split_help() -> str:
    return "cases: " + "; ".join(f"{name} ({meaning})" for name, meaning in SPLITS.items())
