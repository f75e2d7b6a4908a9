"""Predictions land on the scan's own voxels, whatever its orientation, obliquity and spacing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.errors import GeometryError, InputError
from segment.inference.postprocess import keep_largest_components
from segment.inference.predictor import Predictor
from segment.io.image import Geometry, read_image, to_canonical

THRESHOLD = 50.0


class ThresholdNet(nn.Module):
    """Class 1 where intensity > THRESHOLD: a fixed 1x1x1 conv, so its labels are known voxel for voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(padding="same")
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([THRESHOLD, -THRESHOLD]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ValidThresholdNet(ThresholdNet):
    """The same threshold as a valid-padded net: a 3x3x3 unpadded conv weighing only its centre, so the output is the
    input less one voxel per side (margin 2) and overlap-tile must put every output voxel back on its input voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(padding="valid")
        self.conv = nn.Conv3d(1, 2, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 1, 1, 1] = torch.tensor([-1.0, 1.0])
            self.conv.bias.copy_(torch.tensor([THRESHOLD, -THRESHOLD]))

    def size_multiples(self) -> tuple[int, ...]:
        return (1, 1, 1)

    def min_input_sizes(self) -> tuple[int, ...]:
        return (3, 3, 3)

    def output_margins(self) -> tuple[int, ...]:
        return (2, 2, 2)

    def output_size(self, size) -> tuple[int, ...]:
        return tuple(int(n) - 2 for n in size)

    def input_size_for(self, size) -> tuple[int, ...]:
        return tuple(int(n) + 2 for n in size)


def _rotation(deg: float) -> np.ndarray:
    a, b = np.deg2rad(deg), np.deg2rad(deg / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


# voxel-axis directions (columns) of each test grid
DIRECTIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LIA": np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "oblique": _rotation(20.0),
}


def _affine(direction: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = [-12.5, 30.0, 7.25]
    return affine


def _plan(spacing: list[float], patch: list[int] | None = None) -> Plan:
    """CT plan whose normalisation is the identity (mean 0, std 1, wide clip), so the threshold acts on raw values."""
    return Plan(spacing=spacing, patch_size=patch or [16, 16, 8], batch_size=2, features=[4, 8], modality="ct",
                channels=1, labels={0: "background", 1: "bright"}, ct_clip=[-1e4, 1e4], ct_mean=0.0, ct_std=1.0)


def _predictor(plan: Plan, padding: str = "same", **kwargs: object) -> Predictor:
    cfg = Config(model=ModelConfig(out_channels=2, features=[4, 8], padding=padding))
    net = ValidThresholdNet() if padding == "valid" else ThresholdNet()
    return Predictor(net, plan, cfg, device="cpu", precision="32", **kwargs)


def _canonical_spacing(geometry: Geometry) -> list[float]:
    return list(to_canonical(np.zeros(geometry.shape, np.uint8), geometry)[1].spacing)


def _ellipsoid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """An off-centre ellipsoid (world mm) with value 100 on 0; asymmetric so a flip would show."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre = [0.4 * n * s for n, s in zip(shape, spacing)]
    radii = [0.25 * n * s for n, s in zip(shape, spacing)]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
    return np.where(inside, 100.0, 0.0).astype(np.float32)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_labels_land_on_the_same_voxels_without_resampling(name: str, padding: str) -> None:
    spacing = (0.8, 1.0, 2.5)
    rng = np.random.default_rng(0)
    image = np.where(rng.random((21, 18, 11)) > 0.6, 100.0, 0.0).astype(np.float32)
    geometry = Geometry.from_affine(_affine(DIRECTIONS[name], spacing), image.shape, source=name)
    predictor = _predictor(_plan(_canonical_spacing(geometry)), padding)
    labels, probs = predictor.predict_labels([image], geometry, keep_probabilities=True)
    assert labels.shape == geometry.shape and probs is not None and probs.shape == (2, *geometry.shape)
    np.testing.assert_array_equal(labels, (image > THRESHOLD).astype(np.uint8))


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_labels_land_on_the_same_voxels_with_resampling(name: str, padding: str) -> None:
    spacing = (0.8, 1.0, 2.5)
    image = _ellipsoid((40, 36, 16), spacing)
    geometry = Geometry.from_affine(_affine(DIRECTIONS[name], spacing), image.shape, source=name)
    predictor = _predictor(_plan([1.5, 1.5, 1.5]), padding)
    labels = predictor.predict_probabilities([image], geometry).argmax(0)
    truth = image > THRESHOLD
    dice = 2 * np.sum(labels.astype(bool) & truth) / (labels.astype(bool).sum() + truth.sum())
    assert labels.shape == geometry.shape
    assert dice > 0.95, f"{name}: Dice {dice:.3f}"


def test_written_file_keeps_shape_and_affine(tmp_path: Path) -> None:
    spacing = (0.7, 1.1, 3.0)
    image = _ellipsoid((30, 26, 12), spacing)
    affine = _affine(DIRECTIONS["oblique"] @ DIRECTIONS["LIA"], spacing)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    predictor = _predictor(_plan([1.0, 1.0, 1.0]), tta=True)
    result = predictor.predict_file(tmp_path / "scan.nii.gz", tmp_path / "scan_seg.nii.gz",
                                    probabilities=tmp_path / "scan_prob.nii.gz")
    out, prob = nib.load(result["output"]), nib.load(tmp_path / "scan_prob.nii.gz")
    assert out.shape == image.shape and prob.shape == (*image.shape, 2)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    np.testing.assert_allclose(out.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(prob.affine, affine, atol=1e-5)
    expected_ml = float((np.asarray(out.dataobj) == 1).sum() * np.prod(spacing) / 1000)
    assert result["volumes_ml"]["bright"] == pytest.approx(expected_ml)
    assert result["volumes_ml"]["bright"] > 0
    with pytest.raises(InputError, match="exists"):
        predictor.predict_file(tmp_path / "scan.nii.gz", tmp_path / "scan_seg.nii.gz")


def test_predict_nifti_returns_input_grid() -> None:
    image = _ellipsoid((20, 22, 10), (1.0, 1.0, 2.0))
    affine = _affine(DIRECTIONS["LPS"], (1.0, 1.0, 2.0))
    out = _predictor(_plan([1.0, 1.0, 2.0])).predict_nifti(nib.Nifti1Image(image, affine))
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj), image > THRESHOLD)


