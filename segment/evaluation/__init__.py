"""Evaluation: per-case metrics (MONAI, in mm), paired bootstrap statistics and the report (figures: `segment.figures`).

Names are imported lazily so `import segment.evaluation` does not pull in torch, MONAI or matplotlib until used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METRICS": "metrics", "case_metrics": "metrics", "evaluate_cases": "metrics", "write_csv": "metrics",
    "summarize": "metrics", "summary_table": "metrics",
    "paired_bootstrap": "stats", "paired_arrays": "stats", "compare": "stats",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'segment.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"segment.evaluation.{_EXPORTS[name]}"), name)
