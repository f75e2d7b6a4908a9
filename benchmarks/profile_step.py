"""Where does one training step's time go on this machine? (issue 16, part 1)

Builds exactly what `segment train` builds for a dataset (plan, split, loaders, LightningModule) and times, separately:

- the data side: drawing a batch from the training loader (load from cache, foreground crop, MONAI augmentation), in
  the main process as `segment train` does by default (`data.num_workers: 0`);
- the compute side on one fixed batch: forward (per encoder/decoder stage, by forward hooks), loss, backward and the
  optimiser step, under fp32 and bf16 autocast, and with `channels_last_3d` memory format;
- the top operators of one step from `torch.profiler` (self CPU time).

    python benchmarks/profile_step.py                       # hippocampus from ../shared, 20 timed steps per row
    python benchmarks/profile_step.py --data DIR --steps 10

Prints tables; numbers go into BENCHMARKS.md with the machine (CPU model, cores, flags such as AMX/avx512_bf16).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from segment.config import load_config, validate
from segment.data.pipeline import make_loaders, make_split
from segment.train.module import SegmentationModule
from segment.train.plan_valid import plan_run
from segment.train.setup import apply_plan, load_dataset

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
console = Console()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    wanted = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
    return ",".join(f for f in wanted if f" {f}" in text) or "none of " + ",".join(wanted)


def time_loader(loader, steps: int) -> list[float]:
    it = iter(loader)
    next(it)  # first batch: worker start-up, caches
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(it)
        out.append(time.perf_counter() - t0)
    return out


class StageTimer:
    """Forward time per encoder/decoder stage, from forward pre/post hooks (wall clock; the CPU runs ops eagerly)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.totals: dict[str, float] = {}
        self._t: dict[str, float] = {}
        for kind in ("encoder", "decoder"):
            for i, stage in enumerate(getattr(model, kind).stages):
                name = f"{kind} stage {i}"
                stage.register_forward_pre_hook(self._pre(name))
                stage.register_forward_hook(self._post(name))

    def _pre(self, name: str):
        def hook(*_):
            self._t[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(*_):
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - self._t[name]
        return hook


def time_compute(module: SegmentationModule, batch: dict, steps: int, bf16: bool, channels_last: bool,
                 stages: bool = False) -> dict[str, float]:
    model = module.model
    image, label = batch["image"], batch["label"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timer = StageTimer(model) if stages else None
    parts: dict[str, list[float]] = {"forward": [], "loss": [], "backward": [], "optimizer": [], "step": []}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    for i in range(steps + 2):  # two warm-up steps (oneDNN primitive creation)
        if timer is not None and i == 2:
            timer.totals.clear()
        t0 = time.perf_counter()
        with autocast:
            outs = model.forward_all(image) if module.cfg.model.deep_supervision else [model(image)]
        t1 = time.perf_counter()
        loss = module._supervised_loss(outs, label)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if i >= 2:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[k].append(v)
    result = {k: statistics.median(v) for k, v in parts.items()}
    if timer is not None:
        result.update({k: v / steps for k, v in timer.totals.items()})
    return result


def top_ops(module: SegmentationModule, batch: dict, bf16: bool, n: int = 12) -> Table:
    from torch.profiler import ProfilerActivity, profile

    model = module.model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast:
            outs = model.forward_all(batch["image"]) if module.cfg.model.deep_supervision else [model(batch["image"])]
        module._supervised_loss(outs, batch["label"]).backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    table = Table(title=f"top operators, one step ({'bf16' if bf16 else 'fp32'}), self CPU time")
    for col in ("operator", "ms", "share"):
        table.add_column(col, justify="left" if col == "operator" else "right")
    for e in events:
        table.add_row(e.key, f"{e.self_cpu_time_total / 1e3:.1f}", f"{e.self_cpu_time_total / total:.0%}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HIPPOCAMPUS)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. train.lr=0.01")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(None, args.overrides + [f"data.root={args.data}"])
    dataset = load_dataset(cfg)
    plan, _ = plan_run(dataset, cfg)
    cfg = apply_plan(cfg, plan)
    cfg = validate({**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(mode="json"),
                                                             "steps_per_epoch": args.steps + 4}}, "profile config")
    split = make_split([c.name for c in dataset.cases], cfg.seed, cfg.data.val_fraction, cfg.data.folds, cfg.data.fold)
    train_loader, _ = make_loaders(dataset, split, plan, cfg)
    console.print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, flags {cpu_flags()}; torch {torch.__version__}")
    console.print(f"plan: patch {plan.patch_size}, batch {plan.batch_size}, features {plan.features}, "
                  f"deep supervision {cfg.model.deep_supervision}")

    load = time_loader(train_loader, args.steps)
    batch = next(iter(train_loader))
    module = SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict())
    module.train()

    rows = []
    for bf16 in (False, True):
        for cl in (False, True):
            rows.append((bf16, cl, time_compute(module, batch, args.steps, bf16, cl, stages=not cl)))
            module = SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict())
            module.train()

    table = Table(title=f"one training step, median of {args.steps} (seconds)")
    for col in ("precision", "memory format", "data (batch draw)", "forward", "loss", "backward", "optimizer",
                "compute step", "data share"):
        table.add_column(col, justify="right")
    data_s = statistics.median(load)
    for bf16, cl, r in rows:
        table.add_row("bf16 autocast" if bf16 else "fp32", "channels_last_3d" if cl else "contiguous", f"{data_s:.3f}",
                      f"{r['forward']:.3f}", f"{r['loss']:.3f}", f"{r['backward']:.3f}", f"{r['optimizer']:.3f}",
                      f"{r['step']:.3f}", f"{data_s / (data_s + r['step']):.0%}")
    console.print(table)

    stage_table = Table(title="forward time per stage (contiguous), seconds per step")
    stage_table.add_column("stage")
    stage_table.add_column("fp32", justify="right")
    stage_table.add_column("bf16", justify="right")
    fp32 = next(r for b, c, r in rows if not b and not c)
    bf = next(r for b, c, r in rows if b and not c)
    for k in [k for k in fp32 if "stage" in k]:
        stage_table.add_row(k, f"{fp32[k]:.4f}", f"{bf.get(k, float('nan')):.4f}")
    console.print(stage_table)
    console.print(top_ops(module, batch, bf16=False))
    console.print(top_ops(module, batch, bf16=True))


if __name__ == "__main__":
    main()
