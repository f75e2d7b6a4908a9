"""The per-level skip study: variant language, the decoder dropping exactly those levels, seed noise, the level finding,
worst-case overlays, and one tiny two-seed run end to end."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segment.config import ModelConfig, load_config
from segment.errors import ConfigError
from segment.evaluation.seed_noise import (average_seeds, exceeds_noise, level_finding, noise_levels,
                                           seed_comparisons)
from segment.evaluation.stats import compare
from segment.experiments.ablate_figures import worst_cases
from segment.experiments.variants import (describe, dropped_alone, parse_seeds, parse_tokens, parse_variants,
                                          variant_name)
from segment.figures import plot_case_panels, worst_boundary_error
from segment.nets import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the variant language ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, expected", [
    (2, ["all", "none"]),
    (3, ["all", [1], [0], "none"]),  # at depth 3, "all but level 0" is "only level 1": trained once
    (4, ["all", [1, 2], [0, 2], [0, 1], [0], [1], [2], "none"]),
    (5, ["all", [1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0], [1], [2], [3], "none"]),
])
def test_levels_expands_to_all_drop_each_keep_each_none(depth: int, expected: list) -> None:
    assert parse_variants("levels", depth=depth) == expected


@pytest.mark.parametrize("text, depth, expected", [
    ("all,drop:1", 4, ["all", [0, 2]]),
    ("only:0+2,none", 4, [[0, 2], "none"]),
    ("keep:2,drop:0+1", 5, [[2, 3], [2]]),
    ("all,drop:2,[0,1]", 4, ["all", [0, 1]]),  # the list form and drop: can name the same setting
    ("all,only:0", 4, ["all", [0]]),
])
def test_only_and_drop_tokens(text: str, depth: int, expected: list) -> None:
    assert parse_variants(text, depth=depth) == expected


def test_settings_equal_to_all_or_none_are_named_so() -> None:
    assert parse_variants("only:0+1+2,drop:0+1+2", depth=4) == ["all", "none"]
    assert [variant_name(s) for s in parse_variants("levels", depth=3)] == ["skips-all", "skips-1", "skips-0",
                                                                           "skips-none"]


@pytest.mark.parametrize("text, depth, words", [
    ("all,drop:3", 4, r"level\(s\) \[3\] out of range; this net has 3 skip level\(s\), 0..2"),
    ("all,only:5", 3, r"level\(s\) \[5\] out of range"),
    ("levels", None, "need the network depth"),
    ("all,drop:", None, "'drop:' is not a skip setting"),
    ("all,only:a", None, "'only:a' is not a skip setting"),
    ("levels", 2, None),  # fine: all, none
    ("drop:0,none", 2, "at least two different"),  # at depth 2, drop:0 is none
])
def test_bad_variants_name_the_token(text: str, depth: int | None, words: str | None) -> None:
    if words is None:
        assert parse_variants(text, depth=depth) == ["all", "none"]
        return
    with pytest.raises(ConfigError, match=words):
        parse_variants(text, depth=depth)


def test_syntax_is_checked_without_the_depth() -> None:
    assert parse_tokens("levels,drop:1,only:0+2,[1,0],2") == [("levels", []), ("drop", [1]), ("only", [0, 2]),
                                                               ("only", [0, 1]), ("only", [2])]
    with pytest.raises(ConfigError, match="'dorp:1' is not a skip setting"):
        parse_tokens("all,dorp:1")


def test_descriptions_and_the_single_dropped_level() -> None:
    assert [describe(s, 3) for s in ("all", [1, 2], [0], "none", [0, 2])] == [
        "all levels", "all but level 0", "only level 0", "no skips", "all but level 1"]
    assert describe([1], 2) == "only level 1 (= all but level 0)"
    assert [dropped_alone(s, 3) for s in ("all", [1, 2], [0, 2], [0], "none")] == [None, 0, 1, None, None]


def test_parse_seeds() -> None:
    assert parse_seeds(None, 7) == [7] and parse_seeds("0,1", 7) == [0, 1] and parse_seeds("3", 0) == [3]
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad, 0)


# ---- the decoder drops exactly those levels ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", parse_variants("levels", depth=4))
def test_decoder_uses_exactly_the_kept_skips(spec: object) -> None:
    cfg = ModelConfig(features=[4, 8, 16, 32], out_channels=2, skip_connections=spec)
    kept = cfg.kept_skips()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    in_ch = [model.decoder.stages[s][0][0].in_channels for s in range(3)]  # first conv of each decoder stage
    assert in_ch == [c * (2 if s in kept else 1) for s, c in enumerate([4, 8, 16])]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        feats = model.encoder(x)
        base = model.heads[0](model.decoder(feats)[0])
        for level in range(3):  # perturb only that level's encoder map, as seen by the decoder
            moved = [f + 5.0 * torch.randn_like(f) if i == level else f for i, f in enumerate(feats)]
            out = model.heads[0](model.decoder(moved)[0])
            assert (not torch.equal(out, base)) == (level in kept), (spec, level)


# ---- seed noise and the level finding ----------------------------------------------------------------------------
def _rows(hd: dict[str, float], dice: float = 0.8, nsd: float = 0.9) -> list[dict]:
    return [{"case": c, "class": 1, "name": "organ", "dice": dice, "hd95": v, "assd": v / 3, "nsd": nsd}
            for c, v in hd.items()]


CASES = [f"c{i}" for i in range(12)]


def _study(effect: float, noise: float) -> tuple[dict, dict]:
    """'all' and 'drop level 0/1' with 2 seeds; dropping level 0 adds `effect` mm, seeds differ by `noise` mm."""
    rng = np.random.default_rng(0)
    base = {c: 2.0 + rng.uniform(0, 1) for c in CASES}

    def variant(shift: float) -> dict[int, list]:
        jitter = rng.normal(0, 0.01, len(CASES))
        return {0: _rows({c: base[c] + shift for c in CASES}),
                1: _rows({c: base[c] + shift + noise + j for c, j in zip(CASES, jitter)})}

    seed_rows = {"skips-all": variant(0.0), "skips-1-2": variant(effect), "skips-0-2": variant(0.05)}
    return seed_rows, {"skips-1-2": 0, "skips-0-2": 1}


def _comparisons(seed_rows: dict) -> list[dict]:
    """Each dropped-level variant minus 'skips-all' on the seed-averaged rows, as the report computes them."""
    from segment.evaluation.seed_noise import verdict

    rows = {n: average_seeds(s) for n, s in seed_rows.items()}
    comps = []
    for name in ("skips-1-2", "skips-0-2"):
        for m in ("dice", "hd95", "assd", "nsd"):
            res = compare(rows["skips-all"], rows[name], m, n=300)
            comps.append({**res, "variant": name, "reference": "skips-all", "verdict": verdict(res, m)})
    return comps


def _finding(effect: float, noise: float) -> str:
    seed_rows, dropped = _study(effect, noise)
    return level_finding(_comparisons(seed_rows), seed_comparisons(seed_rows, 300, 0), dropped)


def test_average_seeds_and_seed_differences_are_the_plain_numbers() -> None:
    seed_rows, _ = _study(1.0, 0.3)
    avg = {r["case"]: r["hd95"] for r in average_seeds(seed_rows["skips-all"])}
    s0 = {r["case"]: r["hd95"] for r in seed_rows["skips-all"][0]}
    s1 = {r["case"]: r["hd95"] for r in seed_rows["skips-all"][1]}
    assert avg == pytest.approx({c: (s0[c] + s1[c]) / 2 for c in CASES})
    comps = seed_comparisons(seed_rows, 300, 0)
    hd = next(c for c in comps if c["variant"] == "skips-all" and c["metric"] == "hd95")
    assert hd["seeds"] == (0, 1) and hd["mean"] == pytest.approx(np.mean([s1[c] - s0[c] for c in CASES]))
    assert noise_levels(comps)["hd95"] == pytest.approx(max(abs(c["mean"]) for c in comps if c["metric"] == "hd95"))
    assert len(comps) == 3 * 4  # 3 variants x 4 metrics, seed 1 - seed 0
    nan = average_seeds({0: _rows({"a": math.nan}), 1: _rows({"a": 1.0})})
    assert math.isnan(nan[0]["hd95"]) and nan[0]["assd"] == pytest.approx(math.nan, nan_ok=True)


def test_level_finding_names_the_level_when_it_exceeds_seed_noise() -> None:
    text = _finding(effect=1.0, noise=0.1)
    assert "Level 0 (finest, full resolution) carries boundary quality" in text
    assert "HD95 +1.00 mm" in text and "beyond seed noise" in text


def test_level_finding_says_when_nothing_exceeds_seed_noise() -> None:
    text = _finding(effect=0.2, noise=0.5)
    assert "No level's effect exceeds seed noise" in text and "HD95 0.5" in text
    assert "carries boundary quality:" not in text


def test_level_finding_names_no_level_where_a_seed_missed_a_structure_everywhere() -> None:
    """When one seed of a variant never finds the structure, its distances are missing in every case and its seed
    noise on HD95/ASSD is unknown: a large effect must not be called 'beyond seed noise' on those metrics."""
    seed_rows, dropped = _study(1.0, 0.1)
    seed_rows["skips-0-2"][1] = _rows({c: math.nan for c in CASES}, dice=0.0, nsd=0.0)  # seed 1 found nothing
    comps = _comparisons(seed_rows)
    seeds = seed_comparisons(seed_rows, 300, 0)
    assert "hd95" not in noise_levels(seeds) and "assd" not in noise_levels(seeds)
    text = level_finding(comps, seeds, dropped)
    assert "Seed noise of HD95, ASSD could not be measured for skips-0-2" in text
    assert "HD95 +1.00 mm" in text  # the effect is still reported ...
    assert "carries boundary quality: dropping it worsens HD95" not in text  # ... but not called beyond seed noise
    assert "Two seeds of the same variant differ by up to Dice 0.8" in text


def test_exceeds_noise_needs_an_interval_off_zero_and_a_larger_mean() -> None:
    comp = {"metric": "hd95", "mean": 1.0, "verdict": "worse"}
    assert exceeds_noise(comp, {"hd95": 0.5}) is True
    assert exceeds_noise(comp, {"hd95": 1.5}) is False
    assert exceeds_noise({**comp, "verdict": "inconclusive"}, {"hd95": 0.1}) is False
    assert exceeds_noise(comp, {}) is None


# ---- worst boundary cases ----------------------------------------------------------------------------------------
def test_worst_cases_put_missing_first_then_highest_and_keep_cases_distinct() -> None:
    by_seed = {0: _rows({"a": 1.0, "b": 5.0, "c": 2.0}), 1: _rows({"a": math.nan, "b": 6.0, "c": 1.0})}
    assert [(s, c) for s, c, _ in worst_cases(by_seed, n=3)] == [(1, "a"), (1, "b"), (0, "c")]


def test_worst_boundary_error_finds_the_far_false_positive(tmp_path: Path) -> None:
    ref = np.zeros((30, 30, 20), np.uint8)
    ref[10:20, 10:20, 5:15] = 1
    pred = ref.copy()
    pred[26, 26, 3] = 1  # an isolated false positive far from the reference
    point, dist = worst_boundary_error(pred, ref, (1.0, 1.0, 2.0))
    assert point == (26, 26, 3)
    assert dist == pytest.approx(math.sqrt(7**2 + 7**2 + (2 * 2) ** 2))  # to voxel (19, 19, 5) at spacing 1,1,2
    assert worst_boundary_error(ref, ref, (1, 1, 1))[1] == 0.0
    image = ref * 100.0 + np.random.default_rng(0).normal(0, 5, ref.shape)
    png = plot_case_panels([{"image": image, "ref": ref, "pred": pred, "point": point, "title": "t"}] * 2,
                           tmp_path / "w.png")
    assert png.is_file() and png.stat().st_size > 5_000


# ---- one tiny two-seed per-level study -----------------------------------------------------------------------
TINY = ["model.features=[4,8,16]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
        "train.max_epochs=1", "data.cache=true", "train.accelerator=cpu", "train.precision=32", "train.threads=1",
        "evaluate.bootstrap=100", "predict.overlap=0.25", "data.val_fraction=0.4",
        "data.target_spacing=[3,3,3]", "predict.precision=32"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from segment.data.demo import make_demo_dataset
    from segment.experiments.ablate import run_ablation

    root = tmp_path_factory.mktemp("levels")
    data = make_demo_dataset(root / "data", n_cases=5, progress=False)
    cfg = load_config(None, TINY + [f"data.root={data}"])
    return root / "out", run_ablation(cfg, output=root / "out", variants="levels", seeds="0,1")


NAMES = ["skips-all", "skips-1", "skips-0", "skips-none"]


def _csv(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_study_trains_every_variant_with_both_seeds(study: tuple[Path, Path]) -> None:
    out, _ = study
    for name in NAMES:
        for seed in (0, 1):
            cfg = (out / "runs" / name / f"seed-{seed}" / "config.yaml").read_text()
            assert f"seed: {seed}" in cfg
    rows = _csv(out)
    assert {(r["variant"], r["seed"]) for r in rows} == {(n, s) for n in NAMES for s in ("0", "1")}
    weights = [torch.load(out / "runs" / "skips-all" / f"seed-{s}" / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)["state_dict"] for s in (0, 1)]
    key = next(k for k in weights[0] if k.endswith("weight") and weights[0][k].ndim == 5)
    assert not torch.equal(weights[0][key], weights[1][key])  # a different seed really trained a different model


def test_report_table_is_the_seed_average_of_the_csv(study: tuple[Path, Path]) -> None:
    from segment.evaluation.metrics import fmt_value

    out, report = study
    text = report.read_text()
    rows = _csv(out)
    header = next(line for line in text.splitlines() if line.startswith("| class | metric |"))
    assert header == "| class | metric | " + " | ".join(NAMES) + " |"
    line = next(line for line in text.splitlines() if line.startswith("| all | Dice |"))
    cells = [c.strip() for c in line.strip("|").split("|")][2:]
    for name, cell in zip(NAMES, cells):
        per_case = {}
        for r in rows:
            if r["variant"] == name:
                per_case.setdefault(r["case"], []).append(float(r["dice"]))  # 2 seeds x 2 classes
        expected = np.mean([np.mean(v) for v in per_case.values()])
        assert cell.startswith(fmt_value(float(expected), "dice") + " ± "), (name, cell, expected)


def test_report_has_seed_noise_rows_level_finding_and_overlays(study: tuple[Path, Path]) -> None:
    out, report = study
    text = report.read_text()
    for name in NAMES:
        assert f"| {name}: seed 1 − seed 0 | HD95 |" in text
        assert (out / "figures").glob(f"worst_*_{name}.png")
        pngs = list((out / "figures").glob(f"worst_*_{name}.png"))
        assert len(pngs) == 1 and pngs[0].stat().st_size > 5_000 and f"]({pngs[0].relative_to(out).as_posix()})" in text
    assert "## Which skip level carries boundary quality" in text
    assert "## Effect beside seed noise (all classes)" in text and "averaged over its 2 training seeds" in text
    assert "level 0 joins the full-resolution encoder stage" in text
    assert "| skips-1 | 1 | only level 1 (= all but level 0) |" in text
    payload = json.loads((out / "report.json").read_text())
    rows = _csv(out)
    seed_hd = next(c for c in payload["seed_comparisons"] if c["variant"] == "skips-none" and c["metric"] == "dice")
    by = {s: {} for s in "01"}
    for r in rows:
        if r["variant"] == "skips-none":
            by[r["seed"]].setdefault(r["case"], []).append(float(r["dice"]))
    expected = np.mean([np.mean(by["1"][c]) - np.mean(by["0"][c]) for c in by["0"]])
    assert seed_hd["mean"] == pytest.approx(expected, abs=1e-9)
    assert payload["level_finding"] and re.search(r"dropping level [01]", payload["level_finding"])
    assert payload["variants"]["skips-0"]["dropped_alone"] == 1
