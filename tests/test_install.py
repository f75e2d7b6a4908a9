"""A real, non-editable install works: `pip install .` puts the code and the shipped configs in site-packages, and
`segment doctor`, `segment train` (demo) and `segment predict` run from any folder without the source checkout and
without writing into the installed package (the demo dataset goes to $SEGMENT_HOME).

The wheel is built from a copy of the sources (so the checkout gets no build/ folder) and installed with
`pip install --no-deps --target`: the dependencies are the ones of the interpreter running the tests, the package is
only the installed copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = ("default.yaml", "demo.yaml", "gpu.yaml")


def _setuptools_ok() -> bool:
    """Whether this interpreter's setuptools can build the wheel without an isolated (downloading) build env."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    return int(version("setuptools").split(".")[0]) >= 68


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time: any write shows up as a difference."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "segment", src / "segment", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(base / "wheels")]
    if _setuptools_ok():
        build.append("--no-build-isolation")  # offline and fast; otherwise pip fetches setuptools>=68 itself
    subprocess.run([*build, str(src)], check=True, timeout=300)  # an absolute path: pip never reads it as a name
    (wheel,) = (base / "wheels").glob("segment-*.whl")
    target = base / "site"
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    return {"base": base, "wheel": wheel, "target": target}


def _env(target: Path, home: Path) -> dict[str, str]:
    """Only the installed copy is importable (PYTHONPATH = target; the checkout is neither cwd nor on the path);
    HOME and the caches point into the test folder, so nothing outside it is touched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SEGMENT_"))}
    env.update(
        PYTHONPATH=str(target), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", SEGMENT_HOME=str(home / "segment"),
        HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), MPLCONFIGDIR=str(home / "mpl"), NO_COLOR="1",
        COLUMNS="200",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{args[1:]} exited with {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_ships_the_configs(installed: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for config in SHIPPED_CONFIGS:
        assert f"segment/configs/{config}" in names, f"{config} is not package data"
        packaged = (ROOT / "segment" / "configs" / config).read_bytes()
        assert zipfile.ZipFile(installed["wheel"]).read(f"segment/configs/{config}") == packaged
    assert not (ROOT / "configs").exists(), "configs live in segment/configs/ only: one copy, shipped in the wheel"


def test_installed_copy_is_the_one_imported(installed: dict[str, Path], tmp_path: Path) -> None:
    target = installed["target"]
    code = (
        "import json, segment, segment.config as c, segment.data.demo as d; "
        "print(json.dumps([segment.__file__, str(c.CONFIG_DIR), str(d.DEFAULT_DEMO_DIR)]))"
    )
    out = _run([sys.executable, "-c", code], tmp_path, _env(target, tmp_path / "home")).stdout
    module, config_dir, demo_dir = (Path(p) for p in json.loads(out.strip().splitlines()[-1]))
    assert module.is_relative_to(target), f"imported {module}, not the installed copy"
    assert config_dir == target / "segment" / "configs"
    assert sorted(p.name for p in config_dir.glob("*.yaml")) == sorted(SHIPPED_CONFIGS)
    assert demo_dir == tmp_path / "home" / "segment" / "demo"


@pytest.mark.slow
def test_doctor_train_predict_from_another_folder(installed: dict[str, Path], tmp_path: Path) -> None:
    target = installed["target"]
    segment = [sys.executable, str(target / "bin" / "segment")]  # the console script pip wrote
    env = _env(target, tmp_path / "home")
    work = tmp_path / "work"
    work.mkdir()
    before = _listing(target)

    _run([*segment, "doctor", "--device", "cpu"], work, env)
    # no --data, no --config: the demo dataset with the shipped demo.yaml, cut to 2 steps of 1 epoch on 4 cases
    _run([*segment, "train", "--set", "train.max_epochs=1", "--set", "train.steps_per_epoch=2",
          "--set", "data.max_cases=4", "--precision", "32", "-o", "runs/tiny"], work, env)
    demo = tmp_path / "home" / "segment" / "demo"
    assert (demo / "dataset.json").is_file(), "the demo dataset was not generated in $SEGMENT_HOME/demo"
    run = work / "runs" / "tiny"
    assert (run / "checkpoints" / "best.ckpt").is_file()
    import yaml

    used = yaml.safe_load((run / "config.yaml").read_text())
    assert used["train"]["lr"] == yaml.safe_load((ROOT / "segment" / "configs" / "demo.yaml").read_text())["train"]["lr"]

    scan = demo / "imagesTr" / "demo_000.nii.gz"
    _run([*segment, "predict", str(scan), "-o", "preds/demo_000.nii.gz", "--model", "runs/tiny", "--device", "cpu"],
         work, env)
    assert (work / "preds" / "demo_000.nii.gz").is_file()

    assert sorted(p.name for p in work.iterdir()) == ["preds", "runs"], "train/predict wrote outside their outputs"
    assert _listing(target) == before, "something was written into the installed package"
