"""segment: train a 3D U-Net on your own labelled scans and segment new ones in their own geometry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segment.version import segment_version

__version__ = segment_version()

if TYPE_CHECKING:  # pragma: no cover
    from segment.inference.predictor import predict as predict


def __getattr__(name: str) -> Any:
    """Lazy `segment.predict` so importing the package (and `segment --help`) does not load torch."""
    if name == "predict":
        from segment.inference.predictor import predict

        return predict
    raise AttributeError(f"module 'segment' has no attribute {name!r}")
