"""`segment ablate`: variant parsing, budget, gradient norms, and one tiny end-to-end ablation on synthetic data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segment.config import ModelConfig, load_config
from segment.errors import ConfigError
from segment.experiments.ablate import (DEFAULT_BUDGET, TIME_LIMITED_EPOCHS, _with_budget, parse_variants, pick_cases,
                                       run_ablation, variant_name)
from segment.experiments.gradients import encoder_grad_norms, foreground_patches, mean_encoder_grad_norms
from segment.nets import build_model

TINY = ["model.features=[4,8]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
        "train.max_epochs=1", "data.cache=true", "train.accelerator=cpu", "train.precision=32", "train.threads=1",
        "evaluate.bootstrap=100", "predict.overlap=0.25", "data.val_fraction=0.4",
        "data.target_spacing=[3,3,3]", "predict.precision=32"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parsing and configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("all,none", ["all", "none"]),
    ("none,all", ["all", "none"]),  # the variant with skips is always the reference
    ("all,none,[0]", ["all", [0], "none"]),
    ("all, [1,0] ,2", ["all", [0, 1], [2]]),
])
def test_parse_variants(text: str, expected: list) -> None:
    assert parse_variants(text) == expected


@pytest.mark.parametrize("text, words", [
    ("all", "at least two"), ("all,all", "at least two"), ("all,[0", "without ']'"), ("all,0]", "without '['"),
    ("all,half", "'half' is not a skip setting"), ("all,", "'' is not a skip setting"),
])
def test_parse_variants_rejects(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_variants(text)


def test_variant_names() -> None:
    assert [variant_name(s) for s in ("all", "none", [0, 2])] == ["skips-all", "skips-none", "skips-0-2"]


def test_budget_default_makes_time_the_limit() -> None:
    cfg, text = _with_budget(load_config(None, []), None)
    assert (text, cfg.train.max_time, cfg.train.max_epochs) == (DEFAULT_BUDGET, DEFAULT_BUDGET, TIME_LIMITED_EPOCHS)
    cfg, text = _with_budget(load_config(None, ["train.max_epochs=3"]), "90s")
    assert (text, cfg.train.max_time, cfg.train.max_epochs) == ("90s", "90s", 3)  # an explicit epoch count is kept
    with pytest.raises(ConfigError, match="20 minutes"):
        _with_budget(load_config(None, []), "20 minutes")


def test_pick_cases_largest_median_and_reverse_gap() -> None:
    def rows(dice: dict[str, float]) -> list[dict]:
        return [{"case": c, "name": "organ", "dice": d} for c, d in dice.items()]

    a = rows({"c1": 0.9, "c2": 0.8, "c3": 0.7, "c4": 0.6, "c5": 0.5})
    b = rows({"c1": 0.5, "c2": 0.8, "c3": 0.6, "c4": 0.7, "c5": 0.45})  # gaps +.4, 0, +.1, -.1, +.05
    picked = pick_cases({"all": a, "none": b})
    assert [c for c, _ in picked] == ["c1", "c5", "c4"]
    assert picked[0][1] == pytest.approx(0.4)


# ---- gradient norms -------------------------------------------------------------------------------------------
def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    label[:, :, 4:12, 4:12, 4:12] = 1
    return {"image": torch.randn(2, 1, 16, 16, 16, generator=g) + label, "label": label}


def test_encoder_grad_norms_one_per_stage_and_side_effect_free() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(features=[4, 8, 16], out_channels=2)).eval()
    first = encoder_grad_norms(model, _batch())
    assert len(first) == 3 and all(np.isfinite(first)) and all(v > 0 for v in first)
    assert encoder_grad_norms(model, _batch()) == pytest.approx(first)  # weights untouched, nothing accumulated
    assert not model.training and all(p.grad is None for p in model.parameters())
    mean = mean_encoder_grad_norms(model, [_batch(0), _batch(1)])
    expected = (np.array(first) + np.array(encoder_grad_norms(model, _batch(1)))) / 2
    assert mean == pytest.approx(expected.tolist())


def test_skips_change_the_gradient_reaching_the_first_stage() -> None:
    norms = {}
    for skips in ("all", "none"):
        torch.manual_seed(0)  # same encoder initialisation for both
        norms[skips] = encoder_grad_norms(build_model(ModelConfig(features=[4, 8, 16], skip_connections=skips)),
                                          _batch())
    assert norms["all"][0] != pytest.approx(norms["none"][0], rel=1e-3)


def test_foreground_patches_centre_on_foreground_and_pad() -> None:
    label = np.zeros((1, 30, 10, 10), np.int64)
    label[0, 25:28, 4:6, 4:6] = 1  # near the end of a long axis; 10-voxel axes are smaller than the patch
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape)
    batches = foreground_patches([{"image": image, "label": label}] * 3, [12, 12, 12], batch_size=2)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 1, 12, 12, 12), (1, 1, 12, 12, 12)]
    assert int(batches[0]["label"][0].sum()) == int(label.sum())  # the whole structure is inside the patch
    assert float(batches[0]["image"][0, 0, :, 10:, :].abs().sum()) == 0.0  # zero padding beyond the volume


# ---- one tiny ablation, end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from segment.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("abl")
    data = make_demo_dataset(root / "data", n_cases=5, progress=False)
    cfg = load_config(None, TINY + [f"data.root={data}"])
    report = run_ablation(cfg, output=root / "out", budget=None, variants="none,all")
    return root / "out", report


def test_ablation_writes_every_report_file(ablation: tuple[Path, Path]) -> None:
    out, report = ablation
    assert report == out / "report.md"
    for name in ("report.md", "report.html", "report.json", "metrics.csv", "figures/boundary_error.png",
                 "figures/training_curves.png", "figures/grad_norms.png", "figures/contours_0.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = report.read_text()
    assert "| class | metric | skips-all | skips-none |" in text  # the with-skips variant first
    assert "skips-none − skips-all" in text
    assert "## Finding" in text and "## Gradient norm per encoder depth" in text
    assert "| variant | depth 0 | depth 1 |" in text  # one column per encoder stage of features [4, 8]


def test_ablation_csv_one_row_per_variant_case_class(ablation: tuple[Path, Path]) -> None:
    out, _ = ablation
    split = json.loads((out / "runs" / "skips-all" / "split.json").read_text())
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    keys = {(r["variant"], r["case"], r["name"]) for r in rows}
    assert len(rows) == len(keys) == 2 * len(split["val"]) * 2  # variants x validation cases x (organ, lesion)
    assert {r["case"] for r in rows} == set(split["val"])
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


def test_variants_differ_only_in_skips_and_share_split_and_plan(ablation: tuple[Path, Path]) -> None:
    out, _ = ablation
    runs = {name: out / "runs" / name for name in ("skips-all", "skips-none")}
    hp = {n: torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
          for n, d in runs.items()}
    assert hp["skips-all"]["config"]["model"]["skip_connections"] == "all"
    assert hp["skips-none"]["config"]["model"]["skip_connections"] == "none"
    a, b = (dict(hp[n]["config"]) for n in runs)
    a["model"], b["model"] = ({k: v for k, v in m["model"].items() if k != "skip_connections"} for m in (a, b))
    assert a == b and hp["skips-all"]["plan"] == hp["skips-none"]["plan"]
    assert (runs["skips-all"] / "split.json").read_text() == (runs["skips-none"] / "split.json").read_text()
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert set(meta["steps"]) == set(runs) and all(v == 2 for v in meta["steps"].values())


def test_rerun_reuses_finished_runs_and_refuses_a_different_split(ablation: tuple[Path, Path]) -> None:
    from segment.errors import InputError

    out, _ = ablation
    ckpt = out / "runs" / "skips-all" / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    data = json.loads((out / "report.json").read_text())["meta"]["data"]
    cfg = load_config(None, TINY + [f"data.root={data}"])
    assert run_ablation(cfg, output=out, budget=None, variants="all,none") == out / "report.md"
    assert ckpt.stat().st_mtime_ns == stamp  # nothing retrained
    other = load_config(None, TINY + [f"data.root={data}", "data.val_fraction=0.6"])
    with pytest.raises(InputError, match="different split"):
        run_ablation(other, output=out, budget=None, variants="all,none")


def test_a_moved_ablation_folder_is_reused_from_its_new_place(ablation: tuple[Path, Path], tmp_path: Path) -> None:
    """summary.json records absolute checkpoint paths; a rerun after moving the folder uses the files where they are."""
    import shutil

    out, _ = ablation
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(moved / "figures", ignore_errors=True)
    data = json.loads((out / "report.json").read_text())["meta"]["data"]
    stamp = (moved / "runs" / "skips-all" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    renamed = out.with_name(out.name + "-gone")
    out.rename(renamed)  # the recorded paths no longer exist
    try:
        cfg = load_config(None, TINY + [f"data.root={data}"])
        assert run_ablation(cfg, output=moved, budget=None, variants="all,none") == moved / "report.md"
    finally:
        renamed.rename(out)
    assert (moved / "runs" / "skips-all" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp  # not retrained
    assert json.loads((moved / "report.json").read_text())["meta"]["steps"] == {"skips-all": 2, "skips-none": 2}
