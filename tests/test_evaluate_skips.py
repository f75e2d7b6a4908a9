"""`segment evaluate` with bad or mismatched input: every bad case skipped in one line and the rest scored, validation
cases missing from --data counted, label names compared with the model's, and -o checked before any case is scored.

The model is a stand-in (it reads the class from the intensity: image = 100 x label + noise), so these tests need no
training and the expected scores are exact; reading, pairing, checking and scoring are the real ones.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from segment.cli import app
from segment.config import EvaluateConfig
from segment.errors import InputError
from segment.evaluation import evaluate
from segment.io.dataset import discover

MODEL_LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}
SHAPE = (12, 12, 12)


class StandIn:
    """A predictor whose prediction is the class encoded in the image (exact on clean cases)."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.plan = SimpleNamespace(labels=labels, label_values=None)
        self.config = SimpleNamespace(model=SimpleNamespace(out_channels=len(labels)),
                                      data=SimpleNamespace(train_on_all=False), evaluate=EvaluateConfig())
        self.calls = 0

    def predict_labels(self, channels: list[np.ndarray], geometry: object) -> tuple[np.ndarray]:
        self.calls += 1
        return (np.clip(np.rint(channels[0] / 100), 0, len(self.plan.labels) - 1).astype(np.uint8),)


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[7:11, 6:10, 5:9] = 2
    return label


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.0, 1.0, 1.0])), path)


def make_data(root: Path, names: list[str], labels: dict[int, str] | None = None) -> Path:
    """MSD layout: imagesTr/NAME.nii.gz (100 x label + noise) and labelsTr/NAME.nii.gz, dataset.json with `labels`."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"modality": {"0": "MRI"}, "labels": {str(k): v for k, v in (labels or MODEL_LABELS).items()}}
    (root / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for name in names:
        _save((100.0 * _label() + rng.random(SHAPE)).astype(np.float32), root / "imagesTr" / f"{name}.nii.gz")
        _save(_label(), root / "labelsTr" / f"{name}.nii.gz")
    return root


@pytest.fixture()
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A run folder (split.json, a checkpoint file) whose model is the stand-in."""
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "best.ckpt").write_bytes(b"stand-in")
    model = StandIn(MODEL_LABELS)
    loads: list[Path] = []

    def load(ckpt: Path, device: str = "auto") -> StandIn:
        loads.append(ckpt)
        return model

    monkeypatch.setattr(evaluate, "load_predictor", load)

    def split(val: list[str], train: list[str] = ()) -> None:
        (folder / "split.json").write_text(json.dumps({"train": list(train), "val": val}))

    split([])
    return SimpleNamespace(path=folder, model=model, loads=loads, split=split)


