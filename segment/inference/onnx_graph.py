"""The ONNX graph of a model package: the network exported for one planned window, and the check that onnxruntime gives
the same logits as torch (within ONNX_TOLERANCE) before the package is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 17  # supported by torch 2.2+'s TorchScript exporter and by onnxruntime >= 1.13
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
ONNX_TOLERANCE = 1e-3  # max |onnxruntime - torch| logits allowed at export, relative to max(1, max |logit|), fp32


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnx") is not None


def write_onnx(model: nn.Module, path: Path, channels: int, size: list[int]) -> None:
    """The network for a fixed (C, *size) input with a dynamic batch axis (TorchScript exporter, `dynamo=False`:
    the torch.export-based one needs onnxscript besides onnx)."""
    example = torch.zeros(1, channels, *size)
    with warnings.catch_warnings():  # tracer/deprecation notes about the legacy exporter are not the user's business
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})


def onnx_difference(model: nn.Module, path: Path, channels: int, size: list[int], seed: int = 0) -> float | None:
    """max |onnxruntime - torch| of the logits on a seeded random input, relative to max(1, max |torch logit|); None
    without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = model(x).float().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))
