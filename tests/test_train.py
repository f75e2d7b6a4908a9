"""Training end to end: a few steps on tiny synthetic data, checkpoints that carry config + plan, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segment.config import load_config
from segment.data.demo import make_demo_dataset
from segment.errors import InputError
from segment.train.runner import parse_duration, train

TINY = [
    "model.features=[4,8,16]", "data.patch_size=[24,24,24]", "data.batch_size=2", "train.steps_per_epoch=2",
    "train.precision=32", "data.augment.rotate_prob=0", "train.threads=1",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=4, seed=3, progress=False)


def _cfg(data: Path, *extra: str):
    return load_config(overrides=[f"data.root={data}", *TINY, *extra])


def test_train_writes_checkpoints_with_config_and_plan(tiny_data: Path, tmp_path: Path) -> None:
    result = train(_cfg(tiny_data, "train.max_epochs=2"), output=tmp_path / "run")
    assert result.steps == 4
    for name in ("config.yaml", "plan.json", "split.json", "summary.json", "logs/metrics.csv", "curves.png"):
        assert (result.run_dir / name).is_file(), name
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["config"]["model"]["features"] == [4, 8, 16]
    assert hp["config"]["model"]["out_channels"] == 3
    assert hp["plan"]["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert hp["plan"]["patch_size"] == [24, 24, 24]
    assert any(k.startswith("model.") for k in ckpt["state_dict"])
    assert set(result.val_dice) == {"val_dice_organ", "val_dice_lesion", "val_dice_mean"}
    assert all(0.0 <= v <= 1.0 for v in result.val_dice.values())


def test_resume_continues_from_the_right_step(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(_cfg(tiny_data, "train.max_epochs=1"), output=out)
    assert first.steps == 2
    before = torch.load(first.last_checkpoint, map_location="cpu", weights_only=False)
    resumed = train(_cfg(tiny_data, "train.max_epochs=3"), output=out, resume=True)
    after = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=False)
    assert before["global_step"] == 2 and before["epoch"] == 0
    assert resumed.steps == 6 and after["global_step"] == 6
    # the metrics of the first part survive the resume, joined with the new ones
    import csv

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1, 2]
    # the optimiser state carried over (AdamW step counts continue, not restart)
    steps = [s["step"] for s in after["optimizer_states"][0]["state"].values()]
    assert float(steps[0]) == 6.0


def test_last_checkpoint_follows_every_epoch_even_without_a_new_best(tiny_data: Path, tmp_path: Path) -> None:
    """With a learning rate of ~0 the validation Dice never improves after epoch 0; last.ckpt must still move on."""
    result = train(_cfg(tiny_data, "train.max_epochs=3", "train.lr=1e-12"), output=tmp_path / "run")
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert best["global_step"] == 2  # the first validation stays the best one
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_refuses_to_overwrite_a_run(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="already exists"):
        train(_cfg(tiny_data, "train.max_epochs=1"), output=out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="nothing to resume"):
        train(_cfg(tiny_data), output=tmp_path / "empty", resume=True)


def test_split_is_seeded_and_kfold_partitions(tiny_data: Path) -> None:
    from segment.data.pipeline import make_split

    names = [f"c{i:02d}" for i in range(10)]
    a, b = make_split(names, 0, 0.2, 5, None), make_split(names, 0, 0.2, 5, None)
    assert a == b and len(a["val"]) == 2 and not set(a["val"]) & set(a["train"])
    folds = [make_split(names, 0, 0.2, 5, k)["val"] for k in range(5)]
    assert sorted(n for f in folds for n in f) == names


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("2h", 7200), ("90s", 90), ("45", 2700), ("00:01:00:30", 3630)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_training_sampler_draws_steps_per_epoch_batches_and_is_sharded_not_replaced_under_ddp() -> None:
    from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
    from torch.utils.data import DataLoader

    from segment.data.sampling import DrawWithReplacement

    sampler = DrawWithReplacement(3, 40)
    torch.manual_seed(0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 40 and set(first) <= {0, 1, 2}
    assert first != second  # a fresh draw every epoch
    torch.manual_seed(0)
    assert list(sampler) == first  # from the seeded global RNG: every DDP rank draws the same list, then takes its share
    loader = DataLoader(list(range(3)), batch_size=2, sampler=sampler)
    shard = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=0)
    assert len(shard) == 20  # half of the 40 draws, not half of the 3 cases


def test_unlearned_note_names_only_the_classes_without_validation_dice() -> None:
    from segment.train.runner import unlearned_note

    note = unlearned_note({"val_dice_organ": 0.0, "val_dice_lesion": 0.7625, "val_dice_mean": 0.3812}, 240)
    assert note is not None and "'organ'" in note and "'lesion'" not in note and "'mean'" not in note
    assert "after 240 steps" in note and "predict it yet" in note and "model.encoder_block=residual" in note
    both = unlearned_note({"val_dice_organ": 0.01, "val_dice_lesion": 0.049, "val_dice_mean": 0.03}, 10)
    assert both is not None and "'organ', 'lesion'" in both and "predict them yet" in both
    # a low mean alone is no class; 0.05 itself counts as learned; a class with no score (NaN) is not flagged
    assert unlearned_note({"val_dice_organ": 0.05, "val_dice_lesion": 0.9, "val_dice_mean": 0.01}, 10) is None
    assert unlearned_note({"val_dice_organ": float("nan"), "val_dice_lesion": 0.9}, 10) is None


def test_train_prints_the_unlearned_note_exactly_when_a_class_has_no_validation_dice(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = train(_cfg(tiny_data, "train.max_epochs=1"), output=tmp_path / "run")
    out = " ".join(capsys.readouterr().err.split())  # the run log goes to stderr; rich wraps lines
    low = [k.removeprefix("val_dice_") for k, v in result.val_dice.items() if k != "val_dice_mean" and v < 0.05]
    assert ("does not predict" in out) == bool(low), (result.val_dice, out[-800:])
    for name in low:
        assert f"'{name}'" in out
