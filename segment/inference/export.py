"""A portable model package: what `segment export` writes and what `segment predict -m PACKAGE` reads.

    PACKAGE/
      model.safetensors  the network's weights (safetensors: tensors and a JSON header, no pickle, no code)
      model.json         format version, segment version, config, plan, labels, preprocessing, input/output spec
      model_card.md      what it was trained on, spacing, classes, validation metrics, intended use, licence
      model.onnx         the network as an ONNX graph for one planned patch (batch axis dynamic); optional

Reading a package never unpickles anything: the network is rebuilt from the config in model.json and filled from
model.safetensors (checked against the SHA-256 that model.json records). A package of another format version is
refused with one line naming both versions. Writing goes into a temporary folder beside the target, renamed into place
when complete, and never deletes a file that `segment export` did not write.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from segment.config import Config, stored_config
from segment.data.labels import class_values
from segment.data.plan import Plan
from segment.errors import InputError
from segment.inference.model_card import AXES, model_card
from segment.inference.onnx_graph import (ONNX_INPUT, ONNX_OPSET, ONNX_OUTPUT, ONNX_TOLERANCE, onnx_available,
                                         onnx_difference, write_onnx)
from segment.run_folder import RunFolder
from segment.version import segment_version

FORMAT = "segment-model"
FORMAT_VERSION = 1  # bump when a reader of the old version could not use a new package correctly
MODEL_JSON, WEIGHTS, ONNX, CARD = "model.json", "model.safetensors", "model.onnx", "model_card.md"
PACKAGE_FILES = (MODEL_JSON, WEIGHTS, ONNX, CARD)
DEFAULT_INTENDED_USE = "research use; not a medical device"


def is_package(path: str | Path) -> bool:
    """A folder holding model.json (`segment.run_folder.resolve_checkpoint` knows the same file name)."""
    return Path(path).is_dir() and (Path(path) / MODEL_JSON).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- reading ------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """model.json of a package, checked to be one this segment reads (format and version)."""
    file = Path(path) / MODEL_JSON
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: not a readable model.json ({type(err).__name__}: {str(err).splitlines()[0][:160]})") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{file}: not a segment model package (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        wrote = meta.get("segment_version", "unknown")
        raise InputError(f"{file}: model.json format {version}, this segment reads format {FORMAT_VERSION} (the package "
                         f"was written by segment {wrote}, this is {segment_version()}); export it again with this "
                         "segment, or use the segment version that wrote it")
    return meta


def read_package(path: str | Path) -> tuple[nn.Module, Plan, Config]:
    """Network, plan and config of a model package: JSON and safetensors only, never a pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from segment.nets import build_model

    path = Path(path)
    meta = read_manifest(path)
    try:
        config, plan = Config.model_validate(stored_config(meta["config"])), Plan.from_dict(meta["plan"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # pydantic's ValidationError is a ValueError:
        # written by a segment whose config differs from this one
        raise InputError(f"{path / MODEL_JSON}: config or plan does not fit this segment ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]})") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights}: missing; a model package needs {WEIGHTS} beside {MODEL_JSON}")
    expected = (meta.get("weights") or {}).get("sha256")
    if expected and _sha256(weights) != expected:
        raise InputError(f"{weights}: does not match the SHA-256 in {MODEL_JSON} (changed or damaged); export it again")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{weights}: not a readable safetensors file ({str(err).splitlines()[0][:160]})") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{weights}: weights do not fit the network in {MODEL_JSON} ({str(err).splitlines()[0]})") \
            from None
    return model, plan, config


# ---- describing ---------------------------------------------------------------------------------------------
def _window(model: nn.Module, plan: Plan) -> tuple[list[int], list[int]]:
    """(input, output) spatial size of one planned patch: the ONNX graph's fixed spatial shape."""
    size = [int(p) for p in plan.patch_size]
    if hasattr(model, "input_size_for"):
        size = [int(s) for s in model.input_size_for(size)]
    out = [int(s) for s in model.output_size(size)] if hasattr(model, "output_size") else list(size)
    return size, out


def labels_table(plan: Plan, config: Config) -> list[dict[str, Any]]:
    """Each class: its index (network output channel), label value written to disk, and name."""
    values = class_values(plan, int(config.model.out_channels))
    return [{"class": i, "value": int(v), "name": plan.labels.get(i, f"class_{v}")} for i, v in enumerate(values)]


def preprocessing(plan: Plan, config: Config) -> dict[str, Any]:
    """How a scan becomes network input, in words and numbers (what `segment.data.preprocess` does)."""
    kinds = plan.channel_modalities or [plan.modality] * int(plan.channels)
    channels = []
    for c, kind in enumerate(kinds):
        if kind == "ct":
            lo, hi = (float(v) for v in plan.ct_clip)
            channels.append({"channel": c, "normalisation": "ct", "clip": [lo, hi], "mean": float(plan.ct_mean),
                             "std": float(plan.ct_std), "formula": "(clip(x, clip[0], clip[1]) - mean) / std"})
        else:
            channels.append({"channel": c, "normalisation": "zscore", "formula": "(x - mean(x)) / std(x) over the "
                             "whole resampled volume of this channel"})
    return {
        "orientation": f"{AXES} (an exact permutation and flips of the scan's voxel axes)",
        "spacing_mm": [float(s) for s in plan.spacing],
        "resampling": "trilinear (align_corners=False) to spacing_mm; class probabilities are resampled back to the "
                      "scan's canonical grid the same way, then argmax, then the reorientation is undone",
        "channels": channels,
        "mirror_axes": plan.tta_axes(),
        "sliding_window": {"patch_size": [int(p) for p in plan.patch_size], "overlap": config.predict.overlap,
                           "blend": config.predict.blend},
    }


