"""Label values on disk <-> consecutive class indices for the network.

A dataset may label its classes 0, 1, 3 (a value retired, or a subset of a larger atlas). The network needs classes
0..K-1, so the plan stores the original value of each class index (`Plan.label_values`, None = identity: class i is
value i, as in every plan written before this existed). Labels are encoded when they are loaded for training and
predictions are decoded before they are written, so a prediction holds the dataset's own values (3, not 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from segment.errors import InputError

if TYPE_CHECKING:
    from segment.data.plan import Plan

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def class_values(plan: Plan, classes: int | None = None) -> list[int]:
    """The label value of each class index: `plan.label_values`, or 0..K-1 (K = `classes` or len(plan.labels))."""
    if plan.label_values is not None:
        return [int(v) for v in plan.label_values]
    return list(range(len(plan.labels) if classes is None else int(classes)))


def values_to_classes(labels: dict[int, str]) -> tuple[dict[int, str], list[int] | None]:
    """Declared {value: name} -> ({class index: name}, original value of each class index or None when they agree)."""
    values = sorted(int(v) for v in labels)
    names = {i: labels[v] for i, v in enumerate(values)}
    return names, (None if values == list(range(len(values))) else values)


def _identity(plan: Plan) -> bool:
    return plan.label_values is None or [int(v) for v in plan.label_values] == list(range(len(plan.label_values)))


def _lookup(values: list[int], dtype: type) -> np.ndarray:
    """Table from original value to class index (-1 where no class has that value)."""
    table = np.full(max(values) + 1, -1, dtype=dtype)
    table[np.asarray(values)] = np.arange(len(values))
    return table


def _present(array: np.ndarray | torch.Tensor) -> set[int]:
    flat = array.reshape(-1)
    if isinstance(flat, torch.Tensor):
        return {int(v) for v in torch.unique(flat).tolist()}
    flat = np.asarray(flat)
    if flat.size and flat.dtype.kind in "iub" and 0 <= flat.min() and flat.max() < 2**20:
        return {int(v) for v in np.flatnonzero(np.bincount(flat))}  # linear time, unlike np.unique's sort
    return {int(v) for v in np.unique(flat)}


def encode_labels(array: ArrayT, plan: Plan, source: object = "label map") -> ArrayT:
    """Label map with the dataset's values -> class indices 0..K-1 (identity for plans without `label_values`).

    A value that no class has is a one-line InputError naming `source` (the label file).
    """
    if _identity(plan):
        return array
    values = class_values(plan)
    table = _lookup(values, np.int16 if len(values) < 2**15 else np.int32)
    present = _present(array)
    unknown = sorted(v for v in present if v < 0 or v >= len(table) or table[v] < 0)
    if unknown:
        raise InputError(f"{source}: label value{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} found, "
                         f"but the plan's classes have the values {', '.join(map(str, values))}")
    if isinstance(array, torch.Tensor):
        return torch.from_numpy(table).to(array.device)[array.long()]
    return table[np.asarray(array)]


def decode_labels(array: ArrayT, plan: Plan) -> ArrayT:
    """Class indices 0..K-1 -> the dataset's own label values (identity for plans without `label_values`)."""
    if _identity(plan):
        return array
    values = class_values(plan)
    high = max(values)
    dtype = np.uint8 if high < 2**8 else np.uint16 if high < 2**16 else np.int32
    table = np.asarray(values, dtype=dtype)
    present = _present(array)
    if present and (min(present) < 0 or max(present) >= len(values)):
        raise InputError(f"class index {max(present)} found, but the plan has {len(values)} classes (0..{len(values) - 1})")
    if isinstance(array, torch.Tensor):
        return torch.from_numpy(table.astype(np.int64)).to(array.device)[array.long()]
    return table[np.asarray(array)]
