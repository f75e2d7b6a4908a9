"""Does `torch.compile` (inductor, CPU) make the default training step faster? (issue 16, part 1)

Times one bf16-autocast training step (forward, the training loss, backward, AdamW) of the network `segment train`
plans for hippocampus, eager and compiled, on one fixed random batch of the planned patch and batch size:

    python benchmarks/compile_step.py --threads 2
    python benchmarks/compile_step.py --threads 1      # the recipe study's one thread per arm

Prints the first step (which includes compilation) and the median of the later steps for both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"


def time_steps(module, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = module._supervised_loss([out], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HIPPOCAMPUS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps after three warm-up steps")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: the hippocampus data is missing (../shared/data/hippocampus)")
    from segment.config import load_config
    from segment.train.module import SegmentationModule
    from segment.train.plan_valid import plan_run
    from segment.train.setup import apply_plan, load_dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"data.root={args.data}"])
    plan, _ = plan_run(load_dataset(cfg), cfg)
    cfg = apply_plan(cfg, plan)
    module = SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict())
    module.train()
    x = torch.randn(plan.batch_size, 1, *plan.patch_size)
    y = torch.randint(0, len(plan.labels), (plan.batch_size, 1, *plan.patch_size))
    eager = time_steps(module, module.model, x, y, args.steps)
    compiled = time_steps(module, torch.compile(module.model), x, y, args.steps)
    print(f"patch {plan.patch_size}, batch {plan.batch_size}, features {plan.features}, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| mode | first step (s) | median step (s) | steps/s |")
    print("|---|---|---|---|")
    for name, (first, med) in (("eager", eager), ("torch.compile (inductor)", compiled)):
        print(f"| {name} | {first:.1f} | {med:.3f} | {1 / med:.2f} |")
    print(f"\ncompiled / eager step time: {compiled[1] / eager[1]:.2f}")


if __name__ == "__main__":
    main()
