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
from segment.train.validation import ValidationBudget


class SegmentationModule(pl.LightningModule):
    def __init__(self, config: dict, plan: dict, max_time_s: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.model_validate(config)
        self.plan = Plan.from_dict(plan)
        self.model = build_model(self.cfg.model)
        t = self.cfg.train
        self.loss_fn = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=t.dice_weight, lambda_ce=t.ce_weight, batch=t.batch_dice,
        )
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.max_time_s = max_time_s
        # validation time budget (train.val_time_fraction) and the validation loader's `ValOrder` sampler, which the
        # runner attaches (`val_cases`); without one every validation batch is validated
        self.val_budget = ValidationBudget(self.cfg.train.val_time_fraction)
        self.val_cases: Any = None
        self._val_rows: list[tuple[bool, torch.Tensor]] = []
        # training time spent, in every part of a resumed run: a Lightning Timer whose state is in the checkpoint
        # (set by the runner, see segment.train.resume.clock); without one, a wall clock started at first use
        self.clock: Any = None
        self._t0: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---- loss ---------------------------------------------------------------------------------------------------
    def _supervised_loss(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Deep supervision: weights halve per level (nnU-Net style), targets downsampled by nearest neighbour.

        `label` covers the input patch. Each head is compared only with the label of the region it predicts, cut from
        the centre (valid padding: the output is the input less the margin, centred on it; the extra voxel of an odd
        margin is dropped at the end, as the network's own skip crops and the tiler do), never resized from a larger
        region. Not MONAI's `DeepSupervisionLoss`: it resizes the whole target to each head's size
        (tests/test_losses.py, tests/test_valid_mode.py).
        """
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(weights)
        loss = outputs[0].new_zeros(())
        scale = [1] * (label.dim() - 2)  # per axis, how many input voxels one voxel of head `level` spans
        strides = self.cfg.model.stride_list()
        for level, (w, out) in enumerate(zip(weights, outputs)):
            if level:  # the level's per-axis stride (2 for outputs beyond the configured net, as in the loss tests)
                step = strides[level - 1] if level - 1 < len(strides) else [2] * len(scale)
                scale = [f * s for f, s in zip(scale, step)]
            region = [min(n * f, m) for n, f, m in zip(out.shape[2:], scale, label.shape[2:])]
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

    # ---- validation on whole volumes, within a time budget (ValidationBudget) ------------------------------------
    def _agree(self, value: Any) -> Any:
        """Rank 0's value on every rank (a decision all ranks must follow); the value itself on one process."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return value
        return trainer.strategy.broadcast(value, src=0)

    def on_train_start(self) -> None:
        self.val_budget.training_started()

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []
        self.dice.reset()
        runs = self._agree(self.val_budget.begin())
        self.val_budget.skipped = not runs and not self.val_budget.unlimited

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        t0 = time.monotonic()
        if hasattr(batch, "load"):  # a CaseHandle: loaded only when the budget takes it
            take = bool(self._agree(self.val_budget.wants(batch_idx)))
            if not take:
                self.val_budget.record(batch_idx, False)
                return
            batch = batch.load()
        image = batch["image"].to(self.device)
        label = batch["label"].to(self.device)
        logits = sliding_logits(  # valid padding: overlap-tile (segment.engine.tiler)
            self.model, image, self.plan.patch_size, overlap=self.cfg.train.val_overlap,
            sw_batch_size=self.cfg.predict.sw_batch_size,
        )
        k = self.cfg.model.out_channels
        pred = one_hot(logits.argmax(1, keepdim=True), k)
        # (1, classes-1); NaN never: ignore_empty=False gives 1 for empty/empty
        row = self.dice(pred, one_hot(label, k)).detach().float()
        self._val_rows.append((self.val_budget.is_monitor(batch_idx), row))
        self.val_budget.record(batch_idx, True, time.monotonic() - t0)

    def on_validation_epoch_end(self) -> None:
        self.dice.reset()
        rows, self._val_rows = self._val_rows, []
        budget = self.val_budget
        was_first = budget.monitor_steps is None
        extra = budget.end()
        world = self._trainer.world_size if self._trainer is not None else 1
        order = self.val_cases
        n_cases = order.n_items if order is not None else len(rows)
        if order is not None and not budget.unlimited:
            order.monitor = None if budget.monitor_steps is None else min(n_cases, budget.monitor_steps * world)
            order.cursor += extra * world
        share = f"{budget.fraction:.0%} time budget"
        if not rows:
            # nothing logged: ModelCheckpoint keeps the last monitored value (Lightning's callback_metrics), which is
            # never better than the best so far, so no checkpoint is chosen on an epoch without validation
            self.print(f"validation: skipped this epoch ({share}: {budget.credit():.1f} s left, the "
                       f"{order.monitor if order is not None else '?'} monitor case(s) take ~"
                       f"{(budget.monitor_steps or 0) * budget.step_s:.1f} s)")
            return
        monitored = torch.cat([r for m, r in rows if m] or [r for _, r in rows])
        everything = torch.cat([r for _, r in rows])
        per_class = torch.nanmean(monitored, dim=0)
        for idx, value in enumerate(per_class, start=1):
            name = self.plan.labels.get(idx, f"class_{idx}")
            self.log(f"val_dice_{name}", value, sync_dist=True)
        self.log("val_dice_mean", per_class.mean(), prog_bar=True, sync_dist=True)
        # every case validated this epoch (monitor subset + rotating ones): for the curves, never for best.ckpt
        self.log("val_cases", float(len(rows)), sync_dist=True, reduce_fx="sum")
        self.log("val_epoch_dice_mean", torch.nanmean(everything, dim=0).mean(), sync_dist=True)
        done = min(n_cases, len(rows) * world)
        if not budget.unlimited and done < n_cases:
            monitor = min(n_cases, (budget.monitor_steps or 0) * world)
            how = ("the fixed monitor subset from now on (val_dice_mean, best.ckpt)" if was_first else
                   f"{monitor} fixed monitor case(s) (val_dice_mean, best.ckpt) + {done - monitor} rotating")
            self.print(f"validation: {done} of {n_cases} cases this epoch ({share}): {how}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.val_budget.state_dict()
        if self.val_cases is not None:
            state.update(monitor=self.val_cases.monitor, cursor=self.val_cases.cursor)
        checkpoint["val_budget"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("val_budget") or {}
        self.val_budget.load_state_dict(state)
        if self.val_cases is not None:
            self.val_cases.monitor = state.get("monitor", self.val_cases.monitor)
            self.val_cases.cursor = int(state.get("cursor", self.val_cases.cursor))

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
