"""CT found without dataset.json: a plain folder of pairs whose intensities are Hounsfield units is planned as CT (the
rule in segment/data/plan.py's docstring), anything else is not, `--modality` / data.modality overrides, and the plan
records which rule decided."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from segment.config import Config, DataConfig
from segment.data.modality import decide_modalities, detect_ct
from segment.data.plan import make_plan
from segment.io.dataset import Case, Dataset, discover


def _body(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid body and a cylinder of bone inside it."""
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = x**2 / 0.8 + y**2 / 0.6 < 1
    bone = (x**2 + (y + 0.2) ** 2 < 0.04) & body
    return body, bone


def _write_folder(root: Path, make: Any, n: int = 3, shape: tuple[int, int, int] = (24, 20, 12)) -> Path:
    """Plain pairs X.nii.gz + X_seg.nii.gz, no dataset.json; `make(rng, body, bone)` gives the image array."""
    root.mkdir()
    rng = np.random.default_rng(0)
    body, bone = _body(shape)
    for i in range(n):
        image = make(rng, body, bone)
        label = (body & ~bone & (np.abs(np.indices(shape)[0] - shape[0] // 2) < 4)).astype(np.uint8)
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / f"case{i}_seg.nii.gz")
    return root


def _ct(rng: np.random.Generator, body: np.ndarray, bone: np.ndarray, fill: int | None = None) -> np.ndarray:
    """int16 HU: air -1024 outside, soft tissue ~40, bone ~700; optionally a corner fill outside the field of view."""
    image = np.full(body.shape, -1024.0)
    image[body] = rng.normal(40, 15, body.sum())
    image[bone] = rng.normal(700, 80, bone.sum())
    image[~body] += rng.normal(0, 10, (~body).sum()).clip(0, None)  # air noise, clipped at -1024 as scanners store it
    if fill is not None:
        image[:3, :3, :] = fill
    return np.round(image).astype(np.int16)


def _mr(rng: np.random.Generator, body: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """Positive arbitrary-scale intensities, as magnitude MR: noise floor outside, tissue a few hundred, dark bone."""
    image = np.abs(rng.normal(0, 5, body.shape))
    image[body] = rng.normal(450, 60, body.sum()) * rng.uniform(0.5, 3)
    image[bone] = rng.normal(60, 10, bone.sum())
    return image.astype(np.float32)


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("ct") / "pairs", _ct)


@pytest.fixture(scope="module")
def mr_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("mr") / "pairs", _mr)


def test_plain_ct_folder_is_planned_as_ct(ct_folder: Path) -> None:
    dataset = discover(ct_folder)
    assert dataset.modality == "unknown"  # nothing declared: no dataset.json
    plan, _ = make_plan(dataset, Config(), device="cpu")
    assert plan.modality == "ct" and plan.channel_modalities == ["ct"]
    assert plan.modality_source.startswith("detected: HU range")
    # CT normalisation follows: the window is the foreground's percentiles, in HU
    assert -100 < plan.ct_clip[0] < 40 < plan.ct_clip[1] < 200


def test_plain_mr_folder_is_not_ct(mr_folder: Path) -> None:
    plan, _ = make_plan(discover(mr_folder), Config(), device="cpu")
    assert plan.modality == "mri"
    assert plan.modality_source.startswith("detected: not HU")


def test_modality_setting_overrides_detection(ct_folder: Path, mr_folder: Path) -> None:
    ct, mr = discover(ct_folder), discover(mr_folder)
    assert decide_modalities(ct, "mri") == (["mri"], "--modality")
    assert decide_modalities(mr, "ct") == (["ct"], "--modality")
    plan, _ = make_plan(ct, Config(data=DataConfig(modality="other")), device="cpu")
    assert (plan.modality, plan.modality_source) == ("other", "--modality")


def test_dataset_json_decides_before_detection(ct_folder: Path) -> None:
    dataset = discover(ct_folder)
    dataset.modality, dataset.channel_modalities = "mri", ["mri"]  # as if dataset.json said {"0": "MRI"}
    assert decide_modalities(dataset) == (["mri"], "dataset.json")


@pytest.mark.parametrize("make, is_ct, why", [
    (lambda rng, body, bone: _ct(rng, body, bone, fill=-3024), True, "HU range"),  # outside-FOV fill is left out
    (lambda rng, body, bone: _ct(rng, body, bone).astype(np.float32) + 0.25, False, "not integers"),  # resampled CT
    (lambda rng, body, bone: rng.integers(-4096, 4096, body.shape).astype(np.int16), False, "below -1100"),  # phase map
    (lambda rng, body, bone: (_ct(rng, body, bone) + 1024).astype(np.int16), False, "no air"),  # stored without offset
    (lambda rng, body, bone: np.where(body, 5000, -1024).astype(np.int16), False, "above 3100"),
])
def test_detection_rule_cases(tmp_path: Path, make: Any, is_ct: bool, why: str) -> None:
    dataset = discover(_write_folder(tmp_path / "pairs", make, n=2))
    found, reason = detect_ct(dataset)
    assert found is is_ct and why in reason, reason


@pytest.mark.parametrize("name, expected", [("ct_example", "ct"), ("mr_example", "mri")])
def test_real_ct_and_mr_are_detected_right(real_ct_mr: Path, name: str, expected: str) -> None:
    case = Case(name, (real_ct_mr / "images" / f"{name}.nii.gz",), real_ct_mr / "labels" / f"{name}.nii.gz")
    dataset = Dataset(root=real_ct_mr, cases=[case], labels={}, modality="unknown", channels=1)
    kinds, source = decide_modalities(dataset)
    assert kinds == [expected], source
    assert source.startswith("detected: HU range" if expected == "ct" else "detected: not HU")


def test_train_modality_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import segment.train.runner
    from segment.cli import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(segment.train.runner, "train", lambda cfg, **kwargs: seen.update(cfg=cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", "somewhere", "--modality", "ct"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].data.modality == "ct"
    result = runner.invoke(app, ["train", "--data", "somewhere", "--modality", "pet"])
    assert result.exit_code == 2 and "data.modality" in result.output
