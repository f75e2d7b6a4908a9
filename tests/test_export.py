"""`segment export`: a model package (safetensors + model.json + model card + ONNX) that predict uses as it is."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segment.cli import app
from segment.config import Config
from segment.data.plan import Plan
from segment.errors import InputError
from segment.inference.export import FORMAT_VERSION, read_package
from segment.inference.predictor import Predictor
from segment.run_folder import read_checkpoint, resolve_checkpoint
from tests.test_predict_cli import _scan, make_checkpoint

runner = CliRunner()
PACKAGE = ("model.safetensors", "model.json", "model_card.md", "model.onnx")
PROFILE = {"cases": 3, "percentiles_q": [1.0, 50.0, 99.0],  # segment.data.profile.scan_profile's form
           "percentiles": {"min": [0.0, 40.0, 90.0], "max": [2.0, 60.0, 110.0]},
           "spacing": {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]},
           "extent_mm": {"min": [32.0, 32.0, 16.0], "max": [32.0, 32.0, 16.0]}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, package) of a tiny random-weight model in a run folder with a split and a summary."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "run" / "checkpoints" / "best.ckpt", classes=3)
    (root / "run" / "split.json").write_text(json.dumps({"train": ["a", "b", "c"], "val": ["d"]}))
    (root / "run" / "summary.json").write_text(json.dumps({
        "steps": 12, "seconds": 3.5, "val_dice": {"val_dice_organ1": 0.625, "val_dice_organ2": 0.5},
        "best_val_dice_mean": 0.5625, "best_checkpoint": "/somewhere/private/best.ckpt"}))
    (root / "run" / "confidence.json").write_text(json.dumps({"threshold": 0.6875, "quantile": 0.1, "cases": 1}))
    (root / "run" / "scan_profile.json").write_text(json.dumps(PROFILE))
    result = runner.invoke(app, ["export", str(root / "run"), "-o", str(root / "pkg"), "--license", "CC-BY-4.0"])
    assert result.exit_code == 0, result.output
    return ckpt, root / "pkg"


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_package_files_and_model_json_round_trip(exported: tuple[Path, Path]) -> None:
    ckpt, pkg = exported
    assert sorted(p.name for p in pkg.iterdir()) == sorted(PACKAGE)
    meta = json.loads((pkg / "model.json").read_text())
    hp = read_checkpoint(ckpt)["hyper_parameters"]
    assert meta["format"] == "segment-model" and meta["format_version"] == FORMAT_VERSION and meta["segment_version"]
    assert Config.model_validate(meta["config"]) == Config.model_validate(hp["config"])
    assert Plan.from_dict(meta["plan"]) == Plan.from_dict(hp["plan"])
    assert meta["labels"] == [{"class": 0, "value": 0, "name": "background"}, {"class": 1, "value": 1, "name": "organ1"},
                              {"class": 2, "value": 2, "name": "organ2"}]
    pre = meta["preprocessing"]
    assert pre["spacing_mm"] == [1.0, 1.0, 1.0] and pre["mirror_axes"] == [0, 1, 2]
    assert pre["channels"] == [{"channel": 0, "normalisation": "zscore", "formula": pre["channels"][0]["formula"]}]
    assert meta["input"]["shape"] == ["batch", 1, 32, 32, 16] and meta["output"]["shape"] == ["batch", 3, 32, 32, 16]
    assert meta["intended_use"] == "research use; not a medical device" and meta["license"] == "CC-BY-4.0"
    assert meta["training"]["split"] == {"train": 3, "val": 1}
    assert "best_checkpoint" not in meta["training"]["summary"]  # a local path is not shared
    # predict from the package flags as from the run: the same threshold and the same out-of-distribution profile
    assert meta["training"]["confidence"]["threshold"] == 0.6875 and meta["training"]["scan_profile"] == PROFILE
    from_pkg, from_run = Predictor.from_checkpoint(pkg, "cpu"), Predictor.from_checkpoint(ckpt.parent.parent, "cpu")
    assert from_pkg.threshold == from_run.threshold == 0.6875
    assert from_pkg.profile == from_run.profile == PROFILE
    card = (pkg / "model_card.md").read_text()
    for text in ("research use; not a medical device", "CC-BY-4.0", "3 training / 1 validation", "0.5625",
                 "val_dice_organ1", "| 2 | 2 | organ2 |", "[1.0, 1.0, 1.0] mm"):
        assert text in card, text
    assert "/somewhere/private" not in card


def test_package_holds_no_pickle(exported: tuple[Path, Path]) -> None:
    _, pkg = exported
    for path in pkg.iterdir():
        data = path.read_bytes()
        assert b"_rebuild_tensor" not in data and b"torch._utils" not in data, path.name  # torch.save's pickle
        assert not data.startswith(b"PK\x03\x04"), path.name  # torch.save's zip container
        if path.name == "model.safetensors":  # 8-byte header length (which may start with 0x80), then a JSON header
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + size])
            assert header["__metadata__"]["format"] == "pt" and len(header) > 1
        else:
            assert not data.startswith(b"\x80"), path.name  # pickle protocol 2+


def test_predict_from_package_gives_the_checkpoints_labels(exported: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, pkg = exported
    scan = _scan(tmp_path / "scan.nii.gz", (22, 19, 13), seed=4)
    outs = {}
    for name, model in (("ckpt", ckpt), ("pkg", pkg)):
        out = tmp_path / f"{name}_seg.nii.gz"
        result = runner.invoke(app, ["predict", str(scan), "-m", str(model), "--device", "cpu", "-o", str(out),
                                     "--precision", "32"])
        assert result.exit_code == 0, result.output
        outs[name] = np.asarray(nib.load(out).dataobj)
    assert outs["pkg"].shape == (22, 19, 13)
    assert len(np.unique(outs["ckpt"])) > 1  # a test that compares two constant maps would prove nothing
    np.testing.assert_array_equal(outs["pkg"], outs["ckpt"])

    assert resolve_checkpoint(pkg) == pkg

    def no_pickles(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model package must not be read with torch.load")

    monkeypatch.setattr(torch, "load", no_pickles)
    predictor = Predictor.from_checkpoint(pkg, "cpu", precision="32")
    assert predictor.label_names == {0: "background", 1: "organ1", 2: "organ2"}


def test_onnxruntime_matches_torch(exported: tuple[Path, Path]) -> None:
    """Same logits from onnxruntime and torch on a random input of one planned patch: atol 1e-4 in fp32."""
    import onnx
    import onnxruntime

    _, pkg = exported
    onnx.checker.check_model(str(pkg / "model.onnx"))
    model, plan, _ = read_package(pkg)
    x = torch.randn(2, plan.channels, *plan.patch_size, generator=torch.Generator().manual_seed(1))  # batch 2: dynamic
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    session = onnxruntime.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    assert got.shape == expected.shape == (2, 3, 32, 32, 16)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_other_format_version_is_one_line(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, pkg = exported
    other = tmp_path / "newer"
    shutil.copytree(pkg, other)
    meta = json.loads((other / "model.json").read_text())
    meta["format_version"] = 2
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="model.json format 2, this segment reads format 1"):
        read_package(other)
    scan = _scan(tmp_path / "scan.nii.gz")
    line = _one_line_error(runner.invoke(app, ["predict", str(scan), "-m", str(other), "--device", "cpu"]))
    assert "model.json format 2, this segment reads format 1" in line
    assert not (tmp_path / "scan_seg.nii.gz").exists()


def test_changed_weights_are_one_line(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, pkg = exported
    other = tmp_path / "changed"
    shutil.copytree(pkg, other)
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (other / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the SHA-256"):
        read_package(other)


def test_existing_target_needs_overwrite_and_keeps_foreign_files(exported: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, pkg = exported
    target = tmp_path / "pkg"
    shutil.copytree(pkg, target)
    before = _digests(target)
    line = _one_line_error(runner.invoke(app, ["export", str(ckpt), "-o", str(target), "--no-onnx"]))
    assert "exists" in line and "--overwrite" in line
    assert _digests(target) == before

    (target / "notes.txt").write_text("mine")
    line = _one_line_error(runner.invoke(app, ["export", str(ckpt), "-o", str(target), "--overwrite", "--no-onnx"]))
    assert "notes.txt" in line
    assert _digests(target) == {**before, "notes.txt": hashlib.sha256(b"mine").hexdigest()}

    (target / "notes.txt").unlink()
    replaced = runner.invoke(app, ["export", str(ckpt), "-o", str(target), "--overwrite", "--no-onnx",
                                   "--intended-use", "teaching"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.safetensors", "model_card.md"]
    assert json.loads((target / "model.json").read_text())["intended_use"] == "teaching"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_run_without_checkpoints_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    line = _one_line_error(runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "pkg")]))
    assert "no checkpoints/best.ckpt" in line
    assert not (tmp_path / "pkg").exists()


def test_the_package_does_not_carry_the_training_machines_paths(tmp_path: Path) -> None:
    import json

    from segment.config import Config
    from segment.inference.export import manifest
    from segment.inference.loading import load_checkpoint
    from tests.test_predict_cli import make_checkpoint

    model, plan, config = load_checkpoint(make_checkpoint(tmp_path / "m.ckpt"))
    config = Config.model_validate({**config.model_dump(mode="json"),
                                    "data": {**config.model_dump(mode="json")["data"], "root": "/hospital/secret/study"}})
    text = json.dumps(manifest(model, plan, config))
    assert "/hospital/secret" not in text
