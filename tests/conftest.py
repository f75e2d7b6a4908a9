"""Shared fixtures. Real-data tests use ../shared/data beside the checkout and skip with a reason when it is absent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: real-data tests need the shared dataset folder beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    root = shared_data / "hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"{root} has no dataset.json: the MSD Hippocampus copy is missing")
    return root


@pytest.fixture(scope="session")
def real_ct_mr(shared_data: Path) -> Path:
    root = shared_data / "real_ct_mr"
    if not (root / "images").is_dir():
        pytest.skip(f"{root}/images not found: the real CT/MR examples are missing")
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and far faster than on two when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
