"""The scan profile of a training set, and the out-of-distribution check of a scan against it.

The raw intensity percentiles, spacing and extent of the training scans are kept in the run folder
(scan_profile.json, written at training); `segment predict` flags a scan whose intensity percentiles lie far outside
the training range (CT Hounsfield units given to an MR model) or whose spacing/extent is far from every training scan,
whatever its confidence score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segment.io.geometry import Geometry

PERCENTILES = (1.0, 50.0, 99.0)
PROFILE_CASES = 20
# a scan is out of distribution when a raw intensity percentile lies more than INTENSITY_MARGIN training ranges
# (max - min of that percentile over the training scans, at least 1% of the overall intensity span) outside them,
# or when its spacing or extent is more than SIZE_FACTOR times larger or smaller than every training scan's
INTENSITY_MARGIN = 1.0
SIZE_FACTOR = 3.0
# The shape of the intensity distribution, free of the scale: percentiles of the z-scored scan ((x - mean) / std).
# MR intensities have no unit (MSD hippocampus: median 55 to 260,000 between cases), so raw percentiles hardly constrain
# an MR model; the z-scored ones do (hippocampus crops: median -0.06 to 0.15, a CT -> 0.58, a whole-head MR -> -0.44).
# A scan is out of distribution when one lies more than INTENSITY_MARGIN training ranges (at least SHAPE_FLOOR) outside.
SHAPE_FLOOR = 0.1


def scan_statistics(channels: Sequence[np.ndarray], geometry: Geometry) -> dict[str, Any]:
    """Raw and z-scored intensity percentiles (first channel; a 200k-voxel sample), spacing and extent (mm) of one
    scan."""
    values = np.asarray(channels[0], dtype=np.float32).ravel()
    if values.size > 200_000:
        values = values[:: values.size // 200_000]
    spacing = [float(s) for s in geometry.spacing]
    # in float64: the float32 squares inside std() overflow for intensities past ~1e19 (a numpy warning, an inf std)
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    z = ((values - mean) / max(std, 1e-6)).astype(np.float32)
    return {"percentiles": [float(np.percentile(values, q)) for q in PERCENTILES],
            "shape": [float(np.percentile(z, q)) for q in PERCENTILES], "spacing": spacing,
            "extent_mm": [float(n) * s for n, s in zip(geometry.shape, spacing)]}


def scan_profile(scans: Sequence[tuple[Sequence[np.ndarray], Geometry]]) -> dict[str, Any]:
    """What the training scans look like: min and max over the scans of each statistic (scan_profile.json)."""
    return profile_of([scan_statistics(c, g) for c, g in scans])


def profile_of(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`scan_profile` from the `scan_statistics` of each scan (the fingerprint gathers them while it reads cases)."""
    out: dict[str, Any] = {"cases": len(stats), "percentiles_q": list(PERCENTILES)}
    for key in ("percentiles", "shape", "spacing", "extent_mm"):
        arr = np.array([s[key] for s in stats], dtype=np.float64)
        out[key] = {"min": arr.min(0).tolist(), "max": arr.max(0).tolist()}
    return out


def dataset_profile(dataset: Any, max_cases: int = PROFILE_CASES) -> dict[str, Any]:
    """`scan_profile` of up to `max_cases` scans of a dataset (`segment.io.dataset.Dataset`), spread over it."""
    from segment.io.case import read_case

    cases = dataset.cases[:: max(1, len(dataset.cases) // max_cases)][:max_cases]
    scans = []
    for case in cases:
        data = read_case(case.images)
        scans.append((data.channels, data.geometry))
    return scan_profile(scans)


def ood_reasons(profile: dict[str, Any] | None, channels: Sequence[np.ndarray], geometry: Geometry) -> list[str]:
    """Why this scan is unlike the training scans (empty when it is like them, or when there is no profile)."""
    if not profile:
        return []
    try:
        lo, hi = np.array(profile["percentiles"]["min"]), np.array(profile["percentiles"]["max"])
        smin, smax = np.array(profile["spacing"]["min"]), np.array(profile["spacing"]["max"])
        emin, emax = np.array(profile["extent_mm"]["min"]), np.array(profile["extent_mm"]["max"])
    except (KeyError, TypeError, ValueError):
        return []
    stats = scan_statistics(channels, geometry)
    reasons = []
    p = np.array(stats["percentiles"])
    margin = INTENSITY_MARGIN * np.maximum(hi - lo, 0.01 * max(float(hi.max() - lo.min()), 1e-6))
    if p.shape == lo.shape and (np.any(p < lo - margin) or np.any(p > hi + margin)):
        reasons.append(f"intensities unlike the training scans (percentiles {_fmt(p)}, training {_fmt(lo)} to "
                       f"{_fmt(hi)}; another modality or scanner?)")
    if isinstance(profile.get("shape"), dict):  # profiles written before this statistic existed have none
        zlo, zhi = np.array(profile["shape"]["min"]), np.array(profile["shape"]["max"])
        z = np.array(stats["shape"])
        zmargin = INTENSITY_MARGIN * np.maximum(zhi - zlo, SHAPE_FLOOR)
        if z.shape == zlo.shape and (np.any(z < zlo - zmargin) or np.any(z > zhi + zmargin)):
            reasons.append(f"intensity distribution unlike the training scans (z-scored percentiles {_fmt(z)}, training "
                           f"{_fmt(zlo)} to {_fmt(zhi)}; another modality, body part or field of view?)")
    for name, value, a, b in (("spacing", stats["spacing"], smin, smax), ("extent", stats["extent_mm"], emin, emax)):
        v = np.array(value)
        if v.shape == a.shape and (np.any(v * SIZE_FACTOR < a) or np.any(v > b * SIZE_FACTOR)):
            reasons.append(f"{name} {_fmt(v)} mm far from the training scans' {_fmt(a)} to {_fmt(b)} mm")
    return reasons


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


# ---- the CSV --------------------------------------------------------------------------------------------------
