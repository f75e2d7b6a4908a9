"""The run folder owns every run file name and reads checkpoints as data only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from segment.errors import InputError
from segment.run_folder import RunFolder, read_checkpoint, read_split_file, resolve_checkpoint


class _Evil:
    """A pickle payload that would create a file when unpickled (what a malicious model file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_asks_for_code_is_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": _Evil(marker)}}, evil)
    with pytest.raises(InputError) as err:
        read_checkpoint(evil)
    message = str(err.value)
    assert str(evil) in message and "refused" in message and "system" in message
    assert "\n" not in message
    assert not marker.exists()


def test_plain_data_checkpoint_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "hyper_parameters": {"config": {"a": 1}, "plan": {}}}, path)
    ckpt = read_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["model.w"], torch.ones(2))
    assert ckpt["hyper_parameters"]["config"] == {"a": 1}


@pytest.mark.parametrize("content, expected", [
    (b"garbage", "not a segment checkpoint"),
    (None, "no state_dict"),
])
def test_foreign_files_are_one_line(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "x.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_run_folder_names_every_file(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run").create(resume=False)
    assert run.path.is_dir()
    assert run.best_checkpoint == tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert run.last_checkpoint == tmp_path / "run" / "checkpoints" / "last.ckpt"
    split = {"train": ["a", "b"], "val": ["c"]}
    run.write_split(split)
    assert run.read_split() == split == read_split_file(tmp_path / "run" / "split.json")
    # no temporary file left behind (the one hidden file is the marker saying the folder is ours)
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == [RunFolder.MARKER]
    run.checkpoint_dir.mkdir()
    run.last_checkpoint.write_bytes(b"x")
    with pytest.raises(InputError, match="already exists and is not empty"):
        RunFolder(run.path).create(resume=False)
    run.last_checkpoint.unlink()
    with pytest.raises(InputError, match="nothing to resume"):
        RunFolder(run.path).create(resume=True)


def test_a_start_that_stopped_before_its_first_checkpoint_can_start_again(tmp_path: Path) -> None:
    """Interrupted in the first epoch, or stopped by a bad --split after planning: the folder holds only what that start
    wrote, so the same -o starts again (its files replaced); a folder that is not ours, or holds a model, is refused."""
    run = RunFolder(tmp_path / "run").create(resume=False)
    run.write_split({"train": ["a"], "val": ["b"]})
    (run.path / run.PLAN).write_text("{}")
    (run.path / run.LOGS).mkdir()
    (run.path / run.LOGS / "hparams.yaml").write_text("x: 1")
    with pytest.raises(InputError, match="stopped before its first checkpoint: start it again with the same --output"):
        RunFolder(run.path).create(resume=True)
    again = RunFolder(run.path).create(resume=False)
    assert sorted(p.name for p in again.path.iterdir()) == [RunFolder.MARKER]  # the earlier start's files are gone

    mine = tmp_path / "mine"  # a user's folder with a hand-made split.json: no marker, never touched
    mine.mkdir()
    (mine / "split.json").write_text('{"train": ["a"], "val": ["b"]}')
    with pytest.raises(InputError, match="already exists and is not empty"):
        RunFolder(mine).create(resume=False)
    assert (mine / "split.json").read_text() == '{"train": ["a"], "val": ["b"]}'

    (run.path / "notes.txt").write_text("the user's")  # anything we do not write there: refused, kept
    with pytest.raises(InputError, match="already exists and is not empty"):
        RunFolder(run.path).create(resume=False)
    assert (run.path / "notes.txt").read_text() == "the user's"


def test_checkpoint_resolution_prefers_best_and_finds_the_run(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run").create(resume=False)
    run.checkpoint_dir.mkdir()
    run.last_checkpoint.write_bytes(b"x")
    assert resolve_checkpoint(run.path) == run.last_checkpoint
    run.best_checkpoint.write_bytes(b"x")
    assert resolve_checkpoint(run.path) == run.best_checkpoint
    assert RunFolder.of_checkpoint(run.best_checkpoint) is None  # no split.json: not a run we can score on
    run.write_split({"train": ["a"], "val": ["b"]})
    assert RunFolder.of_checkpoint(run.best_checkpoint).path == run.path
