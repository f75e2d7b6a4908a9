"""Planning on constructed fingerprints and tiny datasets: spacing, median shape, patch, depth, widths and batch, with the
expected values worked out by hand from the rules in segment/data/plan.py."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segment.data.plan as plan_module
from segment.config import Config, DataConfig
from segment.data.fingerprint import fingerprint
from segment.data.plan import make_plan, plan_patch
from segment.io.dataset import Case, Dataset

CPU_BUDGET, CUDA_BUDGET = 64**3, 128**3  # 262,144 and 2,097,152 voxels

# plan_patch, by hand:
#   1. shrink the longest axis by 0.9 (the first on ties) while the product exceeds the budget;
#   2. depth = clamp(int(log2(max(min axis, 4) / 4)) + 1, 2, 5);
#   3. round every axis up to a multiple of 2**(depth - 1), at least twice that multiple.
PATCH_CASES = [
    # 35 x 50 x 36 (hippocampus-like) = 63,000 voxels fits both budgets untouched; min 35: log2(8.75) = 3.13 -> depth 4,
    # multiple 8: 35 -> 40, 50 -> 56, 36 -> 40.
    ((35, 50, 36), CPU_BUDGET, [40, 56, 40], 4),
    ((35, 50, 36), CUDA_BUDGET, [40, 56, 40], 4),
    # 512 x 512 x 100 CT, 64^3: the two 512 axes take turns; after 16 shrinks each they are 512 * 0.9^16 = 94.9 < 100,
    # then all three take turns. 44 shrinks in all: x = y = 512 * 0.9^20 = 62.25, z = 100 * 0.9^4 = 65.61
    # (62.25^2 * 65.61 = 254,220 <= 262,144; one shrink earlier, 62.25 * 69.16 * 65.61 = 282,467 did not fit).
    # min 62.25: log2(15.6) = 3.96 -> depth 4, multiple 8: 62.25 -> 64, 65.61 -> 72.
    ((512, 512, 100), CPU_BUDGET, [64, 64, 72], 4),
    # 128^3: x = y = 512 * 0.9^12 = 144.6, z stays 100 (144.6^2 * 100 = 2,091,029 <= 2,097,152);
    # min 100: log2(25) = 4.64 -> depth 5, multiple 16: 144.6 -> 160, 100 -> 112.
    ((512, 512, 100), CUDA_BUDGET, [160, 160, 112], 5),
    # small: min 8 -> log2(2) = 1 -> depth 2, multiple 2: 20, 20, 8 unchanged
    ((20, 20, 8), CPU_BUDGET, [20, 20, 8], 2),
    # tiny: min 3 < 4 -> log2(1) = 0 -> depth 1, clamped to 2; multiple 2, at least 4: 6, 6, 3 -> 6, 6, 4
    ((6, 6, 3), CPU_BUDGET, [6, 6, 4], 2),
]


@pytest.mark.parametrize("median, budget, patch, depth", PATCH_CASES)
def test_plan_patch_exact_values(median: tuple[int, ...], budget: int, patch: list[int], depth: int) -> None:
    assert plan_patch(median, budget) == (patch, depth)


def _dataset(n: int, modality: str, root: Path = Path("/nonexistent")) -> Dataset:
    cases = [Case(f"c{i}", (root / f"c{i}.nii.gz",), root / f"c{i}_seg.nii.gz") for i in range(n)]
    return Dataset(root=root, cases=cases, labels={0: "background", 1: "organ"}, modality=modality, channels=1)


def _fake_fingerprint(monkeypatch: pytest.MonkeyPatch, shapes: list[list[int]], spacings: list[list[float]],
                      fg: tuple[float, float, float] = (-100.0, 40.0, 250.0), mean: float = 45.0, std: float = 60.0) -> None:
    fp = {"ordered_axes": {}, "shapes": shapes, "spacings": spacings,
          "median_spacing": np.median(np.array(spacings), axis=0).tolist(), "fg_percentiles": list(fg),
          "fg_mean": mean, "fg_std": std}
    monkeypatch.setattr(plan_module, "fingerprint", lambda dataset, *args, **kwargs: fp)


# Three CTs: spacing medians per axis (0.7, 0.8, 0.6) -> 0.7 and (2.5, 3.0, 2.0) -> 2.5.
# Resampled to 0.7 x 0.7 x 2.5 (round(n * s / t)): 512x512x100 -> 512x512x100; 448x448x90 at 0.8/3.0 -> 512x512x108;
# 512x512x100 at 0.6/2.0 -> 439x439x80. Median shape 512 x 512 x 100.
CT_SHAPES = [[512, 512, 100], [448, 448, 90], [512, 512, 100]]
CT_SPACINGS = [[0.7, 0.7, 2.5], [0.8, 0.8, 3.0], [0.6, 0.6, 2.0]]


# z (2.5 mm) is > 2x the in-plane spacing: with the default data.anisotropic=true these CTs get nnU-Net's per-axis plan
# (tests/test_anisotropic.py); here the rules every axis shares, as planned with data.anisotropic=false.
ISOTROPIC = Config(data=DataConfig(anisotropic=False))


def test_ct_plan_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fingerprint(monkeypatch, CT_SHAPES, CT_SPACINGS)
    plan, _ = make_plan(_dataset(3, "ct"), ISOTROPIC, device="cpu")
    assert plan.spacing == pytest.approx([0.7, 0.7, 2.5])
    assert plan.median_shape == [512, 512, 100]
    assert plan.patch_size == [64, 64, 72]
    # depth 4 = len of the default [8, 32, 64, 128]: kept as is
    assert plan.features == [8, 32, 64, 128]
    # 448,000 voxels per CPU step // (64 * 64 * 72 = 294,912) = 1, raised to the minimum batch of 2
    assert plan.batch_size == 2
    assert plan.modality == "ct" and plan.channels == 1 and plan.num_cases == 3
    # CT window = the foreground's 0.5 and 99.5 percentiles; z-score with its mean and std
    assert (plan.ct_clip, plan.ct_mean, plan.ct_std) == ([-100.0, 250.0], 45.0, 60.0)
    assert plan.mirror_axes == [0, 1, 2]


def test_ct_plan_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fingerprint(monkeypatch, CT_SHAPES, CT_SPACINGS)
    plan, _ = make_plan(_dataset(3, "ct"), ISOTROPIC, device="cuda")
    assert plan.patch_size == [160, 160, 112]
    # depth 5 != 4 stages given: widths double from the base 16
    assert plan.features == [8, 32, 64, 128, 256]
    # 2 * 128^3 = 4,194,304 // (160 * 160 * 112 = 2,867,200) = 1 -> 2
    assert plan.batch_size == 2
    # widths are capped at 320
    wide = Config.model_validate({"model": {"features": [32, 64]}, "data": {"anisotropic": False}})
    assert make_plan(_dataset(3, "ct"), wide, device="cuda")[0].features == [32, 64, 128, 256, 320]


def test_mr_plan_for_a_35x50x36_median(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = [[35, 50, 36], [34, 52, 35], [36, 49, 38]]  # median per axis: 35, 50, 36
    _fake_fingerprint(monkeypatch, shapes, [[1.0, 1.0, 1.0]] * 3)
    cpu, _ = make_plan(_dataset(3, "mri"), Config(), device="cpu")
    assert cpu.spacing == [1.0, 1.0, 1.0] and cpu.median_shape == [35, 50, 36]
    assert cpu.patch_size == [40, 56, 40] and cpu.features == [8, 32, 64, 128]
    assert cpu.batch_size == 5  # 448,000 // (40 * 56 * 40 = 89,600) = 5
    assert cpu.modality == "mri"
    cuda, _ = make_plan(_dataset(3, "mri"), Config(), device="cuda")
    assert cuda.patch_size == [40, 56, 40] and cuda.batch_size == 16  # 4,194,304 // 89,600 = 46, capped at 16


def test_config_values_override_planned_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fingerprint(monkeypatch, CT_SHAPES, CT_SPACINGS)
    cfg = Config(data=DataConfig(target_spacing=[1.4, 1.4, 5.0], patch_size=[48, 48, 32], batch_size=3,
                                 ct_clip=[-50.0, 150.0]))
    plan, _ = make_plan(_dataset(3, "ct"), cfg, device="cpu")
    assert plan.spacing == [1.4, 1.4, 5.0]
    # shapes at 1.4 x 1.4 x 5: 256x256x50, 256x256x54, 219x219x40 -> median 256 x 256 x 50
    assert plan.median_shape == [256, 256, 50]
    assert plan.patch_size == [48, 48, 32] and plan.batch_size == 3 and plan.ct_clip == [-50.0, 150.0]
    assert plan.features == [8, 32, 64, 128]  # a given patch keeps the configured depth


def test_median_shape_is_the_shape_preprocessing_produces(monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.data.preprocess import resampled_shape

    _fake_fingerprint(monkeypatch, [[101, 8, 8]] * 3, [[3.0, 1.0, 1.0]] * 3)
    plan, _ = make_plan(_dataset(3, "mri"), Config(data=DataConfig(target_spacing=[6.0, 1.0, 1.0])), device="cpu")
    assert list(resampled_shape((101, 8, 8), (3.0, 1.0, 1.0), (6.0, 1.0, 1.0))) == [51, 8, 8]
    assert plan.median_shape == [51, 8, 8]


# ---- a fingerprint of real (tiny) files, and the plan made from it -----------------------------------------------
CASES = [  # shape, spacing, foreground intensities
    ((6, 5, 4), (1.0, 1.0, 2.0), [10.0, 20.0]),
    ((8, 5, 4), (1.5, 1.0, 3.0), [30.0]),
    ((6, 7, 4), (0.8, 1.2, 2.5), [40.0, 50.0, 60.0]),
]


@pytest.fixture
def tiny_ct(tmp_path: Path) -> Dataset:
    cases = []
    for i, (shape, spacing, fg) in enumerate(CASES):
        image = np.full(shape, 1000.0, np.float32)  # background intensity far from the foreground's
        label = np.zeros(shape, np.uint8)
        for j, value in enumerate(fg):
            image[1 + j, 1, 1] = value
            label[1 + j, 1, 1] = 1
        affine = np.diag([*spacing, 1.0])  # RAS: canonical axes are the file's axes
        nib.save(nib.Nifti1Image(image, affine), tmp_path / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / f"c{i}_seg.nii.gz")
        cases.append(Case(f"c{i}", (tmp_path / f"c{i}.nii.gz",), tmp_path / f"c{i}_seg.nii.gz"))
    return Dataset(root=tmp_path, cases=cases, labels={0: "background", 1: "organ"}, modality="ct", channels=1)


def test_fingerprint_of_tiny_files(tiny_ct: Dataset) -> None:
    fp = fingerprint(tiny_ct)
    assert fp["shapes"] == [[6, 5, 4], [8, 5, 4], [6, 7, 4]]
    np.testing.assert_allclose(fp["spacings"], [[1.0, 1.0, 2.0], [1.5, 1.0, 3.0], [0.8, 1.2, 2.5]], rtol=1e-6)
    assert fp["median_spacing"] == pytest.approx([1.0, 1.0, 2.5])  # medians of (1, 1.5, 0.8), (1, 1, 1.2), (2, 3, 2.5)
    # foreground only (never the 1000 background): 10, 20, ..., 60; mean 35, population std sqrt(1750 / 6)
    assert fp["fg_mean"] == pytest.approx(35.0)
    assert fp["fg_std"] == pytest.approx(np.sqrt(1750 / 6))
    # linear percentiles of 6 sorted values: 0.5 % -> 10 + 0.025 * 10, 50 % -> 35, 99.5 % -> 60 - 0.025 * 10
    assert fp["fg_percentiles"] == pytest.approx([10.25, 35.0, 59.75])


def test_plan_of_tiny_files(tiny_ct: Dataset) -> None:
    plan, _ = make_plan(tiny_ct, Config(), device="cpu")
    assert plan.spacing == pytest.approx([1.0, 1.0, 2.5])
    # at 1 x 1 x 2.5: 6x5x3.2 -> 6x5x3, 12x5x4.8 -> 12x5x5, 4.8x8.4x4 -> 5x8x4; median 6 x 5 x 4
    assert plan.median_shape == [6, 5, 4]
    # min 4 -> depth 2, multiple 2, at least 4: 6, 5 -> 6, 4
    assert plan.patch_size == [6, 6, 4] and plan.features == [8, 32]
    assert plan.batch_size == 16  # 448,000 // 144, capped at 16
    assert plan.ct_clip == pytest.approx([10.25, 59.75]) and plan.ct_mean == pytest.approx(35.0)
    assert plan.num_cases == 3 and plan.labels == {0: "background", 1: "organ"}


def test_budgets_and_output_size_round_trip() -> None:
    from segment.data.plan import Plan, patch_budget, step_voxels

    assert (patch_budget("cpu"), patch_budget("cuda")) == (CPU_BUDGET, CUDA_BUDGET)
    assert (step_voxels("cpu"), step_voxels("cuda")) == (448_000, 2 * 128**3)
    plan = Plan(spacing=[1.0] * 3, patch_size=[71, 79, 79], batch_size=1, features=[16, 32, 64, 128], modality="mri",
                channels=1, labels={0: "background", 1: "a"}, output_size=[18, 26, 26])
    again = Plan.from_dict(plan.to_dict())
    assert again.output_size == [18, 26, 26] and again.output_margins() == [53, 53, 53]
    old = plan.to_dict()
    del old["output_size"]  # plans written before valid-mode planning: same padding
    assert Plan.from_dict(old).output_margins() is None
