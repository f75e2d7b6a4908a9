"""An exponential moving average of the weights (`train.ema_decay`), kept by Lightning's `WeightAveraging` callback.

Lightning swaps the average in for every validation, writes it as the checkpoint's `state_dict` (so best.ckpt,
last.ckpt and everything that loads them — predict, export, calibration — use the averaged weights) and keeps the raw
weights beside it for --resume (`current_model_state`). What this module adds: the EMA update rule
(`torch.optim.swa_utils.get_ema_multi_avg_fn`), and a copy of the LightningModule without the run's attachments
(the validation sampler and the Timer), so the average does not duplicate them.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    def __init__(self, decay: float) -> None:
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        attached = {k: getattr(pl_module, k) for k in ("val_cases", "clock") if hasattr(pl_module, k)}
        for key in attached:
            setattr(pl_module, key, None)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            for key, value in attached.items():
                setattr(pl_module, key, value)
