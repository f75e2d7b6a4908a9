"""Choose the training precision: mixed on CUDA; bf16 on a CPU only where it measurably speeds up a training step."""

from __future__ import annotations

import time

import torch

from segment.config import Config
from segment.data.plan import Plan


def _step_seconds(model: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int = 2) -> float:
    """Best-of-N wall time of one forward+backward on the CPU, with or without bf16 autocast."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up allocators and kernels
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().mean().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_bf16_speedup(cfg: Config, plan: Plan) -> float:
    """fp32 time / bf16 time for one training step of the planned network on one planned patch (> 1: bf16 faster)."""
    from segment.nets import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.randn(1, plan.channels, *plan.patch_size)
    try:
        return _step_seconds(model, x, bf16=False) / _step_seconds(model, x, bf16=True)
    except RuntimeError:  # an op without a bf16 CPU kernel
        return 0.0


def choose_precision(cfg: Config, plan: Plan, accelerator: str) -> str:
    """Lightning precision string for `train.precision: auto`, or the configured one."""
    wanted = cfg.train.precision
    if wanted != "auto":
        return wanted
    if accelerator == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "cpu":
        return "bf16-mixed" if cpu_bf16_speedup(cfg, plan) > 1.1 else "32"
    return "32"
