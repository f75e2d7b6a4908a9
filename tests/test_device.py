"""The one device-and-precision policy: what `auto` becomes, for training and prediction."""

from __future__ import annotations

import pytest
import torch

from segment import device as policy
from segment.errors import ConfigError


def _never() -> float:
    raise AssertionError("the CPU timing must not run for this choice")


@pytest.mark.parametrize("speedup, expected", [(1.5, "bf16-mixed"), (1.11, "bf16-mixed"), (1.09, "32"), (0.0, "32")])
def test_cpu_training_uses_bf16_only_when_measured_faster(monkeypatch: pytest.MonkeyPatch, speedup: float,
                                                          expected: str) -> None:
    monkeypatch.setattr(policy, "cpu_has_bf16", lambda: True)
    assert policy.training_precision("auto", "cpu", lambda: speedup) == expected


def test_cpu_without_bf16_units_never_times_and_stays_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "cpu_has_bf16", lambda: False)
    assert policy.training_precision("auto", "cpu", _never) == "32"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_training_is_mixed(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert policy.training_precision("auto", "cuda", _never) == expected
    assert policy.training_precision("32", "cuda", _never) == "32"  # an explicit choice is kept


def test_inference_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    assert policy.inference_dtype("32", cpu, net, [8, 8, 8], 1) is None
    assert policy.inference_dtype("bf16", cpu, net, [8, 8, 8], 1) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert policy.inference_dtype("auto", torch.device("cuda"), net, [8, 8, 8], 1) is torch.float16
    monkeypatch.setattr(policy, "cpu_has_bf16", lambda: False)
    assert policy.inference_dtype("auto", cpu, net, [8, 8, 8], 1) is None
    with pytest.raises(ConfigError, match="predict.precision"):
        policy.inference_dtype("fp8", cpu, net, [8, 8, 8], 1)


def test_missing_devices_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert policy.resolve_device("auto").type == "cpu"
    assert policy.training_accelerator("auto") == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        policy.resolve_device("cuda")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        policy.training_accelerator("gpu")
    with pytest.raises(ConfigError, match="expected auto, cpu"):
        policy.resolve_device("tpu")


@pytest.mark.parametrize("env, expected", [
    ({}, 0),
    ({"LOCAL_RANK": "1"}, 1),
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 2),  # Lightning's own launcher, 2 devices per node
    ({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "3",
      "SLURM_JOB_NAME": "train", "SLURM_LOCALID": "1"}, 3),  # srun: global rank 3 although LOCAL_RANK is unset
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "GROUP_RANK": "2"}, 5),
])
def test_global_rank_from_lightning_cluster_environments(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                          expected: int) -> None:
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME",
                "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "GROUP_RANK", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert policy.global_rank(devices_per_node=2) == expected
