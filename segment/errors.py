"""User-facing errors: the CLI prints these as one line, without a stack trace."""

from __future__ import annotations


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
