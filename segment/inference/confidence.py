"""A per-case confidence score, the "check this case" flag, and an out-of-distribution check on the raw scan.

Score: 1 - the mean normalised entropy (H / log K) of the predicted class probabilities over the voxels where the
network gives any class but background at least FOREGROUND_FLOOR. That region is the predicted foreground plus the
band around it where the network hesitates; background far from any structure (most of a scan, always near-certain)
is left out, so the score does not depend on the field of view. The probabilities are those the label map comes from:
averaged over TTA mirrorings and over the folds of an ensemble, so disagreement between members lowers the score too.
1 = every voxel of the region certain; 0 = uniform probabilities. Computed at network resolution, slab by slab (see
`segment.engine.stream.predict_canonical_labels`), never on K x (whole scan) floats.

Threshold: chosen on a run's validation cases at training time (`choose_threshold`: the score below which the worst
FLAG_QUANTILE of them lie), stored in the run folder's confidence.json; DEFAULT_THRESHOLD where a run has none.

Out of distribution: `segment.data.profile` (the training scans' profile and `ood_reasons`).
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

FOREGROUND_FLOOR = 0.05  # a voxel counts when 1 - p(background) reaches this
DEFAULT_THRESHOLD = 0.80  # used when a run has no confidence.json (a run trained before k-fold training, or one model)
FLAG_QUANTILE = 0.10  # the threshold flags about this share of the validation cases


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
