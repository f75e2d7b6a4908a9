"""Which normalisation each channel gets: CT (clip + dataset z-score) or MR/other (per-image z-score), and why.

Modality (`decide_modalities`): `data.modality` / `--modality` (ct, mri, other) first, else what dataset.json
declares per channel, else detected from the voxels (`detect_ct`). A channel is planned as CT when, over a random
sample of voxels from up to 5 evenly spaced cases (leaving out a case's outside-field-of-view fill: its minimum when
that lies below -1100),
  1. every value is an integer (scanners store HU as integers; a resampled float CT is not detected: use --modality ct),
  2. the 0.5th percentile lies within [-1100, -900]: air (-1000 HU, or -1024 where the scanner clips) is present, and
     nothing but that fill lies far below it (MR phase maps, signed MR offsets fail here),
  3. the 99.5th percentile is at most 3100 (bone and contrast; metal saturates at 3071 on most scanners).
Magnitude MR and PET have no voxel near -1000, z-scored images are not integers. Not required: most voxels below 0
(true for the 3 mm abdominal example, 67%, but not for a CT framed tightly around the body). A CT cropped so tightly
that it holds no air is not detected: use --modality ct. The plan records which rule decided (`modality_source`).
"""

from __future__ import annotations

import numpy as np

from segment.io.case import read_case
from segment.io.dataset import Dataset

HU_AIR, HU_LOW, HU_HIGH = -900.0, -1100.0, 3100.0  # the detection rule in this module's docstring


def detect_ct(dataset: Dataset, channel: int = 0, max_cases: int = 5, voxels: int = 200_000) -> tuple[bool, str]:
    """Whether `channel` holds Hounsfield units (the rule in this module's docstring), and the numbers that decided."""
    rng = np.random.default_rng(0)
    step = max(1, len(dataset.cases) // max_cases)
    samples = []
    for case in dataset.cases[::step][:max_cases]:
        values = read_case(case.images).channels[channel].ravel()
        if values.size > voxels:
            values = values[rng.integers(0, values.size, voxels)]
        low = values.min()
        if low < HU_LOW:  # outside the field of view: one fill value (-2048, -3024, ...) far below air
            values = values[values != low]
        samples.append(values)
    v = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if v.size == 0:
        return False, "no voxels to look at"
    integral = bool(np.all(v == np.round(v)))
    p_lo, p_hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
    stats = f"0.5-99.5% {p_lo:.0f}..{p_hi:.0f}, {'integers' if integral else 'not integers'}"
    if not integral:
        return False, f"not HU ({stats})"
    if not HU_LOW <= p_lo <= HU_AIR:
        return False, f"not HU ({stats}; no air near -1000)" if p_lo > HU_AIR else f"not HU ({stats}; below -1100)"
    if p_hi > HU_HIGH:
        return False, f"not HU ({stats}; above 3100)"
    return True, f"HU range ({stats})"


def decide_modalities(dataset: Dataset, setting: str = "auto") -> tuple[list[str], str]:
    """Normalisation of each channel ('ct', or 'mri'/'other': per-image z-score) and which rule decided it.

    `setting` (data.modality, `--modality`) other than 'auto' applies to every channel; 'auto' follows dataset.json
    per channel (`modality` / `channel_names`), or the dataset's one declared modality; without any declaration each
    channel is tested for Hounsfield units (`detect_ct`).
    """
    if setting != "auto":
        return [setting] * dataset.channels, "--modality"
    declared = dataset.channel_modalities if len(dataset.channel_modalities) == dataset.channels else []
    if declared or dataset.modality != "unknown":
        return ["ct" if kind == "ct" else "mri" for kind in declared or [dataset.modality] * dataset.channels], "dataset.json"
    kinds, reasons = [], []
    for c in range(dataset.channels):
        ct, why = detect_ct(dataset, c)
        kinds.append("ct" if ct else "mri")
        reasons.append(why if dataset.channels == 1 else f"channel {c}: {why}")
    return kinds, "detected: " + "; ".join(reasons)


def channel_modalities(dataset: Dataset, setting: str = "auto") -> list[str]:
    """The kinds of `decide_modalities`, without the reason."""
    return decide_modalities(dataset, setting)[0]
