"""What happens to a label map after the network: the largest connected component per class, volumes in ml."""

from __future__ import annotations

import numpy as np

from segment.io.geometry import Geometry


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per class, keep only the largest 26-connected component; the rest becomes background.

    Hand-written on scipy rather than MONAI's KeepLargestConnectedComponent: that one needs scikit-image or cuCIM for
    its labelling, and works on one-hot or whole-volume masks; here each class is labelled inside its own bounding box
    (`find_objects`), so 100+ classes on a 512x512xN CT cost about one pass over the volume, not one per class.
    """
    from scipy import ndimage

    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for value, box in enumerate(ndimage.find_objects(labels.astype(np.int32, copy=False)), start=1):
        if box is None:
            continue
        components, n = ndimage.label(labels[box] == value, structure=structure)
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            region = out[box]
            region[(components > 0) & (components != int(sizes.argmax()))] = 0
    return out


def label_volumes(labels: np.ndarray, geometry: Geometry, names: dict[int, str]) -> dict[str, float]:
    """Volume in millilitres of every foreground class."""
    voxel_ml = geometry.voxel_volume_mm3 / 1000.0  # |det|: right for oblique and sheared grids
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(names))
    return {names.get(i, f"class_{i}"): float(counts[i]) * voxel_ml for i in range(1, len(counts))}
