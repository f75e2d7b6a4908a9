"""k-fold training and ensembles: disjoint folds, K fold folders, a CV table, averaged probabilities, bad --folds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segment.cli import app
from segment.config import Config, ModelConfig, load_config
from segment.data.demo import make_demo_dataset
from segment.data.pipeline import make_split
from segment.data.plan import Plan
from segment.errors import ConfigError, InputError
from segment.inference.predictor import Predictor
from segment.io.geometry import Geometry
from segment.train.folds import check_folds, fold_config
from tests.fixed_nets import FixedConv

runner = CliRunner()
TINY = [
    "model.features=[4,8,16]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
    "train.precision=32", "data.augment.rotate_prob=0", "train.threads=1", "train.max_epochs=1",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=4, seed=3, progress=False)


@pytest.fixture(scope="module")
def fold_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segment.experiments.crossval import run_folds

    cfg = load_config(overrides=[f"data.root={tiny_data}", *TINY])
    out = tmp_path_factory.mktemp("folds") / "run"
    run_folds(cfg, 2, output=out, device="cpu")
    return out


@pytest.mark.parametrize("n, k", [(10, 5), (7, 3), (4, 4), (200, 5)])
def test_folds_are_disjoint_and_cover_every_case(n: int, k: int) -> None:
    names = [f"case{i:03d}" for i in range(n)]
    vals = [make_split(names, 0, 0.2, k, f)["val"] for f in range(k)]
    assert sorted(v for val in vals for v in val) == names  # every case validated exactly once
    assert all(len(v) in (n // k, -(-n // k)) for v in vals)
    for f, val in enumerate(vals):
        split = make_split(names, 0, 0.2, k, f)
        assert not set(split["train"]) & set(val) and sorted(split["train"] + val) == names


def test_fold_config_splits_the_time_budget() -> None:
    cfg = load_config(overrides=["train.max_time=30m"])
    per_fold = fold_config(cfg, 5, 3, 1800 / 5)
    assert (per_fold.data.folds, per_fold.data.fold, per_fold.train.max_time) == (5, 3, "360s")


def test_bad_fold_counts_are_one_line() -> None:
    with pytest.raises(ConfigError, match="at least 2 folds"):
        check_folds(1, 10)
    with pytest.raises(InputError, match="more folds than the 4 usable case"):
        check_folds(5, 4)


def test_cli_bad_folds(tiny_data: Path, tmp_path: Path) -> None:
    for folds, expected in (("1", "at least 2 folds"), ("0", "at least 2 folds"), ("9", "more folds than the 4")):
        result = runner.invoke(app, ["train", "-d", str(tiny_data), "--folds", folds, "-o", str(tmp_path / folds),
                                     *sum((["--set", t] for t in TINY), [])])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], result.output
    result = runner.invoke(app, ["train", "-d", str(tiny_data), "--folds", "2", "--fold", "1"])
    assert result.exit_code == 2 and "leave out --fold" in result.output


def test_two_fold_run_has_folds_checkpoints_cv_table_and_threshold(fold_run: Path) -> None:
    marker = json.loads((fold_run / "ensemble.json").read_text())
    assert marker["folds"] == 2 and marker["members"] == ["fold_0", "fold_1"] and marker["complete"] is True
    vals = []
    for k in range(2):
        fold = fold_run / f"fold_{k}"
        assert (fold / "checkpoints" / "best.ckpt").is_file() and (fold / "checkpoints" / "last.ckpt").is_file()
        split = json.loads((fold / "split.json").read_text())
        vals.append(split["val"])
        hp = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
        assert hp["plan"] == json.loads((fold_run / "plan.json").read_text())  # planned once, shared
        assert hp["config"]["data"]["fold"] == k and hp["config"]["data"]["folds"] == 2
    assert not set(vals[0]) & set(vals[1]) and len(vals[0] + vals[1]) == 4
    rows = list(csv.DictReader((fold_run / "cv.csv").open()))
    assert [r["fold"] for r in rows] == ["0", "1", "mean"]
    assert [int(r["cases"]) for r in rows] == [len(vals[0]), len(vals[1]), 4]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0 and 0.0 <= float(r["confidence"]) <= 1.0
    assert float(rows[2]["dice"]) == pytest.approx((float(rows[0]["dice"]) + float(rows[1]["dice"])) / 2, abs=1e-3)
    cases = list(csv.DictReader((fold_run / "cv_cases.csv").open()))
    assert sorted(c["case"] for c in cases) == sorted(vals[0] + vals[1])
    threshold = json.loads((fold_run / "confidence.json").read_text())["threshold"]
    scores = sorted(float(c["confidence"]) for c in cases)
    assert scores[0] <= threshold <= scores[-1]
    assert json.loads((fold_run / "fold_1" / "confidence.json").read_text())["threshold"] == threshold
    assert (fold_run / "scan_profile.json").is_file() and (fold_run / "fold_0" / "scan_profile.json").is_file()


def test_predict_and_export_on_an_ensemble_run(fold_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    scan = sorted((tiny_data / "imagesTr").glob("*.nii.gz"))[0]
    result = runner.invoke(app, ["predict", str(scan), "-m", str(fold_run), "-o", str(tmp_path / "out"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 folds" in result.output
    rows = list(csv.DictReader((tmp_path / "out" / "confidence.csv").open()))
    assert len(rows) == 1 and 0 <= float(rows[0]["confidence"]) <= 1
    threshold = json.loads((fold_run / "confidence.json").read_text())["threshold"]
    assert float(rows[0]["threshold"]) == pytest.approx(threshold, abs=1e-4)
    assert nib.load(tmp_path / "out" / f"{scan.name[:-7]}_seg.nii.gz").shape == nib.load(scan).shape
    exported = runner.invoke(app, ["export", str(fold_run), "-o", str(tmp_path / "pkg"), "--no-onnx"])
    assert exported.exit_code == 2 and "k-fold ensemble (2 folds)" in exported.output and "fold_0" in exported.output
    # resuming a finished k-fold run leaves the folds untouched
    before = (fold_run / "fold_0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    resumed = runner.invoke(app, ["train", "--folds", "2", "--resume", "-o", str(fold_run)])
    assert resumed.exit_code == 0, resumed.output
    assert (fold_run / "fold_0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == before
    assert "finished earlier" in resumed.output
    plain = runner.invoke(app, ["train", "--resume", "-o", str(fold_run)])
    assert plain.exit_code == 2 and "is a k-fold run; resume it with --folds 2" in plain.output


def _geometry(shape: tuple[int, ...]) -> Geometry:
    return Geometry.from_affine(np.diag([1.2, 0.9, 1.1, 1.0]), shape, source="<test>")


@pytest.mark.parametrize("tta, slab", [(False, None), (True, None), (True, 600)])
def test_ensemble_probabilities_are_the_mean_of_the_members(tta: bool, slab: int | None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different fixed networks: the ensemble's probabilities equal the mean of each one's, voxel by voxel,
    also with TTA and with the volume streamed in thin slabs."""
    if slab is not None:
        import segment.inference.ensemble as ens

        real = ens.slab_rows
        monkeypatch.setattr(ens, "slab_rows", lambda *a, **k: real(*a, **{**k, "slab_voxels": slab}))
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 8], batch_size=2, features=[4, 8], modality="mri",
                channels=1, labels={0: "background", 1: "a", 2: "b"}, mirror_axes=[0, 2])
    cfg = Config(model=ModelConfig(features=[4, 8], out_channels=3))
    nets = [FixedConv([-1.0, 0.2, 1.0], [0.5, 0.0, -0.5]), FixedConv([-0.5, 1.5, 0.3], [0.0, -0.3, 0.2])]
    image = np.random.default_rng(0).normal(0, 1, (21, 26, 13)).astype(np.float32)
    image[5:15, 8:20, 3:10] += 2.0
    geometry = _geometry(image.shape)
    kw = dict(device="cpu", precision="32", tta=tta, largest_component=False)
    singles = [Predictor(n, plan, cfg, **kw).predict_probabilities([image], geometry) for n in nets]
    both = Predictor(nets[0], plan, cfg, members=nets, **kw).predict_probabilities([image], geometry)
    expected = (singles[0] + singles[1]) / 2
    assert np.abs(singles[0] - singles[1]).max() > 0.2  # the members really differ
    np.testing.assert_allclose(both, expected, atol=1e-5)
    labels = Predictor(nets[0], plan, cfg, members=nets, **kw).predict_labels([image], geometry)[0]
    assert (labels == expected.argmax(0)).mean() > 0.999  # ties aside
