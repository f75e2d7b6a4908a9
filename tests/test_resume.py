"""`segment train --resume` continues a run exactly as it was started, even after the process was killed."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from segment.cli import app
from segment.config import load_config
from segment.data.demo import make_demo_dataset
from segment.errors import ConfigError
from segment.run_folder import RunFolder
from segment.train.resume import resumed_config
from segment.train.runner import train
from tests.test_train import TINY as TRAIN_TINY

TINY = [o for o in TRAIN_TINY if not o.startswith("train.steps_per_epoch")] + ["train.accelerator=cpu"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=4, seed=3, progress=False)


def _rows(run: Path, path: str = "metrics.csv") -> list[dict]:
    return list(csv.DictReader((run / path).open(encoding="utf-8")))


def test_resumed_config_changes_only_what_was_given(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.write_config(load_config(overrides=["train.max_epochs=4", "train.max_time=2h", "seed=3"]))
    out = io.StringIO()
    log = Console(file=out, width=200)
    assert resumed_config(run, {}, console=log).train.max_epochs == 4 and out.getvalue() == ""
    cfg = resumed_config(run, {"train.max_epochs": 8, "train.max_time": "2h", "data.num_workers": 2}, console=log)
    assert (cfg.train.max_epochs, cfg.train.max_time, cfg.data.num_workers, cfg.seed) == (8, "2h", 2, 3)
    lines = out.getvalue().splitlines()
    assert lines == ["--resume: max_epochs 4 -> 8 (given on the command line)", "--resume: data.num_workers 0 -> 2 "
                     "(given on the command line)"]
    with pytest.raises(ConfigError, match="model.features cannot change"):
        resumed_config(run, {"model.features": [8, 16]})
    with pytest.raises(ConfigError, match=r"--resume: train\.max_epochs"):
        resumed_config(run, {"train.max_epochs": 0})


def test_resume_keeps_the_runs_values_and_changes_only_what_is_given(tiny_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    train(load_config(overrides=[f"data.root={tiny_data}", *TINY, "train.steps_per_epoch=2", "train.max_epochs=1"]),
          output=out)
    defaults = load_config()  # max_epochs 50: what the command line holds before it knows the run
    assert train(defaults, output=out, resume=True, given={}).steps == 2  # the run's own max_epochs=1: done
    assert "--resume:" not in capsys.readouterr().err
    assert train(defaults, output=out, resume=True, given={"train.max_epochs": 2}).steps == 4
    assert "--resume: max_epochs 1 -> 2 (given on the command line)" in capsys.readouterr().err
    # every part logs into its own folder, also after a part that logged nothing
    assert [p.parent.name for p in RunFolder(out).metric_logs()] == ["logs", "resume2"]


def test_a_folder_that_is_not_a_run_is_one_line(tiny_data: Path, tmp_path: Path) -> None:
    from segment.data.plan import make_plan
    from segment.io.dataset import discover

    runner = CliRunner()
    empty = runner.invoke(app, ["train", "--resume", "-o", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "nothing to resume" in empty.output and "Traceback" not in empty.output
    run = RunFolder(tmp_path / "broken").create(resume=False)
    cfg = load_config(overrides=[f"data.root={tiny_data}", *TINY])
    run.write_config(cfg)
    run.write_plan(make_plan(discover(tiny_data), cfg, device="cpu")[0])
    run.write_split({"train": ["demo_000", "demo_001", "demo_002"], "val": ["demo_003"]})
    run.checkpoint_dir.mkdir()
    run.last_checkpoint.write_bytes(b"not a checkpoint")
    broken = runner.invoke(app, ["train", "--resume", "-o", str(run.path)])
    assert broken.exit_code == 2 and "last.ckpt: not a segment checkpoint" in broken.output
    assert len(broken.output.strip().splitlines()) == 1


def test_time_budget_counts_every_part_and_the_lr_schedule_continues(tiny_data: Path, tmp_path: Path) -> None:
    """A time-limited run resumed with a longer budget: the time already spent counts, for the stop and for the LR."""
    out, lr = tmp_path / "run", 0.01
    base = [f"data.root={tiny_data}", *TINY, "train.steps_per_epoch=3", "train.max_epochs=1000", f"train.lr={lr}"]
    first = train(load_config(overrides=[*base, "train.max_time=3s"]), output=out)
    spent = torch.load(first.last_checkpoint, weights_only=True)["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert spent >= 3
    resumed = train(load_config(overrides=[*base, "train.max_time=6s"]), output=out, resume=True)
    assert resumed.steps > first.steps
    total = torch.load(resumed.last_checkpoint, weights_only=True)["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert 6 <= total < 6 + (spent - 3) + 5  # the budget covers both parts, not 6 s more
    after = [float(r["lr"]) for r in _rows(out, "logs/resume1/metrics.csv") if r.get("lr")]
    # poly schedule at progress >= spent/6 >= 0.5: lr <= 0.536 * peak; a clock restarted at resume gives ~peak
    assert after and max(after) < 0.6 * lr


def _cli_train(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen([sys.executable, "-m", "segment.cli", "train", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)


def _epoch(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not there yet
        return -1


def _per_step(run: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in _rows(run) if r.get(key)}


@pytest.mark.slow
def test_killed_run_resumes_exactly_like_an_uninterrupted_one(tiny_data: Path, tmp_path: Path) -> None:
    """SIGKILL after epoch 1, `--resume -o RUN` with no other option: same steps, LRs, losses and weights as one run.

    (`configs/default.yaml` says max_epochs 50: a resumed run must keep its own 5.)
    """
    args = ["--data", str(tiny_data), *[a for kv in TINY for a in ("--set", kv)], "--set", "train.steps_per_epoch=3",
            "--max-epochs", "5", "--set", "seed=5"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    a = _cli_train([*args, "-o", str(whole)], tmp_path / "whole.log")
    b = _cli_train([*args, "-o", str(killed)], tmp_path / "killed.log")
    ckpt = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while _epoch(ckpt) < 1 and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text(encoding="utf-8", errors="replace")
    os.kill(b.pid, signal.SIGKILL)
    b.wait()
    assert b.returncode == -signal.SIGKILL and 1 <= _epoch(ckpt) < 4
    assert a.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text(encoding="utf-8", errors="replace")

    resumed = _cli_train(["--resume", "-o", str(killed)], tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text(encoding="utf-8", errors="replace")
    done, ref = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (killed, whole))
    assert (done["epoch"], done["global_step"]) == (ref["epoch"], ref["global_step"]) == (4, 15)
    for key in ("lr", "train_loss_step", "train_loss", "val_dice_mean"):
        assert _per_step(killed, key) == _per_step(whole, key), key
    assert len(_per_step(whole, "lr")) == 5
    assert all(torch.equal(done["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    log = (tmp_path / "resumed.log").read_text(encoding="utf-8", errors="replace")
    assert "resuming" in log and "--resume:" not in log  # nothing was given, so nothing changed
