"""Choose the training precision: mixed on CUDA; bf16 on a CPU only where it measurably speeds up a training step."""

from __future__ import annotations

import torch

from segment.config import Config
from segment.data.plan import Plan
from segment.precision import cpu_bf16_speedup


def training_bf16_speedup(cfg: Config, plan: Plan) -> float:
    """fp32 time / bf16 time for one training step of the planned network on one planned patch (> 1: bf16 faster)."""
    from segment.nets import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.randn(1, plan.channels, *plan.patch_size)
    return cpu_bf16_speedup(model, x, train=True)


def choose_precision(cfg: Config, plan: Plan, accelerator: str) -> str:
    """Lightning precision string for `train.precision: auto`, or the configured one."""
    wanted = cfg.train.precision
    if wanted != "auto":
        return wanted
    if accelerator == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "cpu":
        return "bf16-mixed" if training_bf16_speedup(cfg, plan) > 1.1 else "32"
    return "32"
