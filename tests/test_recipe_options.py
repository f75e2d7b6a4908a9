"""The recipe switches of issue 16 against hand computations: plain encoder blocks, per-patch vs batch Dice, the EMA
of the weights, and training on every case (data.train_on_all)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from segment.config import Config, DataConfig, ModelConfig, TrainConfig
from segment.data.pipeline import training_split
from segment.data.plan import Plan
from segment.nets import build_model
from segment.train.ema import EMA
from segment.train.module import SegmentationModule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_encoder_is_the_residual_network_without_its_shortcuts() -> None:
    residual = build_model(ModelConfig(features=[4, 8, 16], encoder_block="residual"))
    plain = build_model(ModelConfig(features=[4, 8, 16], encoder_block="plain"))
    keys_r, keys_p = set(residual.state_dict()), set(plain.state_dict())
    assert keys_p < keys_r and all(".shortcut." in k for k in keys_r - keys_p)
    # each plain block is conv-norm-act-conv-norm-act, its last norm not zeroed (nothing would pass it)
    block = plain.encoder.stages[1][0]
    assert float(block.last_norm.weight.detach().abs().min()) > 0
    plain.eval()
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(block(x.repeat(1, 4, 1, 1, 1)), F.leaky_relu(block.branch(x.repeat(1, 4, 1, 1, 1)), 0.01))
        assert plain(x).shape == residual(x).shape


def _module(batch_dice: bool) -> SegmentationModule:
    cfg = Config(model=ModelConfig(features=[4, 8], out_channels=2), train=TrainConfig(ce_weight=0.0, batch_dice=batch_dice))
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[4, 4, 4], batch_size=2, features=[4, 8], modality="mri",
                channels=1, labels={0: "background", 1: "a"})
    return SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict())


def _soft_dice_loss(p: torch.Tensor, oh: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    inter, total = (p * oh).sum(dims), p.sum(dims) + oh.sum(dims)
    return (1 - (2 * inter + 1e-5) / (total + 1e-5)).mean()


@pytest.mark.parametrize("batch_dice", [True, False])
def test_batch_dice_pools_the_batch_and_per_patch_dice_averages_patches(batch_dice: bool) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 4, 4, generator=g, dtype=torch.float64)
    target = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1  # the second patch has no foreground: the two reductions differ most there
    p = logits.softmax(1)
    oh = F.one_hot(target[:, 0], 2).movedim(-1, 1).double()
    expected = _soft_dice_loss(p, oh, (0, 2, 3, 4)) if batch_dice else _soft_dice_loss(p, oh, (2, 3, 4))
    other = _soft_dice_loss(p, oh, (2, 3, 4)) if batch_dice else _soft_dice_loss(p, oh, (0, 2, 3, 4))
    got = _module(batch_dice).loss_fn(logits, target)
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, other, atol=1e-3)


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.seen: list[torch.Tensor] = []
        self.val_cases, self.clock = object(), object()  # attachments the average must not copy

    def training_step(self, batch, _):
        return (self.lin(batch[0]) - batch[1]).pow(2).mean()

    def on_train_batch_end(self, *_) -> None:
        self.seen.append(self.lin.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_ema_checkpoint_holds_the_moving_average_of_the_weights(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    model, decay = _Tiny(), 0.5
    attached = model.val_cases
    trainer = pl.Trainer(max_epochs=1, callbacks=[EMA(decay)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)
    avg = model.seen[0]  # torch's EMA: the first update copies, later ones blend
    for w in model.seen[1:]:
        avg = decay * avg + (1 - decay) * w
    assert len(model.seen) == 4 and not torch.allclose(model.seen[-1], avg)
    # after fit the model holds the average (what last.ckpt and predict see); the attachments are the run's own
    assert torch.allclose(model.lin.weight, avg, atol=1e-6) and model.val_cases is attached
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.allclose(ckpt["state_dict"]["lin.weight"], avg, atol=1e-6)


def test_train_on_all_trains_on_the_validation_cases_too() -> None:
    split = {"train": ["a", "b", "c"], "val": ["d"]}
    assert training_split(split, Config()) == split
    widened = training_split(split, Config(data=DataConfig(train_on_all=True)))
    assert widened == {"train": ["a", "b", "c", "d"], "val": ["d"]}


def test_planned_widths_keep_the_given_stages_and_double_the_last() -> None:
    from segment.data.plan import planned_widths

    assert planned_widths([8, 32, 64, 128], 5) == [8, 32, 64, 128, 256]
    assert planned_widths([8, 32, 64, 128], 3) == [8, 32, 64]
    assert planned_widths([16, 32, 64, 128], 6) == [16, 32, 64, 128, 256, 512]  # make_plan then caps at 320


def test_a_checkpoint_from_before_plain_became_the_default_still_loads_as_residual(tmp_path) -> None:
    """Runs written before `encoder_block` existed were residual: their stored config has no such field, and they must
    rebuild the residual network (strict load), while a config without the field given today means plain."""
    from segment.inference.loading import load_checkpoint

    cfg = Config(model=ModelConfig(features=[4, 8], out_channels=2, encoder_block="residual"))
    raw = cfg.model_dump(mode="json")
    del raw["model"]["encoder_block"]  # as an older segment wrote it
    net = build_model(cfg.model)
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[8, 8, 8], batch_size=2, features=[4, 8], modality="mri",
                channels=1, labels={0: "background", 1: "a"})
    torch.save({"hyper_parameters": {"config": raw, "plan": plan.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "old.ckpt")
    model, _, loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert loaded.model.encoder_block == "residual" and any(".shortcut." in k for k in model.state_dict())
    assert Config.model_validate({"model": {k: v for k, v in raw["model"].items()}}).model.encoder_block == "plain"


def test_folds_and_ablation_refuse_train_on_all_before_reading_data(tmp_path) -> None:
    """Both score on cases the models did not train on: data.train_on_all would quietly void that."""
    from segment.errors import ConfigError
    from segment.experiments.ablate import run_ablation
    from segment.train.folds import train_folds

    cfg = Config(data=DataConfig(train_on_all=True, root=tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="train_on_all"):
        train_folds(cfg, 3, output=tmp_path / "folds")
    with pytest.raises(ConfigError, match="train_on_all"):
        run_ablation(cfg, output=tmp_path / "ablation")
    assert not (tmp_path / "folds").exists() and not (tmp_path / "ablation").exists()
