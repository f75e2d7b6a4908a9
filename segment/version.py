"""segment's version, from one place: the installed package's metadata, else the source tree's own number."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SOURCE_VERSION = "0.1.0"  # the same as pyproject.toml's; used when running from a source tree that was never installed


def segment_version() -> str:
    """What model packages, DICOM-SEG objects and cache keys record as the writer's version."""
    try:
        return version("segment")
    except PackageNotFoundError:
        return SOURCE_VERSION
