"""The LightningModule: Dice + cross-entropy, deep supervision, poly/cosine schedules, whole-volume validation Dice.

`save_hyperparameters()` stores the config, plan and label names, so a checkpoint alone rebuilds the network and its
preprocessing for `segment predict`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from segment.config import Config
from segment.data.plan import Plan
from segment.engine.sliding import sliding_logits
from segment.nets import build_model, center_crop


class SegmentationModule(pl.LightningModule):
    def __init__(self, config: dict, plan: dict, max_time_s: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.model_validate(config)
        self.plan = Plan.from_dict(plan)
        self.model = build_model(self.cfg.model)
        t = self.cfg.train
        self.loss_fn = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=t.dice_weight, lambda_ce=t.ce_weight, batch=True,
        )
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.max_time_s = max_time_s
        # training time spent, in every part of a resumed run: a Lightning Timer whose state is in the checkpoint
        # (set by the runner, see segment.train.resume.clock); without one, a wall clock started at first use
        self.clock: Any = None
        self._t0: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---- loss ---------------------------------------------------------------------------------------------------
    def _supervised_loss(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Deep supervision: weights halve per level (nnU-Net style), targets downsampled by nearest neighbour.

        Not MONAI's `DeepSupervisionLoss`: it resizes the whole target to each head's size, while a valid-padded head
        sees only the centre region of the main output, so its target must be center-cropped first (tests/test_losses.py).
        """
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(weights)
        loss = outputs[0].new_zeros(())
        for level, (w, out) in enumerate(zip(weights, outputs)):
            # head `level` sees the region of the main output at 1/2**level resolution
            region = [min(n * 2**level, m) for n, m in zip(out.shape[2:], label.shape[2:])]
            target = center_crop(label, region)
            if tuple(target.shape[2:]) != tuple(out.shape[2:]):
                target = torch.nn.functional.interpolate(target.float(), size=out.shape[2:], mode="nearest").long()
            loss = loss + (w / total) * self.loss_fn(out.float(), target)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        if self.cfg.model.deep_supervision:
            outputs = self.model.forward_all(image)
        else:
            outputs = [self.model(image)]
        loss = self._supervised_loss(outputs, label)
        n = image.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        # per step (every log_every_n_steps): the loss and the learning rate this step used, for curves and checks
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=n)
        return loss

    # ---- validation on whole volumes ---------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        logits = sliding_logits(
            self.model, image, self.plan.patch_size, overlap=self.cfg.train.val_overlap,
            sw_batch_size=self.cfg.predict.sw_batch_size,
        )
        k = self.cfg.model.out_channels
        pred = one_hot(logits.argmax(1, keepdim=True), k)
        self.dice(pred, one_hot(label, k))

    def on_validation_epoch_end(self) -> None:
        scores = self.dice.aggregate()  # (cases, classes-1); NaN never: ignore_empty=False gives 1 for empty/empty
        self.dice.reset()
        per_class = torch.nanmean(scores.float(), dim=0)
        for idx, value in enumerate(per_class, start=1):
            name = self.plan.labels.get(idx, f"class_{idx}")
            self.log(f"val_dice_{name}", value, sync_dist=True)
        self.log("val_dice_mean", per_class.mean(), prog_bar=True, sync_dist=True)

    # ---- optimisation ----------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Seconds of training so far, including the earlier parts of a resumed run."""
        if self.clock is not None:
            return float(self.clock.time_elapsed())
        if self._t0 is None:
            self._t0 = time.monotonic()
        return time.monotonic() - self._t0

    def _progress(self, step: int) -> float:
        """Fraction of the run done: by steps, or by training time when a time budget ends the run sooner."""
        t = self.cfg.train
        frac = step / max(1, t.max_epochs * t.steps_per_epoch)
        if self.max_time_s:
            frac = max(frac, self._elapsed() / self.max_time_s)
        return min(frac, 1.0)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        p = self._progress(step)
        if t.scheduler == "poly":
            return max(1e-3, (1 - p) ** 0.9)
        if t.scheduler == "cosine":
            return max(1e-3, 0.5 * (1 + math.cos(math.pi * p)))
        return 1.0

    def configure_optimizers(self) -> dict:
        t = self.cfg.train
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
