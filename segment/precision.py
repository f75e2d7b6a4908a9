"""Does bf16 autocast speed this network up on this CPU? One timer for training and inference alike."""

from __future__ import annotations

import time

import torch
from torch import nn


def _best_seconds(model: nn.Module, x: torch.Tensor, bf16: bool, train: bool, repeats: int) -> float:
    """Best-of-N wall time of a forward (inference) or forward+backward (training); the first run only warms up."""
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        if train:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            out.float().mean().backward()
        else:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_bf16_speedup(model: nn.Module, x: torch.Tensor, *, train: bool, repeats: int = 2) -> float:
    """fp32 time / bf16 time on the CPU (> 1: bf16 faster); 0.0 when an op has no bf16 CPU kernel."""
    try:
        fp32 = _best_seconds(model, x, False, train, repeats)
        return fp32 / _best_seconds(model, x, True, train, repeats)
    except RuntimeError:
        return 0.0
