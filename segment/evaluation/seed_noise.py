"""Seed noise beside the effect: several training seeds per variant, and which skip level carries boundary quality.

Per case, the seeds' metrics of a variant are averaged before the variant is compared with the reference, so the
paired bootstrap runs over cases of seed-averaged values. Seed noise is the paired difference between two seeds of
the same variant (later seed minus the first) on the same cases. An effect "exceeds seed noise" when its interval
excludes 0 and its mean is larger in size than every variant's mean seed-to-seed difference on that metric; with one
seed, seed noise is not measured and the text says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from segment.evaluation.metrics import HIGHER_IS_BETTER, LABELS, METRICS, UNITS
from segment.evaluation.stats import ALL, compare

BOUNDARY_METRICS = ("hd95", "assd", "nsd")
Rows = list[dict[str, Any]]


def average_seeds(by_seed: dict[int, Rows]) -> Rows:
    """One row per (case, class) with every metric averaged over the seeds (NaN when any seed's value is NaN)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rows in by_seed.values():
        for row in rows:
            groups.setdefault((str(row["case"]), str(row["name"])), []).append(row)
    out = []
    for (case, name), rows in groups.items():
        avg = {m: float(np.mean([float(r[m]) for r in rows])) for m in METRICS}
        out.append({**rows[0], "case": case, "name": name, **avg, "seeds": len(rows)})
    return out


def verdict(res: dict[str, Any], metric: str) -> str:
    """'worse' / 'better' when the interval excludes 0, else 'inconclusive'."""
    if res["n"] == 0 or math.isnan(res["lo"]):
        return "no data"
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    lo, hi = sorted((sign * res["lo"], sign * res["hi"]))
    if hi < 0:
        return "worse"
    if lo > 0:
        return "better"
    return "inconclusive"


def fmt_diff(res: dict[str, Any]) -> tuple[str, str]:
    """'+0.012', '-0.003 to +0.027' (mm for distances)."""
    unit = f" {UNITS[res['metric']]}" if UNITS[res["metric"]] else ""
    digits = 3 if res["metric"] in ("dice", "nsd") else 2
    if res["n"] == 0 or math.isnan(res["mean"]):
        return "n/a", "n/a"
    return (f"{res['mean']:+.{digits}f}{unit}",
            f"{res['lo']:+.{digits}f} to {res['hi']:+.{digits}f}{unit}")


def describe(c: dict[str, Any]) -> str:
    diff, interval = fmt_diff(c)
    return f"{LABELS[c['metric']]} {diff} ({round(100 * c['ci'])}% CI {interval})"


def seed_comparisons(seed_rows: dict[str, dict[int, Rows]], bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """For every variant with two or more seeds: each later seed minus the first, per metric, over all classes."""
    out = []
    for variant, by_seed in seed_rows.items():
        seeds = list(by_seed)
        for later in seeds[1:]:
            for metric in METRICS:
                res = compare(by_seed[seeds[0]], by_seed[later], metric, ALL, n=bootstrap, seed=seed)
                out.append({**res, "variant": variant, "seeds": (seeds[0], later), "verdict": verdict(res, metric)})
    return out


def unmeasured_noise(seed_comps: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per metric, the variants whose seed-to-seed difference has no data (e.g. a distance missing in every case of a
    seed that never found a structure): there the seed noise of that metric is unknown."""
    out: dict[str, list[str]] = {}
    for c in seed_comps:
        if math.isnan(c["mean"]):
            out.setdefault(c["metric"], []).append(c["variant"])
    return out


def noise_levels(seed_comps: list[dict[str, Any]]) -> dict[str, float]:
    """Per metric, the largest |mean seed-to-seed difference| of any variant; a metric is missing when no seeds were
    compared, or when some variant's seed difference has no data (its noise could be larger than any measured one)."""
    out: dict[str, float] = {}
    unknown = unmeasured_noise(seed_comps)
    for c in seed_comps:
        if not math.isnan(c["mean"]) and c["metric"] not in unknown:
            out[c["metric"]] = max(out.get(c["metric"], 0.0), abs(c["mean"]))
    return out


def exceeds_noise(comp: dict[str, Any], noise: dict[str, float]) -> bool | None:
    """Interval excludes 0 and |mean| is above the seed noise; None when seed noise was not measured."""
    if comp["metric"] not in noise:
        return None
    return comp["verdict"] in ("worse", "better") and abs(comp["mean"]) > noise[comp["metric"]]


def seed_table(seed_comps: list[dict[str, Any]]) -> tuple[str, list[str], list[list[str]]]:
    rows = []
    for c in seed_comps:
        diff, interval = fmt_diff(c)
        rows.append([f"{c['variant']}: seed {c['seeds'][1]} − seed {c['seeds'][0]}", LABELS[c["metric"]], diff, interval,
                     str(c["n"]), c["verdict"]])
    ci = f"{round(100 * seed_comps[0]['ci'])}% CI" if seed_comps else "CI"
    return ("table", ["seed difference", "metric", "mean difference", ci, "cases", "interval"], rows)


def effect_table(comps: list[dict[str, Any]], seed_comps: list[dict[str, Any]]) -> tuple[str, list[str], list[list[str]]]:
    """Per variant and metric (all classes): the effect against the reference beside both variants' seed differences."""
    noise = noise_levels(seed_comps)
    first_seed = {}
    for c in seed_comps:
        first_seed.setdefault((c["variant"], c["metric"]), c)

    def seed_cell(variant: str, metric: str) -> str:
        c = first_seed.get((variant, metric))
        return "n/a" if c is None else "{} ({})".format(*fmt_diff(c))

    rows = []
    for c in (c for c in comps if c["name"] == ALL):
        flag = exceeds_noise(c, noise)
        rows.append([f"{c['variant']} − {c['reference']}", LABELS[c["metric"]], "{} ({})".format(*fmt_diff(c)),
                     seed_cell(c["variant"], c["metric"]), seed_cell(c["reference"], c["metric"]),
                     "no data" if math.isnan(c["mean"]) else
                     ("not measured" if flag is None else ("yes" if flag else "no"))])
    return ("table", ["comparison", "metric", "effect (95% CI)", "seed noise of the variant",
                      "seed noise of the reference", "exceeds seed noise"], rows)


def level_name(level: int) -> str:
    return f"level {level}" + (" (finest, full resolution)" if level == 0 else
                               f" ({level} halving{'s' if level > 1 else ''} below full resolution)")


def _harm(c: dict[str, Any]) -> float:
    """Size of the change in the harmful direction (positive = worse)."""
    return (-1.0 if HIGHER_IS_BETTER[c["metric"]] else 1.0) * c["mean"]


def level_finding(comps: list[dict[str, Any]], seed_comps: list[dict[str, Any]], dropped: dict[str, int]) -> str:
    """Which single dropped level changes HD95, ASSD and NSD most, and whether that change exceeds seed noise."""
    mine = [c for c in comps if c["name"] == ALL and c["variant"] in dropped and not math.isnan(c["mean"])]
    if not mine:
        return ""
    noise = noise_levels(seed_comps)
    biggest = {}
    for metric in BOUNDARY_METRICS:
        cands = [c for c in mine if c["metric"] == metric]
        if cands:
            biggest[metric] = max(cands, key=_harm)
    parts = [f"{LABELS[m]}: dropping {level_name(dropped[c['variant']])} (`{c['variant']}`), {describe(c)}"
             for m, c in biggest.items()]
    text = "Largest boundary change when a single level is dropped — " + "; ".join(parts) + ". "
    unknown = unmeasured_noise(seed_comps)
    carriers = {m: c for m, c in biggest.items() if c["verdict"] == "worse" and m not in unknown
                and exceeds_noise(c, noise) is not False}
    if unknown:
        text += ("Seed noise of " + ", ".join(LABELS[m] for m in unknown) + " could not be measured for " + ", ".join(
            sorted({v for vs in unknown.values() for v in vs})) + " (one seed missed a structure in every case), so "
            "no level is named on " + ("that metric" if len(unknown) == 1 else "those metrics") + ". ")
        dice = [abs(c["mean"]) for c in seed_comps if c["metric"] == "dice" and not math.isnan(c["mean"])]
        if dice:
            text += (f"Two seeds of the same variant differ by up to Dice {max(dice):.3g}: training has not settled at "
                     "this budget. ")
    if not seed_comps:
        text += "Seed noise was not measured (one seed per variant), so this rests on the case bootstrap alone: "
    if carriers:
        levels = list(dict.fromkeys(dropped[c["variant"]] for c in carriers.values()))
        metrics = ", ".join(LABELS[m] for m in carriers)
        if len(levels) == 1:
            text += f"{level_name(levels[0]).capitalize()} carries boundary quality: dropping it worsens {metrics}"
        else:
            text += "No single level carries boundary quality: " + "; ".join(
                f"{LABELS[m]} depends most on {level_name(dropped[c['variant']])}" for m, c in carriers.items())
        text += (" beyond the interval's 0" + (" and beyond seed noise (largest seed-to-seed difference: " + ", ".join(
            f"{LABELS[m]} {noise[m]:.3g}" for m in carriers) + ")" if noise else "") + ".")
    elif unknown and not noise:
        text += "No level can be named on the boundary metrics."
    elif noise:
        text += ("No level's effect exceeds seed noise: each of these changes either has an interval that includes 0 "
                 "or is no larger than the difference between two seeds of the same variant (up to " + ", ".join(
                     f"{LABELS[m]} {noise[m]:.3g}{' ' + UNITS[m] if UNITS[m] else ''}" for m in BOUNDARY_METRICS
                     if m in noise) + ", mean over cases).")
    else:
        text += "no single dropped level makes boundaries worse with an interval that excludes 0."
    return text
