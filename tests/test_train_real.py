"""Slow tier: training on real MSD Hippocampus cases really learns, and Lightning's DDP path runs on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segment.config import load_config
from segment.train.runner import train

pytestmark = pytest.mark.slow


def _mean_dice(predictor, cases) -> float:
    from segment.config import EvaluateConfig
    from segment.evaluation.evaluate import score_cases

    rows = score_cases(predictor, cases, EvaluateConfig())
    return float(np.mean([r["dice"] for r in rows]))


def test_training_on_hippocampus_beats_an_untrained_model(hippocampus: Path, tmp_path: Path) -> None:
    """40 real cases, 120 steps (about 1-2 minutes on 2 CPU cores): validation Dice in the scans' own geometry."""
    from segment.evaluation.evaluate import load_predictor
    from segment.inference.predictor import Predictor
    from segment.io.dataset import discover
    from segment.nets import build_model

    cfg = load_config(overrides=[
        f"data.root={hippocampus}", "data.max_cases=40", "train.max_epochs=3", "train.steps_per_epoch=40",
        "data.batch_size=4", "train.threads=2", "train.precision=32",  # fp32: no timing-dependent bf16 choice
        # the network the floor below was calibrated with (the default until 2026-12-02): at a fixed 120 steps
        # today's default (plain, 8-32-64-128) may still be on a plateau where it predicts one structure only (mean
        # 0.41 on this seed; it leaves it by step ~300 and wins at equal time: BENCHMARKS.md, "The default's slow
        # start"), so with it the floor would test the recipe's first minute, not whether training works
        "model.encoder_block=residual", "model.features=[16,32,64,128]",
    ])
    result = train(cfg, output=tmp_path / "run")
    assert result.steps == 120
    trained = load_predictor(result.best_checkpoint, device="cpu")
    val = set(__import__("json").loads((result.run_dir / "split.json").read_text())["val"])
    cases = [c for c in discover(hippocampus).cases if c.name in val]
    assert len(cases) == 8

    torch.manual_seed(cfg.seed)
    untrained = Predictor(build_model(trained.config.model), trained.plan, trained.config, device="cpu")
    before, after = _mean_dice(untrained, cases), _mean_dice(trained, cases)
    print(f"hippocampus 120 steps: untrained Dice {before:.3f} -> trained {after:.3f}")
    # measured (2026-12-02, AMD EPYC, fp32, seed 0, last.ckpt): untrained 0.05, trained 0.810 after 120 steps; the same
    # run with a loss that only separates foreground from background 0.287, with flips applied to the image but not
    # the label 0.724 -- the floor sits between a working run and the mildest breakage measured
    assert before < 0.2
    assert after > 0.77
    assert after > before + 0.4


def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """Lightning's own DDP strategy (gloo on CPU), two processes, a couple of steps: the path multi-GPU runs take."""
    from segment.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", n_cases=4, seed=1, progress=False)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "segment.cli", "train", "--data", str(data), "-o", str(out), "--accelerator", "cpu",
        "--devices", "2", "--strategy", "ddp", "--max-epochs", "2", "--precision", "32",
        "--set", "model.features=[4,8,16]", "--set", "data.patch_size=[24,24,24]", "--set", "data.batch_size=2",
        "--set", "train.steps_per_epoch=4", "--set", "train.threads=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600, env=env,
                          cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "distributed_backend=gloo" in log or "All distributed processes registered" in log, log[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # the 4 batches of an epoch are shared out over the 2 ranks: 2 optimiser steps per epoch, 4 after 2 epochs
    # (with a RandomSampler, Lightning swapped in one pass over the 3 training cases: 1 step per epoch)
    assert ckpt["global_step"] == 4, ckpt["global_step"]
    assert ckpt["hyper_parameters"]["config"]["train"]["strategy"] == "ddp"
    # one run folder, one set of run files, written once (by global rank 0): nothing else appeared anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "run"]
    files = sorted(str(p.relative_to(out)) for p in out.iterdir())
    assert files == [".segment-run", "checkpoints", "confidence.json", "config.yaml", "curves.png", "fingerprint.json", "logs",
                     "metrics.csv", "plan.json", "scan_profile.json", "split.json", "summary.json", "val_cases.csv"], files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 4 and not set(split["train"]) & set(split["val"])
