"""The one device-and-precision policy: which device a command runs on, and in which precision.

Training (`segment train`, `segment ablate`), prediction (`segment predict`, `segment evaluate`) and `segment doctor`
all ask here, so a rule (say, "bf16 on a CPU only where a timed step shows it is faster") changes in one place.
Lightning still owns the training loop's devices and AMP; this module only turns the user's `auto` into a choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from segment.errors import ConfigError

CPU_BF16_MIN_SPEEDUP = 1.1  # bf16 on a CPU must beat fp32 by 10% (timing noise on a busy 2-core machine is ~5%)
INFERENCE_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


# ---- devices ----------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for a device that is not there is a one-line error."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if name == "mps" and not mps_available():
        raise ConfigError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ConfigError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def training_accelerator(requested: str) -> str:
    """`train.accelerator` -> the Lightning accelerator name ('cuda', 'cpu', 'mps'); a missing GPU is one line."""
    acc = str(requested).lower()
    if acc == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("train.accelerator: CUDA was requested but no GPU is visible (run `segment doctor`)")
    if acc == "mps" and not mps_available():
        raise ConfigError("train.accelerator: Apple MPS was requested but is not available here")
    return "cuda" if acc == "gpu" else acc


def mps_available() -> bool:
    """Apple-silicon GPU backend; False on every Linux node."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def cuda_mixed_dtype() -> torch.dtype:
    """bf16 where the GPU supports it (Ampere and newer), else fp16 with a gradient scaler."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---- CPU bf16: measured, never assumed ----------------------------------------------------------------------------
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


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU at all (AVX512-BF16 or AMX); without them bf16 is emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---- precision choices ------------------------------------------------------------------------------------------
def training_precision(wanted: str, accelerator: str, bf16_speedup: Callable[[], float]) -> str:
    """Lightning precision string for `train.precision` ('auto' decided here, anything else passed through).

    CUDA: bf16-mixed (16-mixed on GPUs without bf16). CPU: bf16-mixed only when `bf16_speedup()` — one timed training
    step of the planned network on one planned patch, fp32 time / bf16 time — is at least 1.1. Otherwise fp32.
    """
    if wanted != "auto":
        return wanted
    if accelerator == "cuda":
        return "bf16-mixed" if cuda_mixed_dtype() == torch.bfloat16 else "16-mixed"
    if accelerator == "cpu" and cpu_has_bf16():
        return "bf16-mixed" if bf16_speedup() > CPU_BF16_MIN_SPEEDUP else "32"
    return "32"


_CPU_INFERENCE_BF16: dict[str, bool] = {}  # network description -> measured verdict, once per process


def inference_dtype(wanted: str, device: torch.device, model: nn.Module, window: Sequence[int],
                    channels: int) -> torch.dtype | None:
    """Autocast dtype for prediction (None = fp32), for `predict.precision` auto | 32 | bf16 | 16.

    'auto': bf16 (fp16 without bf16) on CUDA; on a CPU bf16 only where a timed forward pass over one `window` of this
    network was at least 10% faster than fp32 (measured once per process and network).
    """
    if wanted in INFERENCE_DTYPES:
        return INFERENCE_DTYPES[wanted]
    if wanted != "auto":
        raise ConfigError(f"predict.precision {wanted!r}: expected auto, 32, bf16 or 16")
    if device.type == "cuda":
        return cuda_mixed_dtype()
    if device.type != "cpu" or not cpu_has_bf16():
        return None
    key = repr(getattr(model, "cfg", type(model)))
    if key not in _CPU_INFERENCE_BF16:
        x = torch.randn(1, channels, *window)
        _CPU_INFERENCE_BF16[key] = cpu_bf16_speedup(model, x, train=False) > CPU_BF16_MIN_SPEEDUP
    return torch.bfloat16 if _CPU_INFERENCE_BF16[key] else None


# ---- which process writes ------------------------------------------------------------------------------------------
def global_rank(devices_per_node: int = 1) -> int:
    """This process's global rank, from Lightning's own cluster environments, before any Trainer exists.

    Run files (plan, split, config) must be written by exactly one process of a job. SLURM (`srun`), torchrun /
    torchelastic, LSF (`jsrun`) and MPI each say so their own way; Lightning's cluster environments know them all.
    Under Lightning's own launcher (`--devices N`, optionally `--num-nodes`) children carry NODE_RANK and LOCAL_RANK.
    """
    import os

    from lightning_fabric.plugins.environments import (
        LSFEnvironment, MPIEnvironment, SLURMEnvironment, TorchElasticEnvironment,
    )

    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        try:
            if env.detect():
                return int(env().global_rank())
        except Exception:  # noqa: BLE001 - a half-configured scheduler variable must not stop a single-process run
            continue
    node, local = int(os.environ.get("NODE_RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    return node * max(1, devices_per_node) + local


# ---- memory ------------------------------------------------------------------------------------------------------
def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: MemAvailable, capped by a container (cgroup v2/v1) limit; None if unknown."""
    from pathlib import Path

    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:
            room = int(limit) - int(usage)
            available = room if available is None else min(available, room)
        break
    return available
