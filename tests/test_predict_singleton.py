"""A scan stored as (X, Y, Z, 1) or (X, Y, Z, 1, 1) gets a label map of exactly that shape, with the scan's header.

Readers drop trailing size-1 axes (the network sees a 3D volume); the writer puts them back, so the label map has the
scan's shape, dim and pixdim as well as its qform and sform. A multi-channel 4D scan (X, Y, Z, C > 1, as MSD ships
BrainTumour/Prostate) still gives a 3D label map: a label map has no channel axis.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.inference.predictor import Predictor
from segment.io.image import (
    Geometry,
    read_image,
    read_label,
    to_canonical,
    write_image,
    write_label,
)

THRESHOLD = 50.0
SHAPE = (18, 20, 9)
SPACING = (0.8, 1.1, 2.5)


class ChannelThresholdNet(nn.Module):
    """Class 1 where channel 0 > THRESHOLD (other channels weigh 0): labels known voxel for voxel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(padding="same")
        self.conv = nn.Conv3d(channels, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 0, 0, 0] = torch.tensor([-1.0, 1.0])
            self.conv.bias.copy_(torch.tensor([THRESHOLD, -THRESHOLD]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _predictor(channels: int = 1) -> Predictor:
    """Identity normalisation (CT with mean 0, std 1 and a wide clip), so the threshold acts on raw intensities; the
    plan's spacing is the scan's in canonical (RAS) axis order, so nothing is resampled."""
    geom = Geometry.from_affine(_affines()[0], SHAPE)
    spacing = list(to_canonical(np.zeros(SHAPE, np.uint8), geom)[1].spacing)
    plan = Plan(spacing=spacing, patch_size=[16, 16, 8], batch_size=2, features=[4, 8], modality="ct",
                channels=channels, labels={0: "background", 1: "bright"}, ct_clip=[-1e4, 1e4], ct_mean=0.0, ct_std=1.0)
    cfg = Config(model=ModelConfig(in_channels=channels, out_channels=2, features=[4, 8]))
    return Predictor(ChannelThresholdNet(channels), plan, cfg, device="cpu", precision="32")


def _scan() -> np.ndarray:
    """An off-centre ellipsoid of 100 on 0 (asymmetric, so a flip or transpose would show)."""
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij")
    inside = sum(((g - 0.4 * n) / (0.25 * n)) ** 2 for g, n in zip(grids, SHAPE)) <= 1
    return np.where(inside, 100.0, 0.0).astype(np.float32)


def _affines() -> tuple[np.ndarray, np.ndarray]:
    """(sform, qform): an LIA grid with SPACING, and a qform 0.5 mm away from it (a header where they differ)."""
    sform = np.array([[-SPACING[0], 0, 0, 12.5], [0, 0, SPACING[2], -30.0], [0, -SPACING[1], 0, 7.25], [0, 0, 0, 1]])
    qform = sform.copy()
    qform[:3, 3] += 0.5
    return sform, qform


def _save(path: Path, data: np.ndarray) -> Path:
    sform, qform = _affines()
    img = nib.Nifti1Image(data, sform)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    nib.save(img, path)
    return path


def _same_header_geometry(out: nib.Nifti1Image, scan: nib.Nifti1Image) -> None:
    assert out.shape == scan.shape
    np.testing.assert_array_equal(out.header["dim"], scan.header["dim"])
    np.testing.assert_array_equal(out.header["pixdim"], scan.header["pixdim"])
    np.testing.assert_array_equal(out.header.get_qform(), scan.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), scan.header.get_sform())
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)


