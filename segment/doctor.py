"""`segment doctor`: report what this machine (or container) can run, before a long training job finds out.

Hospital GPU nodes fail in a few predictable ways: a CPU-only torch wheel, a driver older than the CUDA build,
a 64 MB /dev/shm inside Docker that kills DataLoader workers, or a GPU without bf16. Every check here is
defensive: a missing tool or device becomes a value in the report, never a crash.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from segment.device import cpu_has_bf16, cuda_mixed_dtype, mps_available
from segment.errors import ConfigError

SHM_MIN_GB = 2.0
"""DataLoader workers pass batches through /dev/shm; Docker's default of 64 MB is far too small for 3D volumes."""

PACKAGES = {
    "torch": "torch",
    "monai": "monai",
    "lightning": "pytorch-lightning",
    "nibabel": "nibabel",
    "SimpleITK": "SimpleITK",
    "numpy": "numpy",
}
DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")
_GB = 1024**3


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when missing), read from metadata so nothing heavy is imported."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """True when a tiny conv3d + matmul really runs in `dtype` under autocast on `device_type`.

    Asking torch is not enough: CPU autocast silently falls back to float32 for unsupported dtypes,
    and old GPUs accept bf16 tensors but fail in the kernels, so the output dtype is checked too.
    """
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad(), torch.autocast(device_type=device_type, dtype=dtype):
                x = torch.randn(1, 1, 4, 4, 4, device=device_type)
                conv = torch.nn.Conv3d(1, 2, kernel_size=3).to(device_type)
                y = conv(x)
                z = y.flatten(1) @ y.flatten(1).T
        return y.dtype == dtype and z.dtype == dtype and bool(torch.isfinite(z).all())
    except (RuntimeError, TypeError, ValueError):
        return False


def shared_memory_gb(path: str = "/dev/shm") -> tuple[float | None, float | None]:
    """(total, free) GB of shared memory, or (None, None) where there is no /dev/shm (macOS, Windows)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None, None
    return usage.total / _GB, usage.free / _GB


def memory_gb() -> tuple[float | None, float | None]:
    """(physical RAM, container cgroup limit) in GB; the limit is None when unlimited or unknown."""
    try:
        total: float | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _GB
    except (ValueError, OSError, AttributeError):
        total = None
    limit = None
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(name).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and (total is None or int(raw) / _GB < total):
            limit = int(raw) / _GB
        break
    return total, limit


def cpu_count() -> int:
    """CPUs this process may use: affinity respects `taskset`, SLURM and container cpusets, os.cpu_count does not."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def driver_version() -> str | None:
    """NVIDIA driver version from nvidia-smi, else from the kernel module; None without an NVIDIA driver."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15, check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return None


