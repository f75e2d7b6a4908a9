"""Paired bootstrap, figures and the ablation report renderer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from segment.errors import InputError
from segment.figures import (boundary_error_profile, plot_boundary_error, plot_contours, plot_gradient_norms,
                                        plot_training_curves, pool_profiles)
from segment.evaluation.report import write_report
from segment.evaluation.stats import paired_arrays, paired_bootstrap, per_case_values


# ---------------------------------------------------------------- statistics
def test_constant_shift_gives_zero_width_interval_at_the_shift():
    a = np.linspace(0.2, 0.9, 15)
    res = paired_bootstrap(a, a + 0.25, n=500, seed=3)
    assert res["mean"] == pytest.approx(0.25) and res["lo"] == pytest.approx(0.25) and res["hi"] == pytest.approx(0.25)
    assert (res["n"], res["n_dropped"]) == (15, 0)


def test_noisy_differences_give_an_interval_around_the_truth():
    rng = np.random.default_rng(1)
    a = rng.normal(5.0, 2.0, 200)
    b = a + 0.5 + rng.normal(0.0, 1.0, 200)
    res = paired_bootstrap(a, b, n=2000, seed=0)
    assert res["lo"] < 0.5 < res["hi"]
    assert 0.1 < res["hi"] - res["lo"] < 0.5  # about 2 * 1.96 / sqrt(200) = 0.28 wide
    assert paired_bootstrap(a, b, n=2000, seed=0) == res  # seeded: reproducible
    narrow = paired_bootstrap(a, b, n=2000, seed=0, ci=0.5)
    assert res["lo"] < narrow["lo"] < narrow["hi"] < res["hi"]


def test_nan_pairs_are_dropped_and_counted():
    res = paired_bootstrap(np.array([1.0, math.nan, 2.0, 3.0]), np.array([2.0, 5.0, math.nan, 4.0]), n=100)
    assert (res["n"], res["n_dropped"], res["mean"]) == (2, 2, pytest.approx(1.0))
    empty = paired_bootstrap(np.array([math.nan]), np.array([1.0]), n=100)
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    with pytest.raises(InputError, match="each case needs a value"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def _rows(case_hd: dict[str, float], dice: float = 0.8, names: tuple[str, ...] = ("organ",)) -> list[dict]:
    return [{"case": c, "class": i + 1, "name": n, "dice": dice, "hd95": hd + i, "assd": hd / 3, "nsd": 0.9,
             "ref_voxels": 5, "pred_voxels": 5} for c, hd in case_hd.items() for i, n in enumerate(names)]


def test_paired_arrays_align_by_case_id_and_all_is_the_class_mean():
    a = _rows({"c1": 1.0, "c2": 2.0, "c3": 3.0}, names=("x", "y"))
    b = _rows({"c3": 6.0, "c1": 4.0}, names=("x", "y"))
    va, vb, cases = paired_arrays(a, b, "hd95")
    assert cases == ["c1", "c3"]
    np.testing.assert_allclose(va, [1.5, 3.5])
    np.testing.assert_allclose(vb, [4.5, 6.5])
    assert per_case_values(a, "hd95", "y") == {"c1": 2.0, "c2": 3.0, "c3": 4.0}


# ---------------------------------------------------------------- figures
def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 5_000
    h, w = mpimg.imread(path).shape[:2]
    return w, h


def _sphere(shape: tuple[int, int, int], centre: tuple[float, ...], r: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r).astype(np.uint8)


def test_plot_contours_writes_a_png_of_the_expected_size(tmp_path):
    ref = _sphere((40, 40, 20), (20, 20, 10), 7)
    image = ref * 100.0 + np.random.default_rng(0).normal(0, 10, ref.shape)
    preds = {"skip": _sphere((40, 40, 20), (21, 20, 10), 7), "noskip": _sphere((40, 40, 20), (20, 22, 10), 6)}
    out = plot_contours(image, ref, preds, tmp_path / "c.png", n_slices=3, title="demo", spacing=(1.0, 1.0, 2.0))
    assert 900 <= _png_size(out)[0] <= 1000 and 330 <= _png_size(out)[1] <= 380  # 3 panels of 3.2 x 3.6 in at 100 dpi
    two = plot_contours(image, ref, preds, tmp_path / "c2.png", n_slices=2, zoom=False)
    assert 600 <= _png_size(two)[0] <= 680


def test_boundary_error_profile_separates_inside_and_outside_errors():
    ref = _sphere((30, 30, 30), (15, 15, 15), 6)
    missed = boundary_error_profile(np.zeros_like(ref), ref, (1.0, 1.0, 2.0), max_mm=4, bins=8)
    centres = (missed["edges"][:-1] + missed["edges"][1:]) / 2
    has = missed["counts"] > 0
    inside, outside = (centres < 0) & has, (centres > 0) & has
    assert inside.sum() >= 3 and outside.sum() >= 3
    np.testing.assert_allclose(missed["rate"][inside], 1.0)
    np.testing.assert_allclose(missed["rate"][outside], 0.0)
    grown = boundary_error_profile(np.ones_like(ref), ref, (1.0, 1.0, 2.0), max_mm=4, bins=8)
    np.testing.assert_allclose(grown["rate"][outside], 1.0)
    assert np.all(grown["errors"][inside] == 0)
    perfect = boundary_error_profile(ref, ref, (1.0, 1.0, 2.0), signed=False)
    assert perfect["counts"].sum() > 0 and perfect["errors"].sum() == 0
    pooled = pool_profiles([missed, grown])
    np.testing.assert_allclose(pooled["counts"], missed["counts"] + grown["counts"])
    np.testing.assert_allclose(pooled["rate"][outside], 0.5)


def test_boundary_error_profile_matches_a_hand_count():
    """A 4-cube grown by one face layer, 1 mm voxels. Outside voxels 1 mm (6*16 face neighbours) and sqrt(2) mm
    (12*4 edge neighbours) from the cube fall in the bin [0, 1) mm after the half-voxel shift; the 16 added voxels
    are the only errors, so the rate there is 16 / 144; every other bin has no error."""
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[4:8, 4:8, 4:8] = 1
    pred = ref.copy()
    pred[8, 4:8, 4:8] = 1
    prof = boundary_error_profile(pred, ref, (1.0, 1.0, 1.0), max_mm=3, bins=6)
    np.testing.assert_allclose(prof["edges"], np.arange(-3, 4))
    assert (prof["counts"][3], prof["errors"][3]) == (144, 16)
    assert prof["rate"][3] == pytest.approx(1 / 9)
    assert prof["errors"].sum() == 16


def test_boundary_error_plot_training_curves_and_gradient_norms(tmp_path):
    ref = _sphere((24, 24, 12), (12, 12, 6), 5)
    profs = {"skip": boundary_error_profile(ref, ref, (1, 1, 1)),
             "noskip": boundary_error_profile(_sphere((24, 24, 12), (13, 12, 6), 5), ref, (1, 1, 1))}
    assert 600 <= _png_size(plot_boundary_error(profs, tmp_path / "b.png"))[0] <= 680
    good = tmp_path / "a.csv"
    good.write_text("epoch,step,train_loss_step,val_dice,val_dice_organ\n0,9,0.9,,\n0,19,0.7,0.4,0.41\n"
                    "1,29,0.5,,\n1,39,nan,0.6,0.62\n")
    no_dice = tmp_path / "b.csv"
    no_dice.write_text("epoch,step,train_loss\n0,0,1.0\n0,1,0.8\n")
    assert 950 <= _png_size(plot_training_curves({"skip": good, "noskip": no_dice}, tmp_path / "t.png"))[0] <= 1050
    with pytest.raises(InputError, match="missing.csv"):
        plot_training_curves({"x": tmp_path / "missing.csv"}, tmp_path / "t2.png")
    norms = {"skip": [0.5, 0.2, 0.1, 0.05], "noskip": [0.01, 0.02, 0.2, 0.4]}
    assert 600 <= _png_size(plot_gradient_norms(norms, tmp_path / "g.png"))[0] <= 680


# ---------------------------------------------------------------- report
def _variant(hd_offset: float, dice: float, seed: int, n: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = 3.0 + 0.5 * i
        for cls, name in ((1, "anterior"), (2, "posterior")):
            hd = base + hd_offset + rng.normal(0, 0.2)
            rows.append({"case": f"case_{i:02d}", "class": cls, "name": name, "dice": dice + rng.normal(0, 0.01),
                         "hd95": hd, "assd": hd / 4, "nsd": 0.9 - hd_offset / 10 + rng.normal(0, 0.01),
                         "ref_voxels": 100, "pred_voxels": 100})
    return rows


META = {"data": "synthetic", "cases": 12, "budget": "5 epochs", "seed": 7, "machine": "test runner"}


def _report(tmp_path: Path, variants: dict, name: str) -> str:
    figs_dir = tmp_path / name / "figures"
    figs_dir.mkdir(parents=True)
    figs = {"Contours": figs_dir / "contours.png", "Boundary error": figs_dir / "boundary.png"}
    for f in figs.values():
        f.write_bytes(b"png")
    md = write_report(tmp_path / name, variants=variants, meta=META, figures=figs,
                      grad_norms={"skip": [1.0, 0.5], "noskip": [0.1, 0.4]}, bootstrap=500)
    return md.read_text()


def _finding(text: str) -> str:
    return text.split("## Finding", 1)[1].split("##", 1)[0]


def test_report_contains_variants_metrics_intervals_and_figures(tmp_path):
    text = _report(tmp_path, {"skip": _variant(0.0, 0.85, 1), "noskip": _variant(2.0, 0.80, 2)}, "r")
    for word in ("`skip`", "`noskip`", "Dice", "HD95", "ASSD", "NSD", "anterior", "posterior", "all",
                 "synthetic", "5 epochs", "test runner", "depth 1"):
        assert word in text
    intervals = re.findall(r"([+-]\d+\.\d+) to ([+-]\d+\.\d+)", text)
    assert len(intervals) >= 12  # 4 metrics x (all + 2 classes)
    hd_all = re.search(r"\| noskip − skip \| all \| HD95 \| ([+-][\d.]+) mm \| ([+-][\d.]+) to ([+-][\d.]+) mm", text)
    assert hd_all and 1.8 < float(hd_all.group(1)) < 2.2 and float(hd_all.group(2)) > 0  # +2 mm, excludes 0
    assert "![Contours](figures/contours.png)" in text and "(figures/boundary.png)" in text
    html = (tmp_path / "r" / "report.html").read_text()
    assert '<img src="figures/contours.png"' in html and "<code>noskip</code>" in html
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {c["verdict"] for c in data["comparisons"] if c["metric"] == "hd95"} == {"worse"}
    finding = _finding(text)
    assert "`noskip` is worse than `skip`" in finding and "exclude 0" in finding and "HD95 +" in finding


def test_finding_follows_the_numbers_not_the_names(tmp_path):
    worse = _finding(_report(tmp_path, {"skip": _variant(0.0, 0.85, 1), "noskip": _variant(2.0, 0.80, 2)}, "a"))
    better = _finding(_report(tmp_path, {"skip": _variant(2.0, 0.80, 1), "noskip": _variant(0.0, 0.85, 2)}, "b"))
    assert worse != better
    assert "is worse" in worse and "not worse / inconclusive" not in worse
    assert "not worse / inconclusive on this data" in better and "is worse" not in better
    assert "better" in better
    same = _finding(_report(tmp_path, {"skip": _variant(0.0, 0.85, 1), "noskip": _variant(0.0, 0.85, 2)}, "c"))
    assert "not worse / inconclusive on this data" in same and "inconclusive" in same.split("Overlap:")[0]


def test_report_counts_missing_distances_and_rejects_empty_variants(tmp_path):
    noskip = _variant(2.0, 0.8, 2)
    noskip[0]["hd95"] = math.nan  # case_00 anterior missing
    text = _report(tmp_path, {"skip": _variant(0.0, 0.85, 1), "noskip": noskip}, "m")
    assert "(1 missing)" in text
    assert re.search(r"\| noskip − skip \| all \| HD95 \|[^\n]*\| 11 \| 1 \|", text)
    with pytest.raises(InputError, match="every variant needs evaluation rows"):
        write_report(tmp_path / "x", variants={"skip": _variant(0, 0.8, 1), "noskip": []}, meta={}, figures={})


def test_report_with_seeds_shows_seed_noise_and_names_the_level(tmp_path):
    from segment.evaluation.seed_noise import average_seeds

    seed_rows = {"skips-all": {0: _variant(0.0, 0.85, 1), 1: _variant(0.1, 0.85, 2)},
                 "skips-1": {0: _variant(2.0, 0.80, 3), 1: _variant(2.1, 0.80, 4)},  # level 0 dropped: +2 mm
                 "skips-0": {0: _variant(0.0, 0.85, 5), 1: _variant(0.1, 0.85, 6)}}
    info = {"skips-all": {"kept": [0, 1], "description": "all levels", "dropped_alone": None},
            "skips-1": {"kept": [1], "description": "all but level 0", "dropped_alone": 0},
            "skips-0": {"kept": [0], "description": "all but level 1", "dropped_alone": 1}}
    variants = {n: average_seeds(s) for n, s in seed_rows.items()}
    md = write_report(tmp_path / "s", variants=variants, meta=META, figures={}, bootstrap=300, seed_rows=seed_rows,
                      variant_info=info)
    text = md.read_text()
    seed_hd = re.search(r"\| skips-all: seed 1 − seed 0 \| HD95 \| ([+-][\d.]+) mm \|", text)
    a0, a1 = (per_case_values(seed_rows["skips-all"][s], "hd95") for s in (0, 1))
    assert seed_hd and float(seed_hd.group(1)) == pytest.approx(np.mean([a1[c] - a0[c] for c in a0]), abs=0.006)
    level = text.split("## Which skip level carries boundary quality", 1)[1].split("##", 1)[0]
    assert "Level 0 (finest, full resolution) carries boundary quality" in level and "beyond seed noise" in level
    assert "| skips-1 − skips-all | HD95 |" in text and "| yes |" in text
    assert "| skips-0 − skips-all | HD95 |" in text
    effect_rows = [line for line in text.splitlines() if line.startswith("| skips-0 − skips-all | HD95 |")]
    assert effect_rows[-1].endswith("| no |")  # level 1 changes nothing beyond seed noise
    assert "averaged over its 2 training seeds" in text
