"""User-facing errors: the CLI prints these as one line, without a stack trace."""

from __future__ import annotations

from collections.abc import Sequence


class SegmentError(Exception):
    """A problem with the user's input (a file, a config value, a device) that they can act on.

    The message must name the file or key and say what was expected.
    """


class ConfigError(SegmentError, ValueError):
    """A configuration key or value is wrong."""


class InputError(SegmentError, ValueError):
    """An input file or folder is missing, unreadable, or not what was expected."""


class GeometryError(SegmentError, ValueError):
    """Two images do not share a voxel grid, or an output would not match its source."""


def few(items: Sequence[object], n: int = 3, *, total: bool = False) -> str:
    """The first `n` items of a list for a one-line message, then ", ..." when there are more (with `total`, also
    "(N in all)"), so a message about 500 files stays one line."""
    names = [str(i) for i in items]
    more = "" if len(names) <= n else ", ..." + (f" ({len(names)} in all)" if total else "")
    return ", ".join(names[:n]) + more
