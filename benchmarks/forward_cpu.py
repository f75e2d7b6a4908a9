"""How fast is one forward pass of the default hippocampus-sized U-Net on this CPU, and what makes it faster?

Times the network alone (no I/O, no resampling) on one planned window, per volume, for: fp32 vs bf16 autocast,
contiguous vs `channels_last_3d`, batch 1 / 2 / 8 (8 = all TTA mirrorings of one small scan in one call), and prints
the share of the top operators (torch.profiler, self CPU time). This is what `segment predict --tta` spends per
mirroring on a hippocampus case that fits in one window.

    python benchmarks/forward_cpu.py                 # random weights (speed does not depend on them)
    python benchmarks/forward_cpu.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from rich.console import Console
from rich.table import Table

from segment.config import ModelConfig
from segment.nets import build_model

console = Console()


def timed(model: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def top_ops(model: torch.nn.Module, x: torch.Tensor, bf16: bool, n: int = 8) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), autocast, profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total) for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--patch", default="40,56,40")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = [int(v) for v in args.patch.split(",")]
    torch.manual_seed(0)
    model = build_model(ModelConfig(features=[16, 32, 64, 128], out_channels=3)).eval()
    table = Table(title=f"forward of one {'x'.join(map(str, patch))} window, ms per volume "
                        f"({torch.get_num_threads()} threads, torch {torch.__version__})")
    for col in ("precision", "memory format", "batch 1", "batch 2", "batch 8"):
        table.add_column(col, justify="right")
    for bf16 in (False, True):
        for cl in (False, True):
            net = model.to(memory_format=torch.channels_last_3d) if cl else model.to(memory_format=torch.contiguous_format)
            cells = []
            for batch in (1, 2, 8):
                x = torch.randn(batch, 1, *patch)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                cells.append(f"{1000 * timed(net, x, bf16, args.repeats) / batch:.0f}")
            table.add_row("bf16" if bf16 else "fp32", "channels_last_3d" if cl else "contiguous", *cells)
    console.print(table)
    model = model.to(memory_format=torch.contiguous_format)
    for bf16 in (False, True):
        ops = top_ops(model, torch.randn(1, 1, *patch), bf16)
        console.print(f"top operators ({'bf16' if bf16 else 'fp32'}, batch 1): "
                      + ", ".join(f"{k} {v:.0%}" for k, v in ops))


if __name__ == "__main__":
    main()
