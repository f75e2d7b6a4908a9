"""The shared-data rule of tests/conftest.py: skip where the data is missing, but FAIL where SEGMENT_REQUIRE_SHARED_DATA=1
(CI), naming the missing path. Checked by running pytest on a copy of the conftest in a temporary checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = '''
def test_folder(shared_data):
    assert shared_data.is_dir()


def test_hippocampus(hippocampus):
    assert (hippocampus / "dataset.json").is_file()
'''


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """tmp/checkout/tests/{conftest.py, test_needs_data.py}: its shared data would be tmp/shared/data."""
    tests = tmp_path / "checkout" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(CONFTEST, tests / "conftest.py")
    (tests / "test_needs_data.py").write_text(TESTS)
    return tmp_path / "checkout"


def _pytest(checkout: Path, require: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SEGMENT_REQUIRE_SHARED_DATA", "PYTEST_ADDOPTS")}
    if require is not None:
        env["SEGMENT_REQUIRE_SHARED_DATA"] = require
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(checkout),
         str(checkout / "tests")],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_missing_shared_data_skips_by_default(checkout: Path) -> None:
    code, out = _pytest(checkout, None)
    assert code == 0, out
    assert "2 skipped" in out and "error" not in out.lower()
    assert str(checkout.parent / "shared" / "data") in out


@pytest.mark.parametrize("require", ["1", "0"])
def test_missing_shared_data_fails_when_required(checkout: Path, require: str) -> None:
    code, out = _pytest(checkout, require)
    if require == "0":  # only "1" turns the rule on
        assert code == 0 and "2 skipped" in out, out
        return
    assert code != 0, out
    assert "2 errors" in out and "skipped" not in out, out
    assert str(checkout.parent / "shared" / "data") in out and "SEGMENT_REQUIRE_SHARED_DATA=1" in out


def test_missing_sub_folder_fails_with_its_path_when_required(checkout: Path) -> None:
    (checkout.parent / "shared" / "data").mkdir(parents=True)
    code, out = _pytest(checkout, "1")
    assert code != 0, out
    assert "1 passed" in out and "1 error" in out, out  # the folder exists; the hippocampus copy does not
    assert str(checkout.parent / "shared" / "data" / "hippocampus") in out
