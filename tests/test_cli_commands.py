"""`segment train`, `ablate`, `doctor` and `model-info` through the typer CLI, checking what they print and write (values,
not just exit codes)."""

from __future__ import annotations

import csv
import json
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from segment.cli import app
from segment.config import load_config
from segment.nets import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich tables at full width, so no cell is wrapped or cut


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segment.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=5, seed=3, progress=False)


# ---- model-info ---------------------------------------------------------------------------------------------------
def _row(output: str, label: str) -> str:
    """The value cell of the summary-table row whose label starts with `label`."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if len(cells) >= 2 and cells[0].startswith(label):
            return cells[-1]
    raise AssertionError(f"no row {label!r} in:\n{output}")


@pytest.mark.parametrize("skips", ["all", "none"])
def test_model_info_prints_the_parameter_count_of_the_built_model(skips: str) -> None:
    overrides = ["model.features=[4,8,16]", f"model.skip_connections={skips}", "model.out_channels=3"]
    result = runner.invoke(app, ["model-info", *_sets(*overrides), "--size", "32,32,32"], env=WIDE)
    assert result.exit_code == 0, result.output
    cfg = load_config(None, overrides)
    total = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert _row(result.output, "total parameters") == f"{total:,}"
    all_skips = load_config(None, overrides[:1] + ["model.skip_connections=all", "model.out_channels=3"])
    diff = total - sum(p.numel() for p in build_model(all_skips.model).parameters())
    assert _row(result.output, "parameters vs all skips") == f"{diff:+,}"
    if skips == "none":
        assert diff < 0  # dropping the skips removes the channels they fed into the decoder
    assert _row(result.output, "output size for (32, 32, 32)") == "(32, 32, 32)"  # same padding
    assert "features [4, 8, 16]" in result.output


# ---- doctor -------------------------------------------------------------------------------------------------------
def test_doctor_prints_the_installed_versions_and_cpu_count() -> None:
    result = runner.invoke(app, ["doctor", "--device", "cpu"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert _row(result.output, "torch") == metadata.version("torch")
    assert _row(result.output, "monai") == metadata.version("monai")
    assert _row(result.output, "nibabel") == metadata.version("nibabel")
    assert _row(result.output, "CUDA available") == ("yes" if torch.cuda.is_available() else "no")
    assert _row(result.output, "CPUs usable") == str(len(os.sched_getaffinity(0)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA cannot show the missing-CUDA exit")
def test_doctor_exits_1_naming_the_problem_when_the_device_is_missing() -> None:
    result = runner.invoke(app, ["doctor", "--device", "cuda"], env=WIDE)
    assert result.exit_code == 1
    assert "CUDA was requested but is not available" in result.output


# ---- train --------------------------------------------------------------------------------------------------------
TINY = ["model.features=[4,8,16]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
        "train.precision=32", "data.augment.rotate_prob=0", "train.threads=1", "train.accelerator=cpu",
        "train.lr=0.01", "predict.overlap=0.25"]


def test_train_writes_checkpoints_and_a_summary_of_two_steps(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--output", str(out), "--max-epochs", "1",
                                 *_sets(*TINY)], env=WIDE)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert set(summary["val_dice"]) == {"val_dice_organ", "val_dice_lesion", "val_dice_mean"}
    assert summary["val_dice"]["val_dice_mean"] == pytest.approx(
        (summary["val_dice"]["val_dice_organ"] + summary["val_dice"]["val_dice_lesion"]) / 2, abs=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert Path(summary["best_checkpoint"]) == out / "checkpoints" / "best.ckpt"
    assert "Validation Dice after 2 steps" in " ".join(result.output.split())  # the table title may wrap
    for name in ("organ", "lesion", "mean"):  # the printed table holds the summary's numbers
        assert _row(result.output, name) == f"{summary['val_dice'][f'val_dice_{name}']:.4f}"

    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (ckpt["global_step"], ckpt["epoch"]) == (2, 0)
    hp = ckpt["hyper_parameters"]
    assert hp["config"]["model"]["features"] == [4, 8, 16] and hp["plan"]["patch_size"] == [24, 24, 24]
    assert hp["config"]["train"]["lr"] == 0.01 and hp["config"]["train"]["max_epochs"] == 1
    # the scheduler stepped once per optimiser step: after 2 of 2 steps the poly schedule sits on its 1e-3 floor
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.01 * 1e-3)
    # the run folder's plan and config are the checkpoint's
    assert json.loads((out / "plan.json").read_text())["patch_size"] == [24, 24, 24]
    assert load_config(out / "config.yaml").model.features == [4, 8, 16]

    # the validation cases scored as predict writes them, and the "check this case" threshold chosen on them
    import csv

    import numpy as np

    rows = list(csv.DictReader((out / "val_cases.csv").open()))
    assert sorted(r["case"] for r in rows) == sorted(json.loads((out / "split.json").read_text())["val"])
    scores = [float(r["confidence"]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in scores)
    chosen = json.loads((out / "confidence.json").read_text())
    assert chosen["threshold"] == pytest.approx(float(np.quantile(scores, chosen["quantile"])), abs=1e-4)
    assert chosen["cases"] == len(rows)


# ---- ablate -------------------------------------------------------------------------------------------------------
ABLATE = ["model.features=[4,8]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
          "train.max_epochs=1", "data.cache=true", "train.accelerator=cpu", "train.precision=32", "train.threads=1",
          "evaluate.bootstrap=100", "predict.overlap=0.25", "data.val_fraction=0.4", "data.target_spacing=[3,3,3]",
          "predict.precision=32"]


def test_ablate_trains_both_variants_and_reports_them(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    result = runner.invoke(app, ["ablate", "--data", str(tiny_data), "--output", str(out), "--variants", "none,all",
                                 "--budget", "10m", *_sets(*ABLATE)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.md'}" in result.output.replace("\n", "")
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["steps"] == {"skips-all": 2, "skips-none": 2}
    split = json.loads((out / "runs" / "skips-all" / "split.json").read_text())
    assert len(split["val"]) == 2  # 40 % of 5 cases
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({(r["variant"], r["case"], r["name"]) for r in rows}) == sorted(
        (v, c, n) for v in ("skips-all", "skips-none") for c in split["val"] for n in ("organ", "lesion"))
    for name, skips in (("skips-all", "all"), ("skips-none", "none")):
        ckpt = torch.load(out / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["hyper_parameters"]["config"]["model"]["skip_connections"] == skips
        assert ckpt["hyper_parameters"]["config"]["train"]["max_time"] == "10m"  # --budget reached every variant
    assert "| class | metric | skips-all | skips-none |" in (out / "report.md").read_text()