@pytest.mark.parametrize("trailing", [(), (1,), (1, 1)], ids=["3D", "4D-singleton", "5D-singleton"])
def test_label_map_has_the_shape_and_header_of_a_singleton_scan(tmp_path: Path, trailing: tuple[int, ...]) -> None:
    image = _scan()
    scan_path = _save(tmp_path / "scan.nii.gz", image.reshape(SHAPE + trailing))
    result = _predictor().predict_file(scan_path, tmp_path / "scan_seg.nii.gz",
                                       probabilities=tmp_path / "scan_prob.nii.gz")
    scan, out = nib.load(scan_path), nib.load(result["output"])
    assert out.shape == SHAPE + trailing  # was SHAPE for (X, Y, Z, 1) and (X, Y, Z, 1, 1)
    _same_header_geometry(out, scan)
    assert out.get_data_dtype() == np.uint8 and out.header.get_intent()[0] == "label"
    labels = np.asarray(out.dataobj).reshape(SHAPE)
    np.testing.assert_array_equal(labels, image > THRESHOLD)
    assert labels.sum() > 50
    # probabilities keep their class axis: (X, Y, Z, K), whatever trailing axes the scan had
    assert nib.load(tmp_path / "scan_prob.nii.gz").shape == (*SHAPE, 2)
    # segment reads its own output back as the 3D label map on the scan's grid
    np.testing.assert_array_equal(read_label(result["output"], reference=read_image(scan_path)[1]), labels)
    # ITK (3D Slicer, ITK-SNAP) reads the label map as it reads the scan: same size, spacing, origin, direction
    s_scan, s_out = sitk.ReadImage(str(scan_path)), sitk.ReadImage(result["output"])
    assert s_out.GetSize() == s_scan.GetSize() == SHAPE
    np.testing.assert_allclose(s_out.GetSpacing(), s_scan.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(s_out.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(s_out.GetOrigin(), s_scan.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(s_out.GetDirection(), s_scan.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(s_out)), labels)


@pytest.mark.parametrize("trailing", [(1,), (1, 1)], ids=["4D-singleton", "5D-singleton"])
def test_in_memory_singleton_scan_gives_a_label_image_of_its_shape(trailing: tuple[int, ...]) -> None:
    image = _scan()
    sform, _ = _affines()
    scan = nib.Nifti1Image(image.reshape(SHAPE + trailing), sform)
    out = _predictor().predict_nifti(scan)  # (X, Y, Z, 1, 1) was refused as "2D (a single slice)"
    assert out.shape == SHAPE + trailing
    np.testing.assert_array_equal(out.header["dim"], scan.header["dim"])
    np.testing.assert_allclose(out.affine, sform)
    np.testing.assert_array_equal(np.asarray(out.dataobj).reshape(SHAPE), image > THRESHOLD)


@pytest.mark.parametrize("trailing", [(2,), (2, 1)], ids=["4D-channels", "5D-channels"])
def test_multichannel_4d_scan_gives_a_3d_label_map(tmp_path: Path, trailing: tuple[int, ...]) -> None:
    image = _scan()
    other = np.full(SHAPE, 1000.0, np.float32)  # weighs 0 in the net: only channel 0 decides
    scan_path = _save(tmp_path / "mm.nii.gz", np.stack([image, other], axis=-1).reshape(SHAPE + trailing))
    result = _predictor(channels=2).predict_file(scan_path, tmp_path / "mm_seg.nii.gz")
    scan, out = nib.load(scan_path), nib.load(result["output"])
    assert out.shape == SHAPE and int(out.header["dim"][0]) == 3 and list(out.header["dim"][4:]) == [1, 1, 1, 1]
    np.testing.assert_array_equal(out.header["pixdim"][1:4], scan.header["pixdim"][1:4])
    np.testing.assert_array_equal(out.header.get_qform(), scan.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), scan.header.get_sform())
    np.testing.assert_array_equal(np.asarray(out.dataobj), image > THRESHOLD)
    assert sitk.ReadImage(result["output"]).GetSize() == SHAPE


def test_writers_restore_the_singleton_axes_of_the_source(tmp_path: Path) -> None:
    labels = (_scan() > THRESHOLD).astype(np.int16)
    _, geom = read_image(_save(tmp_path / "scan.nii.gz", _scan()[..., None]))
    assert geom.shape == SHAPE  # read as 3D
    assert nib.load(write_label(labels, geom, tmp_path / "lab.nii.gz")).shape == (*SHAPE, 1)
    assert nib.load(write_image(labels.astype(np.float32), geom, tmp_path / "map.nii.gz")).shape == (*SHAPE, 1)
    assert nib.load(write_image(np.zeros((*SHAPE, 3), np.uint8), geom, tmp_path / "p.nii.gz")).shape == (*SHAPE, 3)
    # --overwrite still recognises the 4D file as segment's own
    write_label(labels * 0, geom, tmp_path / "lab.nii.gz", overwrite=True)
    assert not np.asarray(nib.load(tmp_path / "lab.nii.gz").dataobj).any()
