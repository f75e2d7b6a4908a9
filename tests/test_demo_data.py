"""The embedded demo dataset: MSD layout, varied geometry, consistent world-space anatomy, learnable and irregular."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from segment.data import demo
from segment.data.demo import ensure_demo_dataset, make_case, make_demo_dataset
from segment.errors import InputError

N = 4


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", n_cases=N, seed=0, progress=False)


def _load(root: Path, i: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    name = f"demo_{i:03d}.nii.gz"
    return nib.load(root / "imagesTr" / name), nib.load(root / "labelsTr" / name)


def _world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


def _ellipsoid_fit_iou(mask: np.ndarray, affine: np.ndarray) -> float:
    """IoU (world space) between a mask and the ellipsoid with the same centroid and second moments."""
    world = _world(mask.shape, affine).reshape(3, -1)
    pts = world[:, mask.ravel()]
    inv = np.linalg.inv(5.0 * np.cov(pts))  # a solid ellipsoid's covariance is semi_axes**2 / 5
    d = world - pts.mean(axis=1, keepdims=True)
    ell = (np.einsum("in,ij,jn->n", d, inv, d) <= 1.0).reshape(mask.shape)
    return float((mask & ell).sum() / (mask | ell).sum())


def test_layout_and_manifest(demo_dir: Path) -> None:
    meta = json.loads((demo_dir / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert meta["modality"] == {"0": "MRI"}
    assert "CC0" in meta["licence"]
    assert meta["numTraining"] == N and len(meta["training"]) == N
    assert meta["generator"]["n_cases"] == N and meta["generator"]["seed"] == 0
    for entry in meta["training"]:
        assert (demo_dir / entry["image"]).is_file() and (demo_dir / entry["label"]).is_file()
    assert sorted(p.name for p in (demo_dir / "imagesTr").iterdir()) == [f"demo_{i:03d}.nii.gz" for i in range(N)]


def test_cases_have_valid_labels_and_varied_geometry(demo_dir: Path) -> None:
    codes, origins, dtypes = set(), [], set()
    for i in range(N):
        img, lab = _load(demo_dir, i)
        labels = np.asarray(lab.dataobj)
        assert labels.dtype == np.uint8
        assert set(np.unique(labels).tolist()) == {0, 1, 2}, f"case {i} lacks a class"
        assert img.shape == lab.shape and all(40 <= s <= 64 for s in img.shape[:2]) and 32 <= img.shape[2] <= 64
        np.testing.assert_allclose(img.affine, lab.affine)
        zooms = np.array(img.header.get_zooms())
        assert zooms.max() / zooms.min() > 1.25, f"case {i} spacing {zooms} is not anisotropic"
        assert 0.8 <= zooms.min() and zooms.max() <= 2.5
        codes.add(nib.aff2axcodes(img.affine))
        origins.append(img.affine[:3, 3])
        dtypes.add(img.get_data_dtype().name)
    assert len(codes) >= 2, f"all cases share orientation {codes}"
    assert np.ptp(np.array(origins), axis=0).min() > 5.0  # origins differ in every direction
    assert dtypes == {"float32", "int16"}


def test_anatomy_is_consistent_in_world_space(demo_dir: Path) -> None:
    """The organ is elongated head-feet in world space, whatever the voxel axes: |S component| of its long axis."""
    along_s = []
    for i in range(N):
        img, lab = _load(demo_dir, i)
        mask = np.asarray(lab.dataobj) > 0
        pts = _world(mask.shape, img.affine)[:, mask]
        _, vecs = np.linalg.eigh(np.cov(pts))
        along_s.append(abs(vecs[2, -1]))
    assert np.mean(along_s) > 0.8, along_s


def test_same_seed_same_arrays_other_seed_differs(demo_dir: Path, tmp_path: Path) -> None:
    again = make_demo_dataset(tmp_path / "again", n_cases=2, seed=0, progress=False)
    other = make_demo_dataset(tmp_path / "other", n_cases=2, seed=1, progress=False)
    for i in range(2):
        (img_a, lab_a), (img_b, lab_b), (img_c, lab_c) = _load(demo_dir, i), _load(again, i), _load(other, i)
        np.testing.assert_array_equal(np.asarray(img_a.dataobj), np.asarray(img_b.dataobj))
        np.testing.assert_array_equal(np.asarray(lab_a.dataobj), np.asarray(lab_b.dataobj))
        np.testing.assert_array_equal(img_a.affine, img_b.affine)
        assert img_a.shape != img_c.shape or not np.array_equal(np.asarray(lab_a.dataobj), np.asarray(lab_c.dataobj))


def test_fast_path_does_not_rewrite(demo_dir: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()}
    assert make_demo_dataset(demo_dir, n_cases=N, seed=0, progress=False) == demo_dir
    after = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()}
    assert after == before and len(before) == 2 * N + 1


def test_changed_request_or_missing_file_regenerates(demo_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(demo_dir, tmp_path / "copy"))
    (copy / "labelsTr" / "demo_001.nii.gz").unlink()
    make_demo_dataset(copy, n_cases=N, seed=0, progress=False)
    assert (copy / "labelsTr" / "demo_001.nii.gz").is_file()
    make_demo_dataset(copy, n_cases=1, seed=3, progress=False)  # a previous demo is ours to replace
    assert json.loads((copy / "dataset.json").read_text())["generator"]["seed"] == 3
    assert [p.name for p in (copy / "imagesTr").iterdir()] == ["demo_000.nii.gz"]


def test_foreign_folder_is_refused_unless_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match=str(folder)):
        make_demo_dataset(folder, n_cases=1, progress=False)
    assert not (folder / "imagesTr").exists()
    make_demo_dataset(folder, n_cases=1, overwrite=True, progress=False)
    assert (folder / "dataset.json").is_file() and (folder / "notes.txt").read_text() == "precious"
    with pytest.raises(InputError, match="n_cases"):
        make_demo_dataset(tmp_path / "none", n_cases=0, progress=False)


def test_foreground_is_learnable(demo_dir: Path) -> None:
    for i in range(N):
        img, lab = _load(demo_dir, i)
        image, labels = img.get_fdata(), np.asarray(lab.dataobj)
        bg, organ, lesion = image[labels == 0], image[labels == 1], image[labels == 2]
        assert abs(organ.mean() - bg.mean()) > bg.std(), f"case {i}: organ not separable from background"
        assert abs(lesion.mean() - organ.mean()) > 0.5 * organ.std(), f"case {i}: lesion not separable from organ"


def test_organ_surface_is_irregular(demo_dir: Path) -> None:
    """A voxelised true ellipsoid matches its moment fit almost exactly; the demo organ does not."""
    img, _ = _load(demo_dir, 0)
    world = _world(img.shape, img.affine).reshape(3, -1)
    centre = world.mean(axis=1, keepdims=True)
    local = Rotation.from_euler("xyz", [20, 10, 30], degrees=True).apply((world - centre).T).T
    smooth = (((local / np.array([[13.0], [10.0], [18.0]])) ** 2).sum(axis=0) <= 1).reshape(img.shape)
    assert _ellipsoid_fit_iou(smooth, img.affine) > 0.97
    for i in range(N):
        img, lab = _load(demo_dir, i)
        assert _ellipsoid_fit_iou(np.asarray(lab.dataobj) > 0, img.affine) < 0.93, f"case {i} is a plain ellipsoid"


def test_make_case_is_independent_of_n_cases() -> None:
    a, b = make_case(0, 2), make_case(0, 2)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(make_case(0, 1).affine, a.affine)


def test_ensure_uses_segment_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$SEGMENT_HOME/demo, read when used (not at import), so the CLI, the runner and `demo-data` agree."""
    monkeypatch.setenv("SEGMENT_HOME", str(tmp_path / "home"))
    assert demo.DEFAULT_DEMO_DIR == tmp_path / "home" / "demo"
    calls: list[tuple[Path, bool]] = []
    monkeypatch.setattr(demo, "make_demo_dataset", lambda out, progress=True: calls.append((out, progress)) or out)
    assert ensure_demo_dataset(progress=False) == tmp_path / "home" / "demo"
    assert calls == [(tmp_path / "home" / "demo", False)]


