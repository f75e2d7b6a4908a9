"""k-fold training and ensembles: disjoint folds, K fold folders, a CV table, averaged probabilities, bad --folds."""

from __future__ import annotations

import csv
import subprocess
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
        import segment.engine.stream as ens

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


# ---- folds in parallel, one per GPU: the scheduler with 2 fake "devices" and real CPU worker processes --------------
def _fake_gpus(tmp: Path, fail_fold: int | None, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Make the CLI see 2 GPUs ("0", "1"); launch the real worker processes (CPU training), except that `fail_fold`
    fails once after writing into its fold folder as `train` does at its start. Returns the launches made."""
    import sys

    import segment.train.parallel_folds as pf

    launches: list[tuple[int, str]] = []
    fail_once = {fail_fold}
    real = pf.worker_launcher
    monkeypatch.setattr(pf, "gpus_for_folds", lambda cfg: ["0", "1"])

    def launcher(run_dir: Path, folds: int, per_fold_s: float | None) -> pf.Launcher:
        def launch(fold: int, device: str) -> int:
            launches.append((fold, device))
            if fold in fail_once:
                fail_once.discard(fold)
                (run_dir / f"fold_{fold}").mkdir()
                (run_dir / f"fold_{fold}" / "config.yaml").write_text("started\n")
                with pf.fold_log(run_dir, fold).open("a") as log:
                    return subprocess.run([sys.executable, "-c", "print('error: injected failure'); raise SystemExit(3)"],
                                          stdout=log, check=False).returncode
            return real(run_dir, folds, per_fold_s)(fold, device)

        return launch

    monkeypatch.setattr(pf, "worker_launcher", launcher)
    return launches


def test_parallel_folds_one_per_device_a_failed_fold_and_resume(tiny_data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "par"
    args = ["train", "-d", str(tiny_data), "--folds", "3", "-o", str(out), "--accelerator", "cpu",
            "--max-time", "10m", *sum((["--set", t] for t in TINY), [])]
    launches = _fake_gpus(tmp_path, 1, monkeypatch)
    failed = runner.invoke(app, args)
    assert failed.exit_code == 1, failed.output
    errors = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fold(s) 1 " in errors[0] and f"--folds 3 --resume -o {out}" in errors[0], failed.output
    assert "fold 1: failed (exit 3): injected failure" in failed.output
    assert "10.0 min in total, 5.0 min per fold" in failed.output  # 3 folds on 2 GPUs: 2 rounds of 10 min / 2
    assert sorted(k for k, _ in launches) == [0, 1, 2] and {d for _, d in launches} == {"0", "1"}  # each fold once
    assert not (out / "fold_1").exists()  # failed before a checkpoint: cleared for --resume
    assert json.loads((out / "ensemble.json").read_text())["complete"] is False and not (out / "cv.csv").exists()
    device_of = dict(launches)
    mtimes = {}
    for k in (0, 2):
        fold = out / f"fold_{k}"
        assert (fold / "checkpoints" / "last.ckpt").is_file() and (fold / "summary.json").is_file()
        first = (out / f"fold_{k}.log").read_text().splitlines()[0]
        assert first.endswith(f"CUDA_VISIBLE_DEVICES={device_of[k]}"), first  # the child saw its own device
        hp = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
        assert hp["config"]["train"]["devices"] == 1 and hp["config"]["train"]["max_time"] == "300s"
        assert hp["config"]["data"]["fold"] == k and hp["plan"] == json.loads((out / "plan.json").read_text())
        mtimes[k] = (fold / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    launches.clear()
    resumed = runner.invoke(app, ["train", "--folds", "3", "--resume", "-o", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert [k for k, _ in launches] == [1]  # only the failed fold trains again
    assert all((out / f"fold_{k}" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtimes[k] for k in (0, 2))
    assert json.loads((out / "ensemble.json").read_text())["complete"] is True
    vals = [json.loads((out / f"fold_{k}" / "split.json").read_text())["val"] for k in range(3)]
    assert sorted(v for val in vals for v in val) == sorted(p.name[:-7] for p in (tiny_data / "labelsTr").glob("*.nii.gz"))
    for k in range(3):  # the worker's split is the one the one-after-another path makes
        names = sorted(v for val in vals for v in val)
        assert vals[k] == make_split(names, 0, 0.2, 3, k)["val"]
    assert [r["fold"] for r in csv.DictReader((out / "cv.csv").open())] == ["0", "1", "2", "mean"]


def test_parallel_rule_and_scheduler_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several GPUs and devices auto/1 -> one fold per GPU; other devices, a strategy, one GPU -> one after another;
    the queue gives each fold to exactly one device, and a launcher that raises fails only its fold."""
    import threading

    import segment.train.parallel_folds as pf

    monkeypatch.setattr(pf.torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(pf, "training_accelerator", lambda acc: "cuda" if acc in ("auto", "cuda", "gpu") else acc)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    for var in ("WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    base = load_config()
    rule = {(): ["4", "6", "7"], ("train.devices=1",): ["4", "6", "7"], ("train.devices=2",): None,
            ("train.devices='0,1'",): None, ("train.strategy=ddp",): None, ("train.accelerator=cpu",): None}
    for sets, expected in rule.items():
        assert pf.gpus_for_folds(load_config(overrides=list(sets))) == expected, sets
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pf.gpus_for_folds(base) is None  # already one rank of a distributed launch
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(pf.torch.cuda, "device_count", lambda: 1)
    assert pf.gpus_for_folds(base) is None

    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def launch(fold: int, device: str) -> int:
        with lock:
            seen.append((fold, device))
        if fold == 3:
            raise OSError("no such executable")
        return 0 if fold != 5 else 7

    lines: list[str] = []
    codes = pf.schedule(list(range(7)), ["a", "b"], launch, lines.append)
    assert sorted(k for k, _ in seen) == list(range(7)) and {d for _, d in seen} <= {"a", "b"}
    assert codes == {0: 0, 1: 0, 2: 0, 3: -1, 4: 0, 5: 7, 6: 0}
    assert sum("started" in line for line in lines) == 7 and sum("finished" in line for line in lines) == 5
    assert any("fold 3: could not start (OSError: no such executable)" in line for line in lines)
