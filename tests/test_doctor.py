"""`segment doctor`: sane report on any machine, and a non-zero exit when a requested device is missing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rich.console import Console

from segment.doctor import (
    autocast_works,
    build_table,
    check_device,
    collect_info,
    cpu_count,
    find_warnings,
    run_doctor,
    shared_memory_gb,
)
from segment.errors import ConfigError


@pytest.fixture(scope="module")
def info() -> dict[str, Any]:
    return collect_info()


def test_collect_info_keys_and_types(info: dict[str, Any]) -> None:
    for key in ("python", "torch", "monai", "lightning", "nibabel", "SimpleITK", "numpy"):
        assert isinstance(info[key], str) and info[key][0].isdigit(), (key, info[key])
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"] == torch.__version__
    assert info["cuda_available"] is torch.cuda.is_available()
    assert isinstance(info["gpu_count"], int) and info["gpu_count"] == len(info["gpus"])
    assert info["cpu_count"] >= 1 and isinstance(info["cpu_count"], int)
    assert info["ram_gb"] is None or info["ram_gb"] > 0.1
    assert info["shm_total_gb"] is None or info["shm_total_gb"] >= info["shm_free_gb"] >= 0
    for key in ("cpu_bf16", "cpu_fp16", "mps_available", "nccl_available"):
        assert isinstance(info[key], bool), key
    for key in ("cuda_version", "cudnn_version", "driver_version"):
        assert key in info
    assert isinstance(info["warnings"], list)
    if not info["cuda_available"]:
        assert info["cuda_bf16"] is None and info["cuda_fp16"] is None and info["gpus"] == []


def test_bf16_cpu_check_returns_bool() -> None:
    assert isinstance(autocast_works("cpu", torch.bfloat16), bool)


def test_autocast_cuda_false_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the 'no CUDA' path cannot be exercised here")
    assert autocast_works("cuda", torch.float16) is False


def test_run_doctor_cpu_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor("cpu") == 0
    out = capsys.readouterr().out
    assert "segment doctor" in out and "torch" in out and "ok:" in out


def test_run_doctor_cuda_fails_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here, so requesting it must succeed")
    assert run_doctor("cuda") != 0
    assert "CUDA was requested but is not available" in capsys.readouterr().out


def test_check_device_with_fake_machines() -> None:
    gpu_box = {"cuda_available": True, "gpu_count": 2, "torch_cuda_build": "12.8", "mps_available": False}
    cpu_box = {"cuda_available": False, "gpu_count": 0, "torch_cuda_build": None, "mps_available": False}
    assert check_device(gpu_box, "cuda") is None
    assert check_device(gpu_box, "gpu") is None
    assert check_device(gpu_box, "cuda:1") is None
    assert "only 2 GPU" in (check_device(gpu_box, "cuda:2") or "")
    assert "CPU-only build" in (check_device(cpu_box, "cuda") or "")
    assert "sees no GPU" in (check_device({**cpu_box, "torch_cuda_build": "12.8"}, "gpu") or "")
    assert "MPS" in (check_device(cpu_box, "mps") or "")
    assert check_device(cpu_box, "auto") is None and check_device(cpu_box, "CPU") is None


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tpu"):
        check_device({}, "tpu")


def test_small_shm_warns_and_large_does_not() -> None:
    assert any("--shm-size" in w for w in find_warnings({"shm_total_gb": 0.0625}))
    assert find_warnings({"shm_total_gb": 16.0}) == []
    assert any("CPU-only build" in w for w in find_warnings({"torch_cuda_build": None, "driver_version": "550.1"}))


def test_shared_memory_missing_path_is_none() -> None:
    assert shared_memory_gb("/no/such/shm") == (None, None)


def test_cpu_count_within_machine() -> None:
    import os

    assert 1 <= cpu_count() <= (os.cpu_count() or 1)


def test_table_lists_gpus_from_info(info: dict[str, Any]) -> None:
    fake = {**info, "gpus": [{"index": 0, "name": "NVIDIA H100", "memory_gb": 79.1, "capability": "9.0"}]}
    console = Console(record=True, width=120)
    console.print(build_table(fake))
    text = console.export_text()
    assert "NVIDIA H100, 79.1 GB, sm 9.0" in text
    assert info["torch"] in text


def test_doctor_reports_the_precision_policy_train_and_predict_use(monkeypatch) -> None:  # noqa: ANN001
    from segment import device, doctor

    monkeypatch.setattr(doctor, "cpu_has_bf16", lambda: False)
    assert doctor.precision_policy(cuda=False)["train"].startswith("fp32")
    monkeypatch.setattr(doctor, "cpu_has_bf16", lambda: True)
    assert "timed step" in doctor.precision_policy(cuda=False)["predict"]
    monkeypatch.setattr(doctor, "cuda_mixed_dtype", lambda: device.torch.float16)
    assert doctor.precision_policy(cuda=True) == {"train": "16-mixed", "predict": "fp16"}
