"""Per-case confidence: the score, the threshold, the out-of-distribution check and the CSV `segment predict` writes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.data.profile import ood_reasons, scan_profile
from segment.inference.confidence import DEFAULT_THRESHOLD, ConfidenceStats, choose_threshold, flag_text, score_probabilities
from segment.inference.predictor import Predictor
from segment.io.geometry import Geometry
from tests.fixed_nets import FixedConv


def _plan(modality: str = "mri") -> Plan:
    return Plan(spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], batch_size=2, features=[4, 8], modality=modality,
                channels=1, labels={0: "background", 1: "organ"}, mirror_axes=[0, 1, 2])


def _predictor(**kwargs) -> Predictor:
    """Logits 4 - 4z, 4z - 4 on the per-image z-score z: voxels above one standard deviation are the organ."""
    cfg = Config(model=ModelConfig(features=[4, 8], out_channels=2))
    return Predictor(FixedConv([-4.0, 4.0], [4.0, -4.0]), _plan(), cfg, device="cpu", precision="32", tta=False,
                     **kwargs)


def _geometry(shape: tuple[int, ...], spacing: float = 1.0) -> Geometry:
    return Geometry.from_affine(np.diag([spacing, spacing, spacing, 1.0]), shape, source="<test>")


def _sphere(shape: tuple[int, int, int] = (24, 24, 24), value: float = 400.0) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32) - (np.array(shape)[:, None, None, None] - 1) / 2
    return np.where((grid ** 2).sum(0) < 36, value, 50.0).astype(np.float32)


def test_score_values_by_hand() -> None:
    # certain voxels: entropy 0 -> score 1; a uniform voxel over 2 classes: normalised entropy 1
    certain = np.zeros((2, 2, 2, 2), np.float32)
    certain[1] = 1.0
    assert score_probabilities(certain) == pytest.approx(1.0)
    half = np.full((2, 2, 2, 2), 0.5, np.float32)
    assert score_probabilities(half) == pytest.approx(0.0, abs=1e-6)
    mixed = certain.copy()
    mixed[:, 0, 0, 0] = 0.5  # one of 8 region voxels uniform: mean normalised entropy 1/8
    assert score_probabilities(mixed) == pytest.approx(1 - 1 / 8, abs=1e-6)
    background = np.zeros((2, 3, 3, 3), np.float32)
    background[0] = 1.0  # nothing near foreground: nothing to doubt
    assert score_probabilities(background) == 1.0
    # a slab at a time gives the same as the whole
    stats = ConfidenceStats()
    for part in np.split(mixed, 2, axis=1):
        stats.add(torch.from_numpy(part))
    assert stats.score() == pytest.approx(1 - 1 / 8, abs=1e-6)


def test_threshold_is_the_worst_tenth_of_validation_scores() -> None:
    scores = [0.5 + 0.01 * i for i in range(11)]
    assert choose_threshold(scores) == pytest.approx(0.51)
    assert choose_threshold([]) is None
    assert flag_text({"confidence": 0.5, "threshold": 0.51}).startswith("check this case: confidence 0.500")
    assert flag_text({"confidence": 0.6, "threshold": 0.51, "ood": []}) == ""


def test_confidence_is_lower_for_a_noise_scan_than_for_a_clean_one() -> None:
    predictor = _predictor()
    clean, noisy = ConfidenceStats(), ConfidenceStats()
    predictor.predict_labels([_sphere()], _geometry((24, 24, 24)), stats=clean)
    noise = np.random.default_rng(0).normal(100, 30, (24, 24, 24)).astype(np.float32)
    predictor.predict_labels([noise], _geometry((24, 24, 24)), stats=noisy)
    assert clean.score() > 0.95
    assert noisy.score() < 0.8
    assert noisy.score() < clean.score() - 0.2


def test_out_of_distribution_fires_for_ct_given_to_an_mr_model_and_not_for_a_normal_scan() -> None:
    rng = np.random.default_rng(1)
    # MR-like training scans: non-negative arbitrary units, 1 mm, about 24 mm wide
    train = [([rng.gamma(2.0, 60.0 + 10 * i, (24, 24, 24)).astype(np.float32)], _geometry((24, 24, 24))) for i in range(5)]
    profile = scan_profile(train)
    normal = rng.gamma(2.0, 75.0, (24, 24, 24)).astype(np.float32)
    assert ood_reasons(profile, [normal], _geometry((24, 24, 24))) == []
    # CT-like: air at -1000 HU around a body of soft tissue and bone
    ct = np.full((24, 24, 24), -1000.0, np.float32)
    ct[4:20, 4:20, 4:20] = rng.normal(40, 20, (16, 16, 16))
    ct[10:14, 10:14, 10:14] = 1200.0
    reasons = ood_reasons(profile, [ct], _geometry((24, 24, 24)))
    assert reasons and reasons[0].startswith("intensities unlike the training scans")
    # another body part / protocol: a 5 mm grid 5x wider than every training scan
    big = ood_reasons(profile, [rng.gamma(2.0, 75.0, (24, 24, 24)).astype(np.float32)], _geometry((24, 24, 24), 5.0))
    assert any(r.startswith("spacing") for r in big) and any(r.startswith("extent") for r in big)
    assert ood_reasons(None, [ct], _geometry((24, 24, 24))) == []


def test_ct_is_flagged_for_an_mr_model_whose_training_scans_have_arbitrary_scales() -> None:
    """MR intensities have no unit: with training scans whose scale differs by 5000x (as MSD hippocampus), raw
    percentiles allow almost anything, but the z-scored distribution of a CT crop of the same size is still unlike
    them, while a rescaled MR scan is not."""
    rng = np.random.default_rng(3)

    def mr(scale: float) -> np.ndarray:
        head = rng.gamma(4.0, 1.0, (24, 24, 24)).astype(np.float32)
        head[8:16, 8:16, 8:16] *= 1.8  # a brighter structure, as in the hippocampus crops
        return head * scale

    train = [([mr(scale)], _geometry((24, 24, 24))) for scale in (2.0, 50.0, 900.0, 4000.0, 10000.0)]
    profile = scan_profile(train)
    assert ood_reasons(profile, [mr(300.0)], _geometry((24, 24, 24))) == []
    ct = rng.normal(40, 30, (24, 24, 24)).astype(np.float32)
    ct[:, :5, :] = -1000.0  # air along one side of a same-sized crop
    ct[10:13, 10:13, 10:13] = 900.0
    reasons = ood_reasons(profile, [ct], _geometry((24, 24, 24)))
    assert not any(r.startswith("intensities unlike") for r in reasons)  # the raw ranges are too wide to tell
    assert any(r.startswith("intensity distribution unlike the training scans") for r in reasons)


def test_predict_writes_confidence_csv_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.inference import batch

    rng = np.random.default_rng(2)
    train = [([_sphere(value=300.0 + 20 * i)], _geometry((24, 24, 24))) for i in range(4)]
    profile = scan_profile(train)
    made = _predictor(profile=profile, threshold=0.9)
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: made))
    monkeypatch.setattr("segment.run_folder.resolve_checkpoint", lambda m, runs=None: Path("fixed.ckpt"))
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(_sphere(value=340.0), np.eye(4)), scans / "clean.nii.gz")
    nib.save(nib.Nifti1Image(rng.normal(100, 30, (24, 24, 24)).astype(np.float32), np.eye(4)), scans / "noise.nii.gz")
    ct = np.full((24, 24, 24), -1000.0, np.float32)
    ct[6:18, 6:18, 6:18] = 40.0
    nib.save(nib.Nifti1Image(ct, np.eye(4)), scans / "ct.nii.gz")
    out = tmp_path / "out"
    code = batch.run_predict([str(scans)], output=out, model=None, device="cpu", tta=False, overlap=None,
                             largest_component=None, save_probabilities=False, overwrite=False)
    assert code == 0
    rows = {r["case"]: r for r in csv.DictReader((out / "confidence.csv").open())}
    assert set(rows) == {"clean.nii.gz", "noise.nii.gz", "ct.nii.gz"}
    assert float(rows["clean.nii.gz"]["confidence"]) > 0.9 and rows["clean.nii.gz"]["flag"] == ""
    assert float(rows["noise.nii.gz"]["confidence"]) < 0.9
    assert rows["noise.nii.gz"]["flag"].startswith("check this case: confidence")
    assert "intensities unlike the training scans" in rows["ct.nii.gz"]["out_of_distribution"]
    assert rows["ct.nii.gz"]["flag"].startswith("check this case")
    assert all(math.isclose(float(r["threshold"]), 0.9) for r in rows.values())
    # a second run does not replace the first CSV without --overwrite
    batch.run_predict([str(scans)], output=tmp_path / "out", model=None, device="cpu", tta=False, overlap=None,
                      largest_component=None, save_probabilities=False, overwrite=True)
    assert sorted(p.name for p in out.glob("confidence*.csv")) == ["confidence.csv"]


def test_default_threshold_when_the_run_has_none() -> None:
    assert _predictor().threshold == DEFAULT_THRESHOLD


def test_the_fingerprint_gathers_the_same_scan_profile_as_reading_the_cases_again(tmp_path: Path) -> None:
    """Training writes scan_profile.json from the cases the fingerprint reads anyway; it must be the profile that
    reading those cases once more would give."""
    from segment.data.demo import make_demo_dataset
    from segment.data.fingerprint import fingerprint
    from segment.data.profile import dataset_profile
    from segment.io.dataset import discover

    dataset = discover(make_demo_dataset(tmp_path / "demo", n_cases=5, seed=4, progress=False))
    gathered = fingerprint(dataset, max_intensity_cases=3)["scan_profile"]
    assert gathered == dataset_profile(dataset, max_cases=3)
    assert gathered["cases"] == 3


def test_scan_statistics_of_huge_intensities_stay_finite() -> None:
    """A scan scaled to ~1e30 (a float64 export, finite in float32) gives finite z-scored percentiles and no numpy
    overflow warning: the mean and std are taken in float64."""
    import warnings

    from segment.data.profile import scan_statistics
    from segment.io.geometry import Geometry

    values = np.linspace(0, 2e30, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    geometry = Geometry(np.eye(4), (4, 5, 6), (1.0, 1.0, 1.0), ("R", "A", "S"), "float32", "scan.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = scan_statistics([values], geometry)
    assert np.all(np.isfinite(stats["shape"]))
    assert stats["shape"][0] == pytest.approx(-1.7, abs=0.05) and stats["shape"][-1] == pytest.approx(1.7, abs=0.05)
