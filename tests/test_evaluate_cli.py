"""`segment evaluate` through the CLI on a tiny trained run: CSV contents, split choice, no overwrite, user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segment.cli import app
from segment.evaluation.evaluate import free_path

TINY = ["model.features=[4,8]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
        "train.max_epochs=1", "train.accelerator=cpu", "train.precision=32", "train.threads=1",
        "data.target_spacing=[3,3,3]", "predict.precision=32", "data.val_fraction=0.5"]
COLUMNS = {"case", "class", "name", "dice", "hd95", "assd", "nsd", "ref_voxels", "pred_voxels"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from segment.config import load_config
    from segment.data.demo import make_demo_dataset
    from segment.train.runner import train

    root = tmp_path_factory.mktemp("evalcli")
    data = make_demo_dataset(root / "data", n_cases=4, progress=False)
    train(load_config(None, TINY + [f"data.root={data}"]), output=root / "run")
    return root / "run", data


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, ["evaluate", *args])


def test_evaluate_writes_one_row_per_val_case_and_class(trained: tuple[Path, Path]) -> None:
    run, data = trained
    result = _invoke("--model", str(run), "--data", str(data), "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = _rows(run / "evaluation-val.csv")
    val = json.loads((run / "split.json").read_text())["val"]
    assert {(r["case"], r["name"]) for r in rows} == {(c, n) for c in val for n in ("organ", "lesion")}
    assert len(rows) == 2 * len(val) and COLUMNS <= set(rows[0])
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0
        assert r["hd95"] == "" or float(r["hd95"]) >= 0.0  # empty = undefined distance (one mask empty)
    assert "Dice" in result.output and "evaluation-val.csv" in result.output
    assert "optimistic" not in result.output  # an ordinary run's validation cases were never trained on


def test_evaluate_val_of_a_train_on_all_run_says_the_scores_are_optimistic(tmp_path: Path) -> None:
    from segment.config import load_config
    from segment.data.demo import make_demo_dataset
    from segment.train.runner import train

    data = make_demo_dataset(tmp_path / "data", n_cases=4, progress=False)
    train(load_config(None, TINY + [f"data.root={data}", "data.train_on_all=true"]), output=tmp_path / "run")
    result = _invoke("--model", str(tmp_path / "run"), "--data", str(data), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "data.train_on_all=true" in result.output and "optimistic" in result.output
    result = _invoke("--model", str(tmp_path / "run"), "--data", str(data), "--split", "all", "--device", "cpu")
    assert result.exit_code == 0 and "optimistic" not in result.output


def test_evaluate_split_train_scores_exactly_the_training_cases(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    result = _invoke("--model", str(run), "--data", str(data), "--split", "train", "--device", "cpu")
    assert result.exit_code == 0, result.output
    split = json.loads((run / "split.json").read_text())
    cases = {r["case"] for r in _rows(run / "evaluation-train.csv")}
    assert cases == set(split["train"]) and not cases & set(split["val"])
    assert "train case(s)" in result.output
    # a bare checkpoint has no split.json: its training cases are unknown, said in one line
    ckpt = shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    result = _invoke("--model", str(ckpt), "--data", str(data), "--split", "train", "--device", "cpu")
    assert result.exit_code == 2 and "training cases are unknown" in result.output


def test_evaluate_never_overwrites_and_tolerance_widens_nsd(trained: tuple[Path, Path]) -> None:
    run, data = trained
    out = run / "tol.csv"
    for tol in ("1", "50"):
        result = _invoke("--model", str(run), "--data", str(data), "-o", str(out), "--tolerance", tol,
                         "--device", "cpu")
        assert result.exit_code == 0, result.output
    narrow, wide = _rows(out), _rows(run / "tol-2.csv")  # the second run did not replace the first file
    assert [(r["case"], r["name"]) for r in narrow] == [(r["case"], r["name"]) for r in wide]
    assert all(float(w["nsd"]) >= float(n["nsd"]) for n, w in zip(narrow, wide))
    assert any(float(w["nsd"]) > float(n["nsd"]) for n, w in zip(narrow, wide)) or all(
        float(n["nsd"]) in (0.0, 1.0) for n in narrow)


def test_evaluate_bare_checkpoint_needs_split_all(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    ckpt = shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    result = _invoke("--model", str(ckpt), "--data", str(data), "--device", "cpu")
    assert result.exit_code == 2 and "--split all" in result.output
    result = _invoke("--model", str(ckpt), "--data", str(data), "--split", "all", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(_rows(tmp_path / "evaluation-all.csv")) == 4 * 2  # every case x (organ, lesion)


@pytest.mark.parametrize("args, words", [
    (["--model", "{tmp}/no_such_run"], "no_such_run"),
    (["--model", "{run}", "--split", "test"], "--split 'test': expected one of val, train, all"),
    (["--model", "{run}", "--tolerance", "0"], "--tolerance"),
])
def test_evaluate_user_errors_exit_2_and_name_the_problem(trained: tuple[Path, Path], tmp_path: Path, args: list[str],
                                                          words: str) -> None:
    run, data = trained
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    result = _invoke(*args, "--data", str(data), "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output


def test_free_path_adds_a_number(tmp_path: Path) -> None:
    target = tmp_path / "evaluation-val.csv"
    assert free_path(target) == target
    target.write_text("x")
    (tmp_path / "evaluation-val-2.csv").write_text("x")
    assert free_path(target) == tmp_path / "evaluation-val-3.csv"
