"""Image I/O that keeps geometry, and dataset discovery."""

from segment.io.dataset import Case, Dataset, check_case, discover
from segment.io.image import (
    Geometry,
    from_canonical,
    read_geometry,
    read_image,
    read_label,
    to_canonical,
    write_image,
    write_label,
)

__all__ = [
    "Case",
    "Dataset",
    "Geometry",
    "check_case",
    "discover",
    "from_canonical",
    "read_geometry",
    "read_image",
    "read_label",
    "to_canonical",
    "write_image",
    "write_label",
]
