"""The ablation report: metric tables, paired bootstrap differences, figures, and a finding written from the numbers.

The same content is rendered to Markdown (report.md), plain HTML (report.html) and JSON (report.json) so that people
read it and programs can check it. The finding is generated: it says "worse" only when the bootstrap interval of a
boundary metric excludes 0 in the harmful direction, otherwise it says "not worse / inconclusive on this data".
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from segment.errors import InputError
from segment.evaluation.metrics import LABELS, METRICS, UNITS, fmt_value
from segment.evaluation.seed_noise import (BOUNDARY_METRICS, describe, effect_table, fmt_diff, level_finding,
                                           seed_comparisons, seed_table, verdict)
from segment.evaluation.stats import ALL, compare, per_case_values

Block = tuple[Any, ...]  # ("h2", text) | ("p", text) | ("table", header, rows) | ("img", caption, relpath)


def _class_names(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["name"]) for r in rows))


def _stats(values: list[float]) -> tuple[float, float, int, int]:
    """mean, sample std, n with a value, n missing."""
    arr = np.asarray(values, dtype=float)
    ok = arr[~np.isnan(arr)]
    mean = float(ok.mean()) if ok.size else math.nan
    std = float(ok.std(ddof=1)) if ok.size > 1 else (0.0 if ok.size else math.nan)
    return mean, std, int(ok.size), int(arr.size - ok.size)


def _cell(values: list[float], metric: str) -> str:
    mean, std, _, missing = _stats(values)
    text = f"{fmt_value(mean, metric)} ± {fmt_value(std, metric)}"
    return text + (f" ({missing} missing)" if missing else "")


def _metric_table(variants: dict[str, list[dict[str, Any]]]) -> Block:
    """Rows: class x metric; columns: variants. "all" is the per-case mean over classes."""
    names = _class_names(next(iter(variants.values())))
    groups = names + [ALL] if len(names) > 1 else names
    rows = []
    for name in groups:
        for metric in METRICS:
            unit = f" ({UNITS[metric]})" if UNITS[metric] else ""
            cells = [_cell(list(per_case_values(v, metric, name).values()), metric) for v in variants.values()]
            rows.append([name, LABELS[metric] + unit, *cells])
    return ("table", ["class", "metric", *variants], rows)


def _comparisons(variants: dict[str, list[dict[str, Any]]], bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """Each variant against the first, for "all" and every class, every metric."""
    ref_name, ref_rows = next(iter(variants.items()))
    names = _class_names(ref_rows)
    groups = [ALL] + names if len(names) > 1 else [ALL]
    out = []
    for var_name, rows in list(variants.items())[1:]:
        for group in groups:
            for metric in METRICS:
                res = compare(ref_rows, rows, metric, group, n=bootstrap, seed=seed)
                out.append({**res, "variant": var_name, "reference": ref_name, "verdict": verdict(res, metric)})
    return out


def _diff_table(comps: list[dict[str, Any]]) -> Block:
    rows = []
    for c in comps:
        diff, interval = fmt_diff(c)
        rows.append([f"{c['variant']} − {c['reference']}", c["name"], LABELS[c["metric"]], diff, interval,
                     str(c["n"]), str(c["n_dropped"] + c["unpaired"]), c["verdict"]])
    header = ["comparison", "class", "metric", "mean difference", f"{round(100 * comps[0]['ci'])}% CI" if comps else "CI",
              "cases", "dropped", "verdict"]
    return ("table", header, rows)


def finding(comps: list[dict[str, Any]], n_seeds: int = 1) -> str:
    """One honest paragraph per compared variant, generated from the "all" bootstrap results only."""
    paragraphs = []
    for var in dict.fromkeys(c["variant"] for c in comps):
        mine = {c["metric"]: c for c in comps if c["variant"] == var and c["name"] == ALL}
        ref = next(iter(mine.values()))["reference"]
        boundary = [mine[m] for m in BOUNDARY_METRICS]
        worse = [c for c in boundary if c["verdict"] == "worse"]
        rest = [c for c in boundary if c["verdict"] != "worse"]
        n = max(c["n"] for c in boundary)
        if worse:
            text = (f"On this data ({n} paired cases), `{var}` is worse than `{ref}` on boundary metrics: "
                    + "; ".join(describe(c) for c in worse) + " — these intervals exclude 0.")
            if rest:
                text += " Not shown to differ (or better): " + "; ".join(
                    f"{describe(c)}, {c['verdict']}" for c in rest) + "."
        else:
            text = (f"On this data ({n} paired cases), `{var}` is not worse than `{ref}` on boundary metrics "
                    "(not worse / inconclusive on this data): " + "; ".join(
                        f"{describe(c)}, {c['verdict']}" for c in boundary) + ".")
        d = mine["dice"]
        text += f" Overlap: {describe(d)}, {d['verdict']}."
        paragraphs.append(text)
    if n_seeds > 1:
        paragraphs.append(f"Per case, each variant's metrics are first averaged over its {n_seeds} training seeds; "
                          "differences are the compared variant minus the first variant, averaged over cases; intervals "
                          "are paired percentile bootstraps over cases of those seed averages, so they reflect "
                          "case-to-case variation. Seed-to-seed variation is shown separately (Seed noise); nothing is "
                          "corrected for multiple comparisons.")
    else:
        paragraphs.append("Differences are the compared variant minus the first variant, averaged over cases; intervals "
                          "are paired percentile bootstraps over cases, so they reflect case-to-case variation of one "
                          "trained model per variant, not training-seed variation, and are not corrected for multiple "
                          "comparisons.")
    return " ".join(paragraphs)


def _meta_table(meta: dict[str, Any]) -> Block:
    def show(v: Any) -> str:
        return json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)
    return ("table", ["item", "value"], [[str(k), show(v)] for k, v in meta.items()])


def _variant_table(info: dict[str, dict[str, Any]]) -> Block:
    rows = [[name, ", ".join(map(str, i["kept"])) or "–", i["description"], str(i.get("steps", "")),
             str(i.get("minutes", ""))]
            for name, i in info.items()]
    return ("table", ["variant", "skip levels kept", "setting", "steps per seed", "minutes per seed"], rows)


def _blocks(out_dir: Path, variants: dict[str, list[dict[str, Any]]], meta: dict[str, Any], figures: dict[str, Path],
            grad_norms: dict[str, list[float]] | None, comps: list[dict[str, Any]], seed_comps: list[dict[str, Any]],
            info: dict[str, dict[str, Any]], n_seeds: int, levels_text: str) -> list[Block]:
    blocks: list[Block] = [("h1", "Ablation report: " + " vs ".join(f"`{v}`" for v in variants))]
    if comps:
        blocks += [("h2", "Finding"), ("p", finding(comps, n_seeds))]
    if levels_text:
        blocks += [("h2", "Which skip level carries boundary quality"), ("p", levels_text)]
    if info:
        n_levels = max((len(i["kept"]) for i in info.values()), default=0)
        blocks += [("h2", "Variants"), _variant_table(info),
                   ("p", f"Skip levels are numbered from the finest: level 0 joins the full-resolution encoder stage to "
                         f"the last decoder stage, level {max(n_levels - 1, 0)} is the coarsest skip (just above the "
                         "bottleneck); each level below 0 is one more downsampling (halving) away from full "
                         "resolution.")]
    blocks += [("h2", "Setup"), _meta_table(meta),
               ("h2", "Metrics (mean ± std over cases" + (f"; per case the mean of {n_seeds} seeds)" if n_seeds > 1
                                                          else ")")), _metric_table(variants),
               ("p", "Dice and NSD: higher is better. HD95 and ASSD in mm: lower is better. A distance is missing when "
                     "exactly one of prediction and reference is empty for that class; such cases are counted, "
                     "not averaged in.")]
    if comps:
        blocks += [("h2", f"Paired differences (each variant − `{comps[0]['reference']}`)"), _diff_table(comps)]
    if seed_comps:
        blocks += [("h2", "Seed noise: the same variant trained with another seed"), seed_table(seed_comps),
                   ("h2", "Effect beside seed noise (all classes)"), effect_table(comps, seed_comps),
                   ("p", "An effect exceeds seed noise when its interval excludes 0 and its mean is larger in size than "
                         "every variant's mean seed-to-seed difference on that metric.")]
    if figures:
        blocks.append(("h2", "Figures"))
        blocks += [("img", caption, os.path.relpath(Path(path), out_dir)) for caption, path in figures.items()]
    if grad_norms:
        depth = max(len(v) for v in grad_norms.values())
        rows = [[name] + [f"{x:.3g}" if x is not None else "n/a" for x in vals] + ["n/a"] * (depth - len(vals))
                for name, vals in grad_norms.items()]
        blocks += [("h2", "Gradient norm per encoder depth (0 = highest resolution)"),
                   ("table", ["variant"] + [f"depth {i}" for i in range(depth)], rows)]
    return blocks


def _to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"**{rest[0]}**", "", f"![{rest[0]}]({Path(rest[1]).as_posix()})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _to_html(blocks: list[Block], title: str) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            src = html.escape(Path(rest[1]).as_posix(), quote=True)
            parts.append(f"<figure><img src=\"{src}\" alt=\"{html.escape(rest[0])}\">"
                         f"<figcaption>{_inline(rest[0])}</figcaption></figure>")
    return "\n".join(parts + ["</body></html>"])


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def write_report(out_dir: Path, *, variants: dict[str, list[dict[str, Any]]], meta: dict[str, Any],
                 figures: dict[str, Path], grad_norms: dict[str, list[float]] | None = None,
                 bootstrap: int = 2000, seed_rows: dict[str, dict[int, list[dict[str, Any]]]] | None = None,
                 variant_info: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write report.md, report.html and report.json into `out_dir`; return the path of report.md.

    `variants` maps a variant name to its `evaluate_cases` rows (with several seeds: the per-case seed averages,
    `average_seeds`); the first variant is the reference every other one is compared with. `seed_rows` maps a
    variant to its rows per training seed (two or more seeds add the seed-noise tables). `variant_info` maps a
    variant to {"kept": levels, "description": words, "dropped_alone": level or None, "steps", "minutes"}; variants
    that drop one level alone enter the "which level" finding. `figures` maps a caption to a PNG path (embedded
    relative to `out_dir`).
    """
    if not variants or any(not rows for rows in variants.values()):
        raise InputError("write_report: every variant needs evaluation rows (none were given for at least one)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(meta.get("seed", 0)) if str(meta.get("seed", 0)).lstrip("-").isdigit() else 0
    comps = _comparisons(variants, bootstrap, seed)
    seed_rows, info = seed_rows or {}, variant_info or {}
    n_seeds = max((len(v) for v in seed_rows.values()), default=1)
    seed_comps = seed_comparisons(seed_rows, bootstrap, seed)
    dropped = {n: i["dropped_alone"] for n, i in info.items() if i.get("dropped_alone") is not None}
    levels_text = level_finding(comps, seed_comps, dropped)
    blocks = _blocks(out_dir, variants, meta, figures, grad_norms, comps, seed_comps, info, n_seeds, levels_text)
    md_path = out_dir / "report.md"
    md_path.write_text(_to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(_to_html(blocks, "Ablation report"), encoding="utf-8")
    payload = {"meta": meta, "comparisons": comps, "finding": finding(comps, n_seeds) if comps else "",
               "seed_comparisons": seed_comps, "level_finding": levels_text, "variants": info,
               "figures": {k: os.path.relpath(Path(v), out_dir) for k, v in figures.items()}}
    (out_dir / "report.json").write_text(json.dumps(_json_safe(payload), indent=2, default=str), encoding="utf-8")
    return md_path
