"""A per-case confidence score, the "check this case" flag, and an out-of-distribution check on the raw scan.

Score: 1 - the mean normalised entropy (H / log K) of the predicted class probabilities over the voxels where the
network gives any class but background at least FOREGROUND_FLOOR. That region is the predicted foreground plus the
band around it where the network hesitates; background far from any structure (most of a scan, always near-certain)
is left out, so the score does not depend on the field of view. The probabilities are those the label map comes from:
averaged over TTA mirrorings and over the folds of an ensemble, so disagreement between members lowers the score too.
1 = every voxel of the region certain; 0 = uniform probabilities. Computed at network resolution, slab by slab (see
`segment.inference.ensemble`), never on K x (whole scan) floats.

Threshold: chosen on a run's validation cases at training time (`choose_threshold`: the score below which the worst
FLAG_QUANTILE of them lie), stored in the run folder's confidence.json; DEFAULT_THRESHOLD where a run has none.

Out of distribution: the raw intensity percentiles, spacing and extent of the training scans are kept in the run
folder (scan_profile.json); a scan whose intensity percentiles lie far outside the training range (CT Hounsfield
units given to an MR model) or whose spacing/extent is far from every training scan is flagged, whatever its score.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segment.io.files import replaced_atomically
from segment.io.geometry import Geometry

FOREGROUND_FLOOR = 0.05  # a voxel counts when 1 - p(background) reaches this
DEFAULT_THRESHOLD = 0.80  # used when a run has no confidence.json (a run trained before k-fold training, or one model)
FLAG_QUANTILE = 0.10  # the threshold flags about this share of the validation cases
PERCENTILES = (1.0, 50.0, 99.0)
PROFILE_CASES = 20
# a scan is out of distribution when a raw intensity percentile lies more than INTENSITY_MARGIN training ranges
# (max - min of that percentile over the training scans, at least 1% of the overall intensity span) outside them,
# or when its spacing or extent is more than SIZE_FACTOR times larger or smaller than every training scan's
INTENSITY_MARGIN = 1.0
SIZE_FACTOR = 3.0


class ConfidenceStats:
    """Accumulates the entropy sum and voxel count of the scored region over slabs of probabilities (K, *slab)."""

    def __init__(self) -> None:
        self.entropy, self.voxels, self.total = 0.0, 0, 0

    def add(self, probs: torch.Tensor) -> None:
        k = probs.shape[0]
        p = probs.float()
        region = (1 - p[0]) >= FOREGROUND_FLOOR
        self.total += int(region.numel())
        n = int(region.sum())
        if n == 0 or k < 2:
            return
        q = p[:, region].clamp_min(1e-12)
        h = -(q * q.log()).sum(0) / math.log(k)
        self.entropy += float(h.sum())
        self.voxels += n

    def score(self) -> float:
        """1 - mean normalised entropy over the region; 1.0 when no voxel is anywhere near foreground."""
        return 1.0 if self.voxels == 0 else float(1.0 - self.entropy / self.voxels)


def score_probabilities(probs: torch.Tensor | np.ndarray) -> float:
    """The confidence score of a whole (K, *spatial) probability array (tests, benchmarks)."""
    stats = ConfidenceStats()
    stats.add(torch.as_tensor(np.asarray(probs, dtype=np.float32)))
    return stats.score()


def choose_threshold(scores: Sequence[float], quantile: float = FLAG_QUANTILE) -> float | None:
    """The score at the `quantile` of the validation cases (None without any): cases below it are flagged."""
    values = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
    return float(np.quantile(values, quantile)) if values else None


# ---- scan profile and out-of-distribution check -------------------------------------------------------------------
def scan_statistics(channels: Sequence[np.ndarray], geometry: Geometry) -> dict[str, Any]:
    """Raw intensity percentiles (first channel; a 200k-voxel sample), spacing and extent (mm) of one scan."""
    values = np.asarray(channels[0], dtype=np.float32).ravel()
    if values.size > 200_000:
        values = values[:: values.size // 200_000]
    spacing = [float(s) for s in geometry.spacing]
    return {"percentiles": [float(np.percentile(values, q)) for q in PERCENTILES], "spacing": spacing,
            "extent_mm": [float(n) * s for n, s in zip(geometry.shape, spacing)]}


def scan_profile(scans: Sequence[tuple[Sequence[np.ndarray], Geometry]]) -> dict[str, Any]:
    """What the training scans look like: min and max over the scans of each statistic (scan_profile.json)."""
    stats = [scan_statistics(c, g) for c, g in scans]
    out: dict[str, Any] = {"cases": len(stats), "percentiles_q": list(PERCENTILES)}
    for key in ("percentiles", "spacing", "extent_mm"):
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
    for name, value, a, b in (("spacing", stats["spacing"], smin, smax), ("extent", stats["extent_mm"], emin, emax)):
        v = np.array(value)
        if v.shape == a.shape and (np.any(v * SIZE_FACTOR < a) or np.any(v > b * SIZE_FACTOR)):
            reasons.append(f"{name} {_fmt(v)} mm far from the training scans' {_fmt(a)} to {_fmt(b)} mm")
    return reasons


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


# ---- the CSV --------------------------------------------------------------------------------------------------
CSV_FIELDS = ("case", "confidence", "threshold", "flag", "out_of_distribution", "output")


def flag_text(result: dict[str, Any]) -> str:
    """"check this case" (and why) for a low score or an unusual scan, else ""."""
    reasons = []
    if result.get("confidence") is not None and result.get("threshold") is not None \
            and result["confidence"] < result["threshold"]:
        reasons.append(f"confidence {result['confidence']:.3f} below {result['threshold']:.3f}")
    reasons += result.get("ood", [])
    return f"check this case: {'; '.join(reasons)}" if reasons else ""


def write_confidence_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """One row per segmented case, written through a temporary file and renamed (never half a CSV)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, suffix=".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({"case": r["case"], "confidence": f"{r['confidence']:.4f}",
                             "threshold": "" if r.get("threshold") is None else f"{r['threshold']:.4f}",
                             "flag": flag_text(r), "out_of_distribution": "; ".join(r.get("ood", [])),
                             "output": r.get("output", "")})
    return path
