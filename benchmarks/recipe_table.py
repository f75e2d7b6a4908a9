#!/usr/bin/env python3
"""The BENCHMARKS.md rows of the recipe comparisons (`benchmarks/recipe_ab.py`), read from their result.json files.

    python benchmarks/recipe_table.py runs/bench-recipe/no-rotation runs/bench-recipe/lr-1e-2 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    result = json.loads((folder / "result.json").read_text())
    lines = [ln for ln in result["table"].splitlines() if ln.startswith("| ")]
    arms = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines}
    a, b, diff = arms["A"], arms["B"], arms["B − A"]
    change = " ".join(result["b"]) or "defaults"
    base = " ".join(result["a"]) or "defaults"
    return (f"| {base} -> {change} | {a[1]} / {b[1]} | {a[2]} / {b[2]} | " + " | ".join(diff[2:]) + " |")


if __name__ == "__main__":
    print("| change (A -> B) | steps A / B | Dice A / B | B − A Dice | B − A HD95 mm | B − A ASSD mm | B − A NSD |")
    print("|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
