"""Metrics against values computed by hand on tiny synthetic masks with anisotropic spacing."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from rich.console import Console

from segment.config import EvaluateConfig
from segment.errors import GeometryError
from segment.evaluation.metrics import METRICS, case_metrics, evaluate_cases, summarize, summary_table, write_csv

ONE = {1: "organ"}


def box(shape: tuple[int, ...], start: tuple[int, ...], size: int, label: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[tuple(slice(s, s + size) for s in start)] = label
    return out


def one(pred: np.ndarray, ref: np.ndarray, spacing, **kw) -> dict:
    rows = case_metrics(pred, ref, spacing, ONE, **kw)
    assert len(rows) == 1
    return rows[0]


def test_three_cube_shifted_one_voxel_matches_hand_count():
    """3x3x3 cube shifted 1 voxel along axis 0, spacing (2,1,1).

    Each surface has 26 voxels. Pred->ref: 16 at 0 mm (8 of the near face + the 8-ring), the near face's centre at
    min(1 mm in-plane, 2 mm along x) = 1 mm, the far face's 9 voxels at 2 mm. Ref->pred is the mirror image.
    So ASSD = 2 * (1 + 9*2) / 52 = 19/26, HD = HD95 = 2 mm, overlap 18 of 27 voxels -> Dice 2/3,
    NSD(0.5 mm) = 32/52, NSD(1.5 mm) = 34/52, NSD(2.5 mm) = 1.
    """
    ref, pred = box((8, 8, 8), (2, 2, 2), 3), box((8, 8, 8), (3, 2, 2), 3)
    row = one(pred, ref, (2.0, 1.0, 1.0), nsd_tolerance_mm=1.5)
    assert row["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert row["hd95"] == pytest.approx(2.0, abs=1e-6)
    assert row["assd"] == pytest.approx(19 / 26, abs=1e-6)
    assert row["nsd"] == pytest.approx(34 / 52, abs=1e-6)
    assert (row["ref_voxels"], row["pred_voxels"]) == (27, 27)
    assert one(pred, ref, (2.0, 1.0, 1.0), nsd_tolerance_mm=0.5)["nsd"] == pytest.approx(32 / 52, abs=1e-6)
    assert one(pred, ref, (2.0, 1.0, 1.0), nsd_tolerance_mm=2.5)["nsd"] == pytest.approx(1.0)
    assert one(pred, ref, (2.0, 1.0, 1.0), hd_percentile=100)["hd95"] == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 2])
def test_cube_shift_gives_hausdorff_equal_to_shift_in_mm(axis: int, shift: int):
    """A 6-cube shifted by k voxels: every surface distance is <= k*s (s = spacing along the shift), and the two end
    faces (72 of 304 distances, > 5%) sit exactly at k*s, so HD100 = HD95 = k*s. Dice = (6-k)/6."""
    spacing = (2.0, 0.8, 1.2)
    start = [4, 4, 4]
    moved = list(start)
    moved[axis] += shift
    ref, pred = box((16, 16, 16), tuple(start), 6), box((16, 16, 16), tuple(moved), 6)
    expected = shift * spacing[axis]
    for pct in (95.0, 100.0):
        assert one(pred, ref, spacing, hd_percentile=pct)["hd95"] == pytest.approx(expected, abs=1e-5)
    row = one(pred, ref, spacing, nsd_tolerance_mm=expected - 0.01)
    assert row["dice"] == pytest.approx((6 - shift) / 6, abs=1e-6)
    assert row["nsd"] < 0.95
    assert one(pred, ref, spacing, nsd_tolerance_mm=expected)["nsd"] == pytest.approx(1.0)


def test_disjoint_two_cubes_have_exact_distances_and_zero_overlap():
    """2-cubes (all voxels on the surface) k=4 voxels apart along axis 0 at 1.5 mm: half of each surface is at
    (k-1)*1.5 mm, half at k*1.5 mm. So ASSD = (k - 0.5)*1.5, HD = k*1.5; NSD 0 below (k-1)*1.5."""
    ref, pred = box((12, 6, 6), (1, 2, 2), 2), box((12, 6, 6), (5, 2, 2), 2)
    row = one(pred, ref, (1.5, 0.7, 0.7), nsd_tolerance_mm=4.4)
    assert row["dice"] == 0.0
    assert row["hd95"] == pytest.approx(6.0, abs=1e-5)
    assert row["assd"] == pytest.approx(5.25, abs=1e-5)
    assert row["nsd"] == 0.0
    assert one(pred, ref, (1.5, 0.7, 0.7), nsd_tolerance_mm=4.5)["nsd"] == pytest.approx(0.5)


def test_two_dimensional_masks_are_supported():
    ref, pred = box((10, 10), (2, 2), 4), box((10, 10), (2, 5), 4)
    row = one(pred, ref, (0.5, 3.0))
    assert row["hd95"] == pytest.approx(9.0, abs=1e-5)
    assert row["dice"] == pytest.approx(0.25)


def test_empty_mask_conventions():
    empty = np.zeros((6, 6, 6), dtype=np.uint8)
    full = box((6, 6, 6), (1, 1, 1), 3)
    both = one(empty, empty, (1, 1, 1))
    assert (both["dice"], both["nsd"], both["hd95"], both["assd"]) == (1.0, 1.0, 0.0, 0.0)
    for pred, ref in ((empty, full), (full, empty)):
        row = one(pred, ref, (1, 1, 1))
        assert (row["dice"], row["nsd"]) == (0.0, 0.0)
        assert math.isnan(row["hd95"]) and math.isnan(row["assd"])
    assert one(empty, full, (1, 1, 1))["ref_voxels"] == 27


def test_multiclass_rows_skip_background_and_keep_classes_apart():
    ref = box((10, 10, 10), (1, 1, 1), 3, label=1) + box((10, 10, 10), (6, 6, 6), 3, label=2)
    pred = box((10, 10, 10), (2, 1, 1), 3, label=1) + box((10, 10, 10), (6, 6, 6), 3, label=2)
    rows = case_metrics(pred, ref, (2.0, 1.0, 1.0), {0: "background", 1: "a", 2: "b"})
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["dice"] == pytest.approx(2 / 3, abs=1e-6) and rows[0]["hd95"] == pytest.approx(2.0)
    assert (rows[1]["dice"], rows[1]["hd95"], rows[1]["assd"], rows[1]["nsd"]) == pytest.approx((1.0, 0.0, 0.0, 1.0))


def test_mismatched_grid_or_spacing_is_a_geometry_error():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(GeometryError, match="same voxel grid"):
        case_metrics(a, np.zeros((4, 4, 5), dtype=np.uint8), (1, 1, 1), ONE)
    with pytest.raises(GeometryError, match="spacing"):
        case_metrics(a, a, (1, 1), ONE)
    with pytest.raises(GeometryError, match="case c7"):
        evaluate_cases([("c7", a, a, (1, -1, 1))], ONE, EvaluateConfig(), progress=False)


def test_evaluate_cases_uses_config_and_names_cases():
    ref, pred = box((8, 8, 8), (2, 2, 2), 3), box((8, 8, 8), (3, 2, 2), 3)
    cfg = EvaluateConfig(nsd_tolerance_mm=2.5, hd_percentile=100)
    rows = evaluate_cases([("c1", pred, ref, (2, 1, 1)), ("c2", ref, ref, (2, 1, 1))], ONE, cfg, progress=False)
    assert [r["case"] for r in rows] == ["c1", "c2"]
    assert rows[0]["nsd"] == pytest.approx(1.0) and rows[1]["dice"] == pytest.approx(1.0)


def _rows() -> list[dict]:
    return [{"case": f"c{i}", "class": 1, "name": "organ", "dice": d, "hd95": h, "assd": 1.0, "nsd": 0.5,
             "ref_voxels": 10, "pred_voxels": 9} for i, (d, h) in enumerate([(0.5, 1.0), (0.7, math.nan), (0.9, 3.0)])]


def test_summarize_counts_missing_values():
    summary = {s["metric"]: s for s in summarize(_rows())}
    assert set(summary) == set(METRICS)
    assert summary["dice"]["mean"] == pytest.approx(0.7) and summary["dice"]["std"] == pytest.approx(0.2)
    assert summary["dice"]["median"] == pytest.approx(0.7) and summary["dice"]["n_missing"] == 0
    assert (summary["hd95"]["n"], summary["hd95"]["n_missing"], summary["hd95"]["mean"]) == (2, 1, pytest.approx(2.0))


def test_write_csv_leaves_missing_cells_empty(tmp_path):
    path = write_csv(_rows(), tmp_path / "sub" / "metrics.csv")
    with path.open() as fh:
        read = list(csv.DictReader(fh))
    assert [r["hd95"] for r in read] == ["1.0", "", "3.0"]
    assert read[0]["case"] == "c0" and list(read[0])[:3] == ["case", "class", "name"]


def test_summary_table_shows_means_and_missing_counts():
    console = Console(record=True, width=200)
    console.print(summary_table(_rows(), title="demo"))
    text = console.export_text()
    assert "organ" in text and "0.700 ± 0.200" in text and "1 missing" in text and "HD95 (mm)" in text