def gpu_info() -> list[dict[str, Any]]:
    """Name, memory and compute capability of each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index,
            "name": props.name,
            "memory_gb": round(props.total_memory / _GB, 1),
            "capability": f"{props.major}.{props.minor}",
        })
    return gpus


def precision_policy(cuda: bool) -> dict[str, str]:
    """What `precision: auto` becomes here, in the words of the one policy (`segment.device`) train and predict use."""
    if cuda:
        bf16 = cuda_mixed_dtype() == torch.bfloat16
        return {"train": "bf16-mixed" if bf16 else "16-mixed", "predict": "bf16" if bf16 else "fp16"}
    if cpu_has_bf16():
        timed = "bf16 where a timed step of the planned network is >= 10% faster than fp32, else fp32"
        return {"train": timed, "predict": timed}
    return {"train": "fp32 (no bf16 units on this CPU)", "predict": "fp32 (no bf16 units on this CPU)"}


def collect_info() -> dict[str, Any]:
    """Everything `segment doctor` reports, as plain data (also handy to paste into a bug report)."""
    cuda = torch.cuda.is_available()
    shm_total, shm_free = shared_memory_gb()
    ram_total, ram_limit = memory_gb()
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    info: dict[str, Any] = {
        **package_versions(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": cudnn,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": gpu_info(),
        "driver_version": driver_version(),
        "nccl_available": bool(torch.distributed.is_available() and torch.distributed.is_nccl_available()),
        "mps_available": mps_available(),
        "cpu_count": cpu_count(),
        "ram_gb": ram_total,
        "ram_limit_gb": ram_limit,
        "shm_total_gb": shm_total,
        "shm_free_gb": shm_free,
        "cpu_bf16": autocast_works("cpu", torch.bfloat16),
        "cpu_fp16": autocast_works("cpu", torch.float16),
        "cuda_bf16": autocast_works("cuda", torch.bfloat16) if cuda else None,
        "cuda_fp16": autocast_works("cuda", torch.float16) if cuda else None,
        "precision_auto": precision_policy(cuda),
    }
    info["warnings"] = find_warnings(info)
    return info


def find_warnings(info: dict[str, Any]) -> list[str]:
    """Problems that do not stop `doctor` but will slow or break training."""
    found = []
    shm = info.get("shm_total_gb")
    if shm is not None and shm < SHM_MIN_GB:
        found.append(
            f"/dev/shm is only {shm:.2f} GB (< {SHM_MIN_GB:g} GB): DataLoader workers may crash with 'bus error'. "
            "Start the container with --shm-size=8g (or --ipc=host), or train with data.num_workers=0."
        )
    if info.get("cuda_available") and not info.get("cuda_bf16"):
        found.append("This GPU cannot run bf16 autocast: use precision 16-mixed (fp16) or 32.")
    if info.get("torch_cuda_build") is None and info.get("driver_version"):
        found.append("An NVIDIA driver is present but this torch is a CPU-only build: install a CUDA build of torch.")
    return found


def check_device(info: dict[str, Any], device: str) -> str | None:
    """Why `device` cannot be used on the machine described by `info`, or None when it can."""
    name, _, index = device.strip().lower().partition(":")
    if name not in DEVICES:
        raise ConfigError(f"--device {device!r} is not known: expected one of {', '.join(DEVICES)} (or cuda:N).")
    if name in ("cuda", "gpu"):
        if not info.get("cuda_available"):
            build = info.get("torch_cuda_build")
            why = "this torch is a CPU-only build" if build is None else f"torch (CUDA {build}) sees no GPU"
            return (
                f"CUDA was requested but is not available: {why}. Check nvidia-smi on the host, the driver, "
                "and that the container was started with --gpus all."
            )
        if index and (not index.isdigit() or int(index) >= info.get("gpu_count", 0)):
            return f"{device} was requested but only {info.get('gpu_count', 0)} GPU(s) are visible."
    if name == "mps" and not info.get("mps_available"):
        return "MPS (Apple-silicon GPU) was requested but is not available on this machine."
    return None


def _fmt(value: Any, unit: str = "") -> str:
    """One table cell: '-' for unknown, GB to one decimal."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def build_table(info: dict[str, Any]) -> Table:
    """The report as a two-column rich table."""
    table = Table(title="segment doctor", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("value")
    for key in ("python", *PACKAGES):
        table.add_row(key, _fmt(info.get(key)) if info.get(key) else "[red]missing[/red]")
    rows = [
        ("torch CUDA build", info.get("torch_cuda_build")), ("CUDA available", info.get("cuda_available")),
        ("cuDNN", info.get("cudnn_version")), ("NVIDIA driver", info.get("driver_version")),
        ("GPU count", info.get("gpu_count")), ("NCCL (multi-GPU)", info.get("nccl_available")),
        ("MPS", info.get("mps_available")), ("CPUs usable", info.get("cpu_count")),
        ("RAM", _fmt(info.get("ram_gb"), " GB")), ("RAM limit (cgroup)", _fmt(info.get("ram_limit_gb"), " GB")),
        ("/dev/shm", _fmt(info.get("shm_total_gb"), " GB")),
        ("bf16 / fp16 on CPU", f"{_fmt(info.get('cpu_bf16'))} / {_fmt(info.get('cpu_fp16'))}"),
        ("bf16 / fp16 on CUDA", f"{_fmt(info.get('cuda_bf16'))} / {_fmt(info.get('cuda_fp16'))}"),
        ("precision auto: train", (info.get("precision_auto") or {}).get("train")),
        ("precision auto: predict", (info.get("precision_auto") or {}).get("predict")),
    ]
    for label, value in rows:
        table.add_row(label, value if isinstance(value, str) else _fmt(value))
    for gpu in info.get("gpus", []):
        table.add_row(f"GPU {gpu['index']}", f"{gpu['name']}, {gpu['memory_gb']} GB, sm {gpu['capability']}")
    return table


def run_doctor(device: str = "auto", console: Console | None = None) -> int:
    """Print the report; return 0 when `device` is usable (always for auto/cpu), 1 when it is missing."""
    console = console or Console()
    info = collect_info()
    problem = check_device(info, device)
    console.print(build_table(info))
    for warning in info["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if problem:
        console.print(f"[red]error:[/red] {problem}")
        return 1
    console.print(f"[green]ok:[/green] device {device!r} is usable.")
    return 0