def _invoke(*args: str) -> tuple[object, list[str], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["evaluate", *args, "--device", "cpu"])
    return result, result.output.splitlines(), [w for w in caught if issubclass(w.category, UserWarning)]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _lines_naming(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


def test_every_bad_case_is_skipped_in_one_line_and_the_others_are_scored(
        run: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_data(tmp_path / "data", ["good1", "good2", "trunc", "nan", "grid", "half"])
    trunc = data / "imagesTr" / "trunc.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])  # header intact, voxels cut off
    image = (100.0 * _label()).astype(np.float32)
    image[0, 0, 0] = np.nan
    _save(image, data / "imagesTr" / "nan.nii.gz")
    _save(_label()[:-1], data / "labelsTr" / "grid.nii.gz")
    _save(_label().astype(np.float32) * 0.5, data / "labelsTr" / "half.nii.gz")
    (data / "imagesTr" / "lonely.nii.gz").write_bytes((data / "imagesTr" / "good1.nii.gz").read_bytes())
    out = tmp_path / "scores.csv"
    with caplog.at_level(logging.WARNING):
        result, lines, caught = _invoke("--model", str(run.path), "--data", str(data), "--split", "all", "-o", str(out))

    assert result.exit_code == 1, result.output  # like predict: some cases failed, the others are done
    assert "Traceback" not in result.output and "UserWarning" not in result.output
    for path, problem in [(trunc, "not a readable NIfTI image"), (data / "imagesTr" / "nan.nii.gz", "NaN"),
                          (data / "labelsTr" / "grid.nii.gz", "voxel grid"),
                          (data / "labelsTr" / "half.nii.gz", "non-integer values")]:
        named = _lines_naming(lines, str(path))
        assert len(named) == 1 and named[0].startswith("skipping ") and problem in named[0], (path, result.output)
    assert _lines_naming(lines, "lonely.nii.gz") == [
        f"warning: {data}: 1 files without a partner, left out: lonely.nii.gz"]
    assert lines[-1] == "2 of 6 all case(s) scored; 4 skipped (see the skipping lines above)"
    rows = _rows(out)
    assert {(r["case"], r["name"]) for r in rows} == {(c, n) for c in ("good1", "good2")
                                                      for n in ("Anterior", "Posterior")}
    assert all(float(r["dice"]) == 1.0 and float(r["nsd"]) == 1.0 for r in rows)
    # nothing besides those lines: no raw Python warning and no second copy through the discovery logger
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if "skipping" in r.getMessage()]


def test_no_case_left_to_score_is_one_error_line_and_no_csv(run: SimpleNamespace, tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", ["a", "b"])
    for name in ("a", "b"):
        path = data / "imagesTr" / f"{name}.nii.gz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "scores.csv"
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "--split", "all", "-o", str(out))
    assert result.exit_code == 2, result.output
    assert len(_lines_naming(lines, "not a readable NIfTI image")) == 2
    assert lines[-1] == (f"error: {data}: no case could be scored (0 of 2 all case(s) scored; 2 skipped (see the "
                         "skipping lines above))")
    assert not out.exists()


def test_val_cases_missing_from_data_are_named_and_the_summary_counts_them(run: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    run.split(["a", "b", "gone"], train=["t"])
    data = make_data(tmp_path / "data", ["a", "b", "t"])
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(tmp_path / "val.csv"))
    assert result.exit_code == 0, result.output  # nothing is wrong with the data: a subset was given
    missing = f"warning: 1 of 3 validation case(s) of {run.path} not found in --data {data}: gone"
    assert _lines_naming(lines, "gone") == [missing]
    assert lines[-1] == "2 of 3 val case(s) scored; 1 not in --data"
    assert {r["case"] for r in _rows(tmp_path / "val.csv")} == {"a", "b"}


def test_a_bad_val_case_is_skipped_and_counted_and_a_bad_train_case_is_not_mentioned(
        run: SimpleNamespace, tmp_path: Path) -> None:
    run.split(["a", "b"], train=["t", "u"])
    data = make_data(tmp_path / "data", ["a", "b", "t", "u"])
    _save(_label()[:-1], data / "labelsTr" / "b.nii.gz")
    _save(_label()[:-1], data / "labelsTr" / "t.nii.gz")
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(tmp_path / "val.csv"))
    assert result.exit_code == 1, result.output
    assert len(_lines_naming(lines, "b.nii.gz")) == 1 and not _lines_naming(lines, "t.nii.gz")
    assert lines[-1] == "1 of 2 val case(s) scored; 1 skipped (see the skipping lines above)"
    # every validation case unusable: one line saying so, not 'not in this dataset'
    _save(_label()[:-1], data / "labelsTr" / "a.nii.gz")
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(tmp_path / "val2.csv"))
    assert result.exit_code == 2, result.output
    assert lines[-1] == (f"error: {data}: none of the 2 validation cases of {run.path} can be scored: 2 left out as "
                         "unusable")


def test_labels_that_differ_from_the_models_are_named_in_one_warning(run: SimpleNamespace, tmp_path: Path) -> None:
    run.split(["a"])
    swapped = {0: "background", 1: "Posterior", 2: "Anterior", 3: "Tail"}
    data = make_data(tmp_path / "data", ["a"], labels=swapped)
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(tmp_path / "val.csv"))
    assert result.exit_code == 0, result.output
    assert _lines_naming(lines, "labels differ") == [(
        f"warning: {data / 'dataset.json'}: labels differ from the model's: value 3 (Tail) not a class of the model "
        "(not scored); names differ: 1 Posterior (model: Anterior), 2 Anterior (model: Posterior); scores are by "
        "label value, under the model's names")]
    assert {r["name"]: float(r["dice"]) for r in _rows(tmp_path / "val.csv")} == {"Anterior": 1.0, "Posterior": 1.0}
    # the same labels as the model's: no warning
    same = make_data(tmp_path / "same", ["a"])
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(same), "-o", str(tmp_path / "same.csv"))
    assert result.exit_code == 0 and not _lines_naming(lines, "labels differ"), result.output