def io_spec(model: nn.Module, plan: Plan, config: Config) -> dict[str, Any]:
    size, out = _window(model, plan)
    return {
        "input": {"name": ONNX_INPUT, "dtype": "float32", "shape": ["batch", int(plan.channels), *size],
                  "layout": f"N, C, spatial ({AXES})", "meaning": "preprocessed image channels (see preprocessing)"},
        "output": {"name": ONNX_OUTPUT, "dtype": "float32", "shape": ["batch", int(config.model.out_channels), *out],
                   "meaning": "class logits: softmax over axis 1 gives probabilities, argmax the class index; "
                              "labels maps class index to the label value written to disk"},
    }


def run_info(source: Path | None) -> dict[str, Any]:
    """What the run folder of a checkpoint says about the training: split sizes and summary.json, where present."""
    if source is None:
        return {}
    source = Path(source)
    run = RunFolder(source.parent.parent if source.parent.name == RunFolder.CHECKPOINTS else source.parent)
    info: dict[str, Any] = {"checkpoint": source.name}
    try:
        split = run.read_split()
    except InputError:
        split = None
    if split is not None:
        info["split"] = {"train": len(split["train"]), "val": len(split["val"])}
    try:
        summary = run.read_summary()
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        info["summary"] = {k: v for k, v in summary.items() if k != "best_checkpoint"}  # a local path: not shared
    # what `segment predict` flags with: the training scans' profile (out-of-distribution check) and the confidence
    # threshold chosen on the validation cases; a package predicts with them as the run folder would
    for key, name in (("scan_profile", run.PROFILE), ("confidence", run.CONFIDENCE)):
        value = run.read_optional_json(name)
        if value is not None:
            info[key] = value
    return info


def package_checks(path: str | Path) -> tuple[dict[str, Any] | None, float | None]:
    """The scan profile and confidence threshold a package carries (None where its run had none)."""
    training = read_manifest(path).get("training") or {}
    return training.get("scan_profile"), (training.get("confidence") or {}).get("threshold")


def manifest(model: nn.Module, plan: Plan, config: Config, *, source: Path | None = None,
             intended_use: str | None = None, license: str = "unspecified") -> dict[str, Any]:
    """The content of model.json, without the file hashes (added when the files are written)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "segment_version": segment_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "intended_use": intended_use or DEFAULT_INTENDED_USE, "license": license,
        "config": _shareable(config), "plan": plan.to_dict(),
        "labels": labels_table(plan, config), "preprocessing": preprocessing(plan, config),
        **io_spec(model, plan, config),
        "training": run_info(source),
    }


def _shareable(config: Config) -> dict[str, Any]:
    """The config without the training machine's dataset path (a package travels to other sites; the card keeps the
    folder name only)."""
    raw = config.model_dump(mode="json")
    raw["data"]["root"] = None
    return raw


# ---- writing ------------------------------------------------------------------------------------------------
def check_target(target: str | Path, overwrite: bool) -> Path:
    """The package folder may be new, empty, or (with --overwrite) an earlier package and nothing else."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a folder; choose another --output")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise InputError(f"{target}: exists; pass --overwrite to replace the model package in it, or choose "
                             "another --output")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in PACKAGE_FILES)
        if foreign:
            raise InputError(f"{target}: holds files segment export did not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); --overwrite replaces only a model package: choose "
                             "another --output")
    return target


def export_package(model: nn.Module, plan: Plan, config: Config, target: str | Path, *, source: Path | None = None,
                   intended_use: str | None = None, license: str = "unspecified", onnx: bool = True,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write a model package to `target`; returns its model.json content (with the files' hashes)."""
    from safetensors.torch import save_file

    target = check_target(target, overwrite)
    if onnx and not onnx_available():
        raise InputError("model.onnx needs the onnx package: pip install 'segment[export]' (or leave the ONNX graph "
                         "out with --no-onnx)")
    model = model.to("cpu").float().eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        meta = manifest(model, plan, config, source=source, intended_use=intended_use, license=license)
        # clone: contiguous, and no two tensors share storage (safetensors refuses shared tensors)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", FORMAT: str(FORMAT_VERSION)})
        meta["weights"] = {"file": WEIGHTS, "sha256": _sha256(tmp / WEIGHTS), "tensors": len(state)}
        if onnx:
            size = [int(s) for s in meta["input"]["shape"][2:]]
            write_onnx(model, tmp / ONNX, int(plan.channels), size)
            difference = onnx_difference(model, tmp / ONNX, int(plan.channels), size)
            if difference is not None and difference > ONNX_TOLERANCE:
                raise InputError(f"{target / ONNX}: onnxruntime's logits differ from torch's by {difference:.2g} "
                                 f"(relative; allowed {ONNX_TOLERANCE:g}); export with --no-onnx")
            meta["onnx"] = {"file": ONNX, "sha256": _sha256(tmp / ONNX), "opset": ONNX_OPSET,
                            "max_relative_difference_to_torch": difference}
        else:
            meta["onnx"] = None
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(meta), encoding="utf-8")
        _share(tmp)
        _replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own temporary folder: only files written above
    return meta


def _share(folder: Path) -> None:
    """The permissions a plain mkdir/open would have given (mkdtemp makes 0700, safetensors may write 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _replace(tmp: Path, target: Path) -> None:
    """Rename the finished package into place; an earlier package there (checked: only package files) goes away."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)  # put the earlier package back
        raise
    for name in PACKAGE_FILES:  # what check_target allowed there; nothing else is removed
        (old / name).unlink(missing_ok=True)
    old.rmdir()
