"""One recipe comparison repeated with several seeds (`benchmarks/recipe_ab.py` folders, each seed its own split),
pooled: every (seed, validation case) pair's `B − A`, with a paired bootstrap 95% interval over all pairs, beside each
seed's own mean. Scores the final weights of both arms again (one thread), as recipe_ab does.

    python benchmarks/recipe_pooled.py runs/bench-recipe/reference-recipe-20m runs/bench-recipe/reference-recipe-20m-seed1 \\
        runs/bench-recipe/reference-recipe-20m-seed2
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]]
    if len(folders) < 2 or not DATA.is_dir():
        sys.exit("give two or more recipe_ab result folders (and ../shared/data/hippocampus must exist)")
    import torch

    from segment.evaluation.evaluate import load_predictor, score_cases
    from segment.evaluation.metrics import METRICS
    from segment.evaluation.stats import paired_bootstrap, per_case_values
    from segment.io.dataset import discover
    from segment.run_folder import RunFolder

    torch.set_num_threads(1)
    by_name = {c.name: c for c in discover(DATA).cases}
    pooled: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in METRICS}
    print("| comparison | cases | " + " | ".join(f"B − A {m}" for m in METRICS) + " |")
    print("|---" * (len(METRICS) + 2) + "|")
    for folder in folders:
        runs = {arm: RunFolder(folder / arm) for arm in ("a", "b")}
        val_names = runs["a"].read_split()["val"]
        if runs["b"].read_split()["val"] != val_names:
            sys.exit(f"{folder}: the arms do not share their validation cases")
        val = [by_name[n] for n in val_names]
        vals = {}
        for arm, run in runs.items():
            predictor = load_predictor(run.last_checkpoint, "cpu")
            vals[arm] = {m: per_case_values(score_cases(predictor, val, predictor.config.evaluate), m) for m in METRICS}
            del predictor
        cells = []
        for m in METRICS:
            cases = [c for c in val_names if c in vals["a"][m] and c in vals["b"][m]]
            a, b = np.array([vals["a"][m][c] for c in cases]), np.array([vals["b"][m][c] for c in cases])
            pooled[m][0].extend(a)
            pooled[m][1].extend(b)
            cells.append(f"{np.nanmean(b - a):+.4f}")
        print(f"| {folder.name} | {len(val)} | " + " | ".join(cells) + " |", flush=True)
    cells = []
    for m in METRICS:
        d = paired_bootstrap(np.array(pooled[m][0]), np.array(pooled[m][1]))
        cells.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
    print(f"| pooled | {len(pooled[METRICS[0]][0])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