def test_label_differences_name_what_differs() -> None:
    model = {0: "background", **{i: f"class_{i}" for i in range(1, 51)}}
    data = {0: "background", 1: "class_1", 2: "Class_2 "}  # case and spaces are no difference
    assert evaluate.label_differences(data, model) == [(
        "the model's classes 3 (class_3), 4 (class_4), 5 (class_5), 6 (class_6), ... (48 in all) not declared here "
        "(no reference voxels in any case)")]
    assert evaluate.label_differences({0: "background", 1: "a", 4: "b", 5: "c"}, {0: "bg", 1: "A", 2: "x"}) == [
        "values 4 (b), 5 (c) not a class of the model (not scored)",  # background's name is no difference: not scored
        "the model's class 2 (x) not declared here (no reference voxels in any case)"]
    assert evaluate.label_differences({0: "background", 1: "Left", 2: "Right"}, {0: "bg", 1: "Right", 2: "Left"}) == [
        "names differ: 1 Left (model: Right), 2 Right (model: Left)"]
    # labels inferred from the values found (no dataset.json): only values the model has no class for count
    assert evaluate.label_differences({0: "background", 1: "class_1", 7: "class_7"}, MODEL_LABELS, declared=False) == [
        "value 7 not a class of the model (not scored)"]
    assert evaluate.label_differences(dict(MODEL_LABELS), MODEL_LABELS) == []


def test_output_folder_gets_the_default_name_inside_it(run: SimpleNamespace, tmp_path: Path) -> None:
    run.split(["a"])
    data = make_data(tmp_path / "data", ["a"])
    folder = tmp_path / "results"
    folder.mkdir()
    for expected in ("evaluation-val.csv", "evaluation-val-2.csv"):  # the second run never replaces the first
        result, _, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(folder))
        assert result.exit_code == 0, result.output
        assert f"per-case metrics: {folder / expected}" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["evaluation-val-2.csv", "evaluation-val.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "results", "run"]  # no 'results-2' beside it


@pytest.mark.parametrize("target, words", [
    ("scores.nii.gz", "-o {tmp}/scores.nii.gz: expected a .csv file or an existing folder (for evaluation-val.csv)"),
    ("notes.txt/scores.csv", "-o {tmp}/notes.txt/scores.csv: cannot write there: {tmp}/notes.txt is not a folder"),
])
def test_bad_output_path_is_one_line_before_anything_is_scored(run: SimpleNamespace, tmp_path: Path, target: str,
                                                               words: str) -> None:
    run.split(["a"])
    data = make_data(tmp_path / "data", ["a"])
    (tmp_path / "notes.txt").write_text("mine")
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(tmp_path / target))
    assert result.exit_code == 2, result.output
    assert lines == [f"error: {words.format(tmp=tmp_path)}"]
    assert not run.loads and not run.model.calls  # refused before the model was even loaded
    assert not (tmp_path / target).exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_unwritable_output_folder_is_one_line_before_anything_is_scored(run: SimpleNamespace, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run.split(["a"])
    data = make_data(tmp_path / "data", ["a"])

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(evaluate.tempfile, "TemporaryFile", refuse)  # as for a read-only folder (tests may run as root)
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(tmp_path / "out" / "s.csv"))
    assert result.exit_code == 2, result.output
    assert lines == [f"error: -o {tmp_path / 'out' / 's.csv'}: cannot write in {tmp_path} (Permission denied)"]
    result, lines, _ = _invoke("--model", str(run.path), "--data", str(data))  # the default: beside the model
    assert lines == [(f"error: {run.path / 'evaluation-val.csv'}: cannot write in {run.path} (Permission denied); "
                      "choose another CSV path with -o")]
    assert not run.loads and not run.model.calls


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write in any folder")
def test_read_only_output_folder_is_refused(run: SimpleNamespace, tmp_path: Path) -> None:
    run.split(["a"])
    data = make_data(tmp_path / "data", ["a"])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result, lines, _ = _invoke("--model", str(run.path), "--data", str(data), "-o", str(locked / "s.csv"))
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2
    assert lines == [f"error: -o {locked / 's.csv'}: cannot write in {locked} (Permission denied)"]


def test_score_cases_without_skipped_still_raises(tmp_path: Path) -> None:
    """Library callers (ablate, benchmarks) that pass no `skipped` dict keep seeing the error itself."""
    data = make_data(tmp_path / "data", ["a"])
    path = data / "imagesTr" / "a.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases = discover(data).cases
    with pytest.raises(InputError, match="not a readable NIfTI image"):
        evaluate.score_cases(StandIn(MODEL_LABELS), cases, EvaluateConfig())
    skipped: dict[str, str] = {}
    assert evaluate.score_cases(StandIn(MODEL_LABELS), cases, EvaluateConfig(), skipped=skipped) == []
    assert list(skipped) == ["a"] and str(path) in skipped["a"]
