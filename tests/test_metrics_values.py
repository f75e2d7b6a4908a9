"""Surface metrics in mm on anisotropic grids, hand-computed: a stray voxel separates HD95 from the maximum Hausdorff
distance; ASSD and NSD count every surface voxel of both masks.

Surfaces (segment.evaluation.metrics): the voxels removed by one erosion. A 4x4x4 cube has 64 - 2^3 = 56 of them; an
isolated voxel is its own surface.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from segment.evaluation.metrics import case_metrics

ONE = {1: "organ"}
SPACING = (2.0, 1.0, 0.5)


def _row(pred: np.ndarray, ref: np.ndarray, spacing=SPACING, **kw) -> dict:
    (row,) = case_metrics(pred, ref, spacing, ONE, **kw)
    return row


def _cube_and_stray() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((16, 12, 14), np.uint8)
    ref[2:6, 2:6, 2:6] = 1  # a 4-cube, corner voxels (2..5)^3
    pred = ref.copy()
    pred[12, 9, 10] = 1  # one stray voxel; nearest reference surface voxel: the corner (5, 5, 5)
    return pred, ref


# stray - corner = (7, 4, 5) voxels = (14, 4, 2.5) mm
D_STRAY = math.sqrt(14.0**2 + 4.0**2 + 2.5**2)  # 14.773 mm
N_REF, N_PRED = 56, 57  # surface voxels: the cube's, and the cube's + the stray


def test_stray_voxel_sets_the_maximum_hausdorff_distance_but_not_hd95() -> None:
    pred, ref = _cube_and_stray()
    # pred -> ref: 56 zeros and the stray's 14.77 mm; ref -> pred: 56 zeros.
    # HD100 = the largest distance; HD95 = the 95th percentile of each direction (57 values: position 0.95 * 56 = 53.2,
    # between two zeros) -> 0.
    assert _row(pred, ref, hd_percentile=100)["hd95"] == pytest.approx(D_STRAY, abs=1e-4)
    assert _row(pred, ref)["hd95"] == pytest.approx(0.0, abs=1e-6)
    # symmetric: the stray in the reference instead gives the same distances
    assert _row(ref, pred, hd_percentile=100)["hd95"] == pytest.approx(D_STRAY, abs=1e-4)


def test_stray_voxel_assd_nsd_and_dice() -> None:
    pred, ref = _cube_and_stray()
    row = _row(pred, ref, nsd_tolerance_mm=1.0)
    # ASSD: every distance of both directions, averaged: D / (57 + 56)
    assert row["assd"] == pytest.approx(D_STRAY / (N_PRED + N_REF), abs=1e-5)
    # NSD(1 mm): all but the stray within tolerance: 112 / 113
    assert row["nsd"] == pytest.approx((N_PRED + N_REF - 1) / (N_PRED + N_REF), abs=1e-6)
    # a tolerance beyond the stray's distance counts it too
    assert _row(pred, ref, nsd_tolerance_mm=15.0)["nsd"] == pytest.approx(1.0)
    assert _row(pred, ref, nsd_tolerance_mm=14.7)["nsd"] == pytest.approx(112 / 113, abs=1e-6)
    # Dice: 2 * 64 / (64 + 65)
    assert row["dice"] == pytest.approx(128 / 129, abs=1e-6)
    assert (row["ref_voxels"], row["pred_voxels"]) == (64, 65)


def test_distance_uses_the_spacing_of_each_axis() -> None:
    """The same voxels on an isotropic 1 mm grid: (7, 4, 5) voxels = sqrt(90) mm."""
    pred, ref = _cube_and_stray()
    assert _row(pred, ref, spacing=(1.0, 1.0, 1.0), hd_percentile=100)["hd95"] == pytest.approx(math.sqrt(90), abs=1e-4)


def test_two_slabs_apart_hand_computed() -> None:
    """Reference: one voxel-thick 3x3 plate at x = 2; prediction: the same plate at x = 5. Spacing (2, 1, 0.5).

    Every voxel of a one-voxel-thick plate is surface (9 each). Each voxel's nearest counterpart is straight across:
    3 voxels * 2 mm = 6 mm, so HD95 = HD = ASSD = 6 mm, NSD(5.9) = 0, NSD(6) = 1, Dice 0.
    """
    ref = np.zeros((8, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[2, 1:4, 1:4] = 1
    pred[5, 1:4, 1:4] = 1
    row = _row(pred, ref, nsd_tolerance_mm=6.0)
    assert row["hd95"] == pytest.approx(6.0, abs=1e-5)
    assert row["assd"] == pytest.approx(6.0, abs=1e-5)
    assert row["nsd"] == pytest.approx(1.0)
    assert row["dice"] == 0.0
    assert _row(pred, ref, nsd_tolerance_mm=5.9)["nsd"] == pytest.approx(0.0)


def test_partial_plate_mixes_distances() -> None:
    """Reference: 3x3 plate at x = 2 (9 voxels); prediction: the same plate plus its copy at x = 4, i.e. 18 voxels.

    pred -> ref: 9 at 0 mm, 9 at 2 * 2 = 4 mm; ref -> pred: 9 at 0 mm. All 27 distances: sum 36 -> ASSD 36 / 27 = 4/3 mm.
    HD100 = 4 mm; HD95 of pred -> ref (18 values, 9 of them 4 mm) = 4 mm. NSD(1 mm) = 18 / 27 = 2/3.
    """
    ref = np.zeros((8, 6, 6), np.uint8)
    ref[2, 1:4, 1:4] = 1
    pred = ref.copy()
    pred[4, 1:4, 1:4] = 1
    row = _row(pred, ref, nsd_tolerance_mm=1.0)
    assert row["hd95"] == pytest.approx(4.0, abs=1e-5)
    assert row["assd"] == pytest.approx(4 / 3, abs=1e-5)
    assert row["nsd"] == pytest.approx(2 / 3, abs=1e-6)
    assert row["dice"] == pytest.approx(2 * 9 / (9 + 18), abs=1e-6)
