"""Shared fixtures. Real-data tests use ../shared/data beside the checkout and skip with a reason when it is absent.

In CI, set SEGMENT_REQUIRE_SHARED_DATA=1: a missing shared folder then FAILS the tests that need it (with the path),
so real-data tests can never be skipped without anyone noticing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REQUIRE_SHARED_DATA = "SEGMENT_REQUIRE_SHARED_DATA"


def missing_shared_data(message: str) -> None:
    """Skip the test, or fail it where SEGMENT_REQUIRE_SHARED_DATA=1 (CI) says the shared data must be there."""
    if os.environ.get(REQUIRE_SHARED_DATA, "").strip() == "1":
        pytest.fail(f"{message} ({REQUIRE_SHARED_DATA}=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        missing_shared_data(f"{SHARED_DATA} not found: real-data tests need the shared dataset folder beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    root = shared_data / "hippocampus"
    if not (root / "dataset.json").is_file():
        missing_shared_data(f"{root} has no dataset.json: the MSD Hippocampus copy is missing")
    return root


@pytest.fixture(scope="session")
def real_ct_mr(shared_data: Path) -> Path:
    root = shared_data / "real_ct_mr"
    if not (root / "images").is_dir():
        missing_shared_data(f"{root}/images not found: the real CT/MR examples are missing")
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and far faster than on two when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