def test_default_demo_dir_is_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without $SEGMENT_HOME: platformdirs' user cache if installed, else $XDG_CACHE_HOME, else ~/.cache."""
    import sys
    import types

    monkeypatch.delenv("SEGMENT_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # not installed: the import fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_demo_dir() == tmp_path / "xdg" / "segment" / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says: ignore a relative path
    assert demo.default_demo_dir() == tmp_path / "user" / ".cache" / "segment" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_demo_dir() == tmp_path / "user" / ".cache" / "segment" / "demo"
    fake = types.ModuleType("platformdirs")
    fake.user_cache_dir = lambda name, appauthor=None: str(tmp_path / "platform" / name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "platformdirs", fake)
    assert demo.default_demo_dir() == tmp_path / "platform" / "segment" / "demo"
    monkeypatch.setenv("SEGMENT_HOME", "~/seg")
    assert demo.default_demo_dir() == tmp_path / "user" / "seg" / "demo"


def test_demo_dir_does_not_follow_the_code_or_the_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not beside the code (site-packages may be read-only) and not relative to the current folder."""
    for name in ("SEGMENT_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    first = demo.default_demo_dir()
    monkeypatch.chdir(tmp_path)
    assert demo.default_demo_dir() == first and first.is_absolute()
    assert not first.is_relative_to(Path(demo.__file__).resolve().parents[2])
