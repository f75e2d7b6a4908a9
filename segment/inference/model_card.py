"""model_card.md of a model package: the data a model was trained on, spacing, classes, validation metrics, intended
use and licence, written from the package's manifest (model.json) by `segment export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

AXES = "canonical RAS voxel order: axis 0 left->right, 1 posterior->anterior, 2 inferior->superior"


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(meta: dict[str, Any]) -> str:
    """model_card.md from the manifest: data, spacing, classes, validation metrics, intended use, licence."""
    config, plan, training = meta["config"], meta["plan"], meta.get("training") or {}
    root = (config.get("data") or {}).get("root")
    dataset = Path(root).name if root else "the embedded synthetic demo dataset"
    split = training.get("split")
    pre = meta["preprocessing"]
    lines = [
        f"# Model card: segment 3D U-Net ({', '.join(c['name'] for c in meta['labels'][1:]) or 'segmentation'})", "",
        f"- **Intended use:** {meta['intended_use']}",
        f"- **License:** {meta['license']}",
        (f"- **Written by:** segment {meta['segment_version']} on {meta['created']} (package format "
         f"{meta['format_version']})"), "",
        "## Training data", "",
        f"- **Dataset:** {dataset}",
        f"- **Cases:** {plan.get('num_cases') or (split['train'] + split['val'] if split else 'unknown')}",
        f"- **Split:** {split['train']} training / {split['val']} validation cases" if split else
        "- **Split:** unknown (no split.json beside the checkpoint)",
        f"- **Modality:** {plan.get('modality')}" + (f" ({plan['modality_source']})" if plan.get("modality_source") else ""),
        f"- **Median shape (canonical voxels):** {plan.get('median_shape') or 'unknown'}", "",
        "## Input", "",
        f"- **Channels:** {plan['channels']}; spacing {pre['spacing_mm']} mm; {AXES}",
    ]
    for c in pre["channels"]:
        detail = (f"clip to {c['clip']}, then (x - {c['mean']:.4g}) / {c['std']:.4g}" if c["normalisation"] == "ct"
                  else "z-score over the volume")
        lines.append(f"- **Channel {c['channel']}:** {c['normalisation']}: {detail}")
    lines += [(f"- **Network window:** input {meta['input']['shape']}, output {meta['output']['shape']} (ONNX: "
               f"`{meta['input']['name']}` -> `{meta['output']['name']}`)"), "",
              "## Classes", "", "| class | label value | name |", "|---|---|---|"]
    lines += [f"| {c['class']} | {c['value']} | {c['name']} |" for c in meta["labels"]]
    lines += ["", "## Validation metrics", ""]
    summary = training.get("summary")
    if summary:
        if summary.get("best_val_dice_mean") is not None:
            lines.append(f"- **Best mean validation Dice:** {_metric(summary['best_val_dice_mean'])}")
        for key, value in (summary.get("val_dice") or {}).items():
            lines.append(f"- **{key}:** {_metric(value)}")
        for key in ("steps", "seconds"):
            if key in summary:
                lines.append(f"- **Training {key}:** {summary[key]}")
    else:
        lines.append("None recorded (no summary.json in the run folder).")
    lines += ["", "## Use", "", "```bash", "segment predict scan.nii.gz -m THIS_FOLDER", "```", "",
              ("The label map is written in the scan's own geometry. Validate the model on your own data before any "
               "use; the metrics above are from the training run's validation cases only."), ""]
    return "\n".join(lines)
