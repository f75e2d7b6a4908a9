"""Figures of `segment ablate`: contour comparisons, worst boundary cases per variant, error profiles, curves, norms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from segment.figures import PRED_COLOURS

WORST_CASES = 3  # worst boundary cases shown per variant
WORST_METRIC = "hd95"

Key = tuple[str, int]  # (variant, seed)


def pick_cases(variants: dict[str, list[dict[str, Any]]], n: int = 3) -> list[tuple[str, float]]:
    """Cases worth looking at: largest Dice gap for the reference, the median gap, largest gap the other way.

    The gap is the first variant (most skips) minus the last one (fewest skips): the contrast the ablation is about.
    """
    from segment.evaluation.stats import per_case_values

    rows_a, rows_b = list(variants.values())[0], list(variants.values())[-1]
    va, vb = per_case_values(rows_a, "dice"), per_case_values(rows_b, "dice")
    gap = {c: va[c] - vb[c] for c in sorted(set(va) & set(vb))}
    order = sorted(gap, key=lambda c: gap[c])
    picks = [order[-1], order[len(order) // 2], order[0]] if order else []
    return [(c, gap[c]) for c in dict.fromkeys(picks)][:n]


def worst_cases(by_seed: dict[int, list[dict[str, Any]]], n: int = WORST_CASES,
                metric: str = WORST_METRIC) -> list[tuple[int, str, float]]:
    """(seed, case, value) of the `n` worst different cases of one variant over all its seeds, by the per-case
    mean over classes of `metric` (HD95: highest first; a missing value, i.e. a class missed or invented, first)."""
    from segment.evaluation.stats import per_case_values

    found = [(seed, case, v) for seed, rows in by_seed.items() for case, v in per_case_values(rows, metric).items()]
    found.sort(key=lambda t: (not math.isnan(t[2]), -t[2] if not math.isnan(t[2]) else 0.0, t[0], t[1]))
    picked: list[tuple[int, str, float]] = []
    for seed, case, v in found:
        if case not in {c for _, c, _ in picked}:
            picked.append((seed, case, v))
    return picked[:n]


def _worst_overlays(fig_dir: Path, ckpts: dict[Key, Path], seed_rows: dict[str, dict[int, list]],
                    by_name: dict[str, Any], predictor: Any) -> dict[str, Path]:
    from segment.data.labels import encode_labels
    from segment.evaluation.evaluate import predict_labels, read_case_arrays
    from segment.figures import plot_case_panels, worst_boundary_error

    figures = {}
    for i, (name, by_seed) in enumerate(seed_rows.items()):
        panels = []
        for seed, case, value in worst_cases(by_seed):
            p = predictor((name, seed))
            channels, geometry, ref = read_case_arrays(by_name[case])
            ref = encode_labels(ref, p.plan, by_name[case].label)
            pred = predict_labels(p, channels, geometry)
            point, dist = worst_boundary_error(pred, ref, geometry.spacing)
            shown = "missing" if math.isnan(value) else f"{value:.2f} mm"
            panels.append({"image": channels[0], "ref": ref, "pred": pred, "point": point, "spacing": geometry.spacing,
                           "title": f"{case} (seed {seed})\nHD95 {shown}; slice {point[2]}, {dist:.1f} mm off"})
        if panels:
            caption = (f"Worst boundary cases of {name} (highest per-case HD95 over its seeds; slice through the "
                       "voxel furthest from the reference surface, marked x)")
            figures[caption] = plot_case_panels(panels, fig_dir / f"worst_{i}_{name}.png", title=name)
    return figures


def make_figures(out: Path, ckpts: dict[Key, Path], seed_rows: dict[str, dict[int, list]], variants: dict[str, list],
                 profiles: dict[str, dict], run_dirs: dict[str, Path], norms: dict[str, list[float]],
                 cases: list[Any]) -> dict[str, Path]:
    """Every figure of the report; `variants` are the per-case seed averages, contours use each variant's first seed."""
    from segment.evaluation.evaluate import load_predictor, predict_labels, read_case_arrays
    from segment.figures import plot_boundary_error, plot_contours, plot_gradient_norms, plot_training_curves
    from segment.run_folder import RunFolder

    fig_dir, figures, loaded = out / "figures", {}, {}

    def predictor(key: Key) -> Any:
        if key not in loaded:
            loaded[key] = load_predictor(ckpts[key])
        return loaded[key]

    by_name = {c.name: c for c in cases}
    names = list(variants)
    shown = names if len(names) <= len(PRED_COLOURS) else [names[0], names[-1]]  # more contours would not be legible
    ref_name, other = names[0], names[-1]
    for i, (case, gap) in enumerate(pick_cases(variants)):
        channels, geometry, ref = read_case_arrays(by_name[case])
        preds = {name: predict_labels(predictor((name, next(iter(seed_rows[name])))), channels, geometry)
                 for name in shown}
        caption = f"Contours, case {case} (Dice {ref_name} − {other}: {gap:+.3f})"
        figures[caption] = plot_contours(channels[0], ref, preds, fig_dir / f"contours_{i}.png", title=caption,
                                         spacing=geometry.spacing)
    figures.update(_worst_overlays(fig_dir, ckpts, seed_rows, by_name, predictor))
    figures["Boundary error vs distance from the reference surface (all validation cases and seeds pooled)"] = \
        plot_boundary_error(profiles, fig_dir / "boundary_error.png")
    logs = {n: parts[0] for n, d in run_dirs.items() if (parts := RunFolder(d).metric_logs())}
    if logs:
        figures["Training curves (first seed)"] = plot_training_curves(logs, fig_dir / "training_curves.png")
    figures["Gradient norm per encoder depth at initialisation"] = plot_gradient_norms(norms, fig_dir / "grad_norms.png")
    return figures