def test_bad_inputs_raise_one_line_errors() -> None:
    predictor = _predictor(_plan([1.0, 1.0, 1.0]))
    geometry = Geometry.from_affine(np.eye(4), (8, 8, 8))
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(InputError, match="expects 1"):
        predictor.predict_labels([volume, volume], geometry)
    flat = Geometry.from_affine(np.eye(4), (8, 8, 1))
    with pytest.raises(InputError, match="2D"):
        predictor.predict_labels([np.zeros((8, 8, 1), np.float32)], flat)
    with pytest.raises(GeometryError):
        predictor.predict_labels([np.zeros((8, 8, 7), np.float32)], geometry)


def test_largest_component_keeps_one_blob_per_class() -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # 64 voxels: kept
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels: removed
    labels[8:11, 1:3, 1:3] = 2  # only blob of class 2: kept
    out = keep_largest_components(labels)
    assert out.dtype == labels.dtype
    assert (out == 1).sum() == 64 and (out == 2).sum() == 12 and out[9, 9, 9] == 0


def test_real_image_reader_geometry_is_used(tmp_path: Path) -> None:
    """predict_file reads through segment.io, so a NIfTI on disk predicts like its in-memory voxels."""
    image = _ellipsoid((18, 20, 9), (1.0, 1.0, 2.0))
    affine = _affine(DIRECTIONS["LIA"], (1.0, 1.0, 2.0))
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "a.nii.gz")
    arr, geometry = read_image(tmp_path / "a.nii.gz")
    predictor = _predictor(_plan(_canonical_spacing(geometry)))
    predictor.predict_file([tmp_path / "a.nii.gz"], tmp_path / "a_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "a_seg.nii.gz").dataobj), arr > THRESHOLD)
