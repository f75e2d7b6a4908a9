"""Command-line options keep their type: `--data 2024` is a folder, `--max-time 45` is 45 minutes; only --set parses YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from segment.cli import app
from segment.config import parse_duration

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `segment train` up to the runner, capturing what it would train with instead of training."""
    import segment.train.runner

    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, output: Any = None, resume: bool = False, **kwargs: Any) -> None:
        seen.update(cfg=cfg, output=output, resume=resume, **kwargs)

    monkeypatch.setattr(segment.train.runner, "train", fake_train)
    return seen


def _train(seen: dict[str, Any], *args: str) -> Any:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return seen["cfg"]


@pytest.mark.parametrize("name", ["2024", "null", "none", "true", "1e3", "[a]"])
def test_data_is_a_path_whatever_it_looks_like(captured: dict, name: str) -> None:
    assert _train(captured, "--data", name).data.root == Path(name)


@pytest.mark.parametrize("text, seconds", [
    ("45", 45 * 60), ("1.5h", 5400), ("90s", 90), ("2d", 2 * 86400),
    ("1:30:00", 5400), ("01:30:00", 5400), ("00:01:00:30", 3630),
])
def test_max_time_formats(captured: dict, text: str, seconds: float) -> None:
    cfg = _train(captured, "--data", "d", "--max-time", text)
    assert cfg.train.max_time == text and parse_duration(cfg.train.max_time) == seconds


def test_max_time_help_lists_the_formats() -> None:
    import re

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    text = re.sub(r"[\s│]+", " ", result.output)
    assert "HH:MM:SS" in text and "DD:HH:MM:SS" in text and "45 (= minutes)" in text


@pytest.mark.parametrize("text", ["lots", "1:75:00", "0", "10 minutes"])
def test_bad_max_time_is_one_line(captured: dict, text: str) -> None:
    result = runner.invoke(app, ["train", "--data", "d", "--max-time", text])
    assert result.exit_code == 2 and "train.max_time" in result.output and "Traceback" not in result.output
    assert "cfg" not in captured


def test_typed_options(captured: dict) -> None:
    cfg = _train(captured, "--data", "d", "--seed", "7", "--skips", "[0,1]", "--devices", "2", "--precision", "32",
                 "--fold", "2", "--max-epochs", "3", "--accelerator", "cpu", "--num-nodes", "1")
    assert (cfg.seed, cfg.model.skip_connections, cfg.train.devices, cfg.train.precision) == (7, [0, 1], 2, "32")
    assert (cfg.data.fold, cfg.train.max_epochs, cfg.train.accelerator) == (2, 3, "cpu")
    assert _train(captured, "--data", "d", "--skips", "none", "--devices", "auto").model.skip_connections == "none"
    assert captured["cfg"].train.devices == "auto"


def test_only_set_parses_yaml_and_options_come_after_it(captured: dict) -> None:
    cfg = _train(captured, "--data", "d", "--set", "train.max_epochs=5", "--set", "train.max_time=2h",
                 "--set", "model.skip_connections=[0]")
    assert (cfg.train.max_epochs, cfg.train.max_time, cfg.model.skip_connections) == (5, "2h", [0])
    assert _train(captured, "--data", "d", "--set", "train.max_epochs=5", "--max-epochs", "7").train.max_epochs == 7
    assert _train(captured, "--data", "d", "--set", "train.max_time=45").train.max_time == "45"  # YAML 45: minutes
    # --set still means YAML: data.root=null is "no data" (the demo), unlike --data null
    assert _train(captured, "--set", "data.root=null", "--set", "train.max_epochs=2").data.root is None


def test_bad_option_value_names_the_key(captured: dict) -> None:
    result = runner.invoke(app, ["train", "--data", "d", "--skips", "[9]"])
    assert result.exit_code == 2 and "command line: model" in result.output
    result = runner.invoke(app, ["train", "--data", "d", "--skips", "some"])
    assert result.exit_code == 2 and "--skips 'some'" in result.output


def test_resume_passes_only_what_was_given(captured: dict, tmp_path: Path) -> None:
    _train(captured, "--resume", "-o", str(tmp_path))
    assert captured["resume"] is True and captured["given"] == {}
    _train(captured, "--resume", "-o", str(tmp_path), "--max-epochs", "8", "--set", "train.lr=0.01", "--max-time", "45")
    assert captured["given"] == {"train.max_epochs": 8, "train.lr": 0.01, "train.max_time": "45"}
    _train(captured, "--data", "d")
    assert captured["given"] is None  # a new run: the whole config


@pytest.mark.parametrize("args, says", [
    (["--resume"], "--resume needs --output"),
    (["--resume", "-o", "x", "--config", "c.yaml"], "leave out --config"),
    (["--resume", "-o", "x", "--split", "s.json"], "leave out --split"),
])
def test_resume_misuse_is_one_line(captured: dict, args: list[str], says: str) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2 and says in result.output and "cfg" not in captured


def test_ablate_data_is_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import segment.experiments.ablate

    seen: dict[str, Any] = {}
    monkeypatch.setattr(segment.experiments.ablate, "run_ablation", lambda cfg, **kw: seen.update(cfg=cfg))
    result = runner.invoke(app, ["ablate", "--data", "2024"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].data.root == Path("2024")


def test_fold_out_of_range_is_one_line_before_anything_starts(captured: dict) -> None:
    result = runner.invoke(app, ["train", "--fold", "7"])
    assert result.exit_code == 2 and "cfg" not in captured and "Traceback" not in result.output
    assert "fold 7 does not exist with folds=5: fold must be in 0..4" in result.output
    assert _train(captured, "--fold", "4", "--set", "data.folds=5").data.fold == 4


def test_a_path_we_may_not_use_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder we may not read or write (or a full disk) is the path and the reason, exit 2; an OSError without a
    path is a bug and keeps its traceback."""
    import segment.train.runner

    def denied(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", "ro/run")

    monkeypatch.setattr(segment.train.runner, "train", denied)
    result = runner.invoke(app, ["train", "-o", "ro/run"])
    assert result.exit_code == 2 and result.output.strip() == "error: ro/run: Permission denied", result.output

    def bug(*args: Any, **kwargs: Any) -> None:
        raise OSError("no path in it")

    monkeypatch.setattr(segment.train.runner, "train", bug)
    result = runner.invoke(app, ["train", "-o", "ro/run"])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)
