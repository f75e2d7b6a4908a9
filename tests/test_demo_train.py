"""Slow tier: the embedded default -- `segment train` with no arguments, as a new user runs it -- learns every demo
structure. It is the first thing anyone sees; on 2026-12-02 a change of the default network left the organ at
validation Dice 0.00 after the demo's 240 steps, and nothing failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_embedded_default_learns_every_demo_structure(tmp_path: Path) -> None:
    env = {**os.environ, "SEGMENT_HOME": str(tmp_path / "home"), "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "segment.cli", "train", "-o", "run"], cwd=tmp_path, env=env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    dice = {k.removeprefix("val_dice_"): v for k, v in summary["val_dice"].items() if k != "val_dice_mean"}
    assert set(dice) == {"organ", "lesion"}
    # measured (2026-12-02, Intel Xeon, 2 cores, bf16): organ 0.886, lesion 0.777 after 480 steps; with the plain
    # encoder the same run had left one structure at 0.00 (seeds 0-2) for 120 to 240+ steps
    assert all(v > 0.5 for v in dice.values()), dice
    assert "does not predict" not in " ".join(proc.stderr.split())
