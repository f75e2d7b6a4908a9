"""`segment predict` end to end: checkpoints, real headers, batches with a broken file, refusing to overwrite."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segment.cli import app
from segment.config import Config, ModelConfig
from segment.data.plan import Plan
from segment.errors import InputError
from segment.inference.inputs import expand_inputs, group_numbered
from segment.inference.predictor import Predictor
from segment.nets import build_model
from segment.run_folder import resolve_checkpoint

runner = CliRunner()


def make_checkpoint(path: Path, *, modality: str = "mri", spacing: list[float] | None = None, classes: int = 3,
                    mirror_axes: list[int] | None = None) -> Path:
    """A Lightning-format checkpoint of a tiny random-weight U-Net; no training needed."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(features=[4, 8], out_channels=classes))
    labels = {i: f"organ{i}" if i else "background" for i in range(classes)}
    plan = Plan(spacing=spacing or [1.0, 1.0, 1.0], patch_size=[32, 32, 16], batch_size=2, features=[4, 8],
                modality=modality, channels=1, labels=labels, ct_clip=[-200.0, 300.0], ct_mean=40.0, ct_std=80.0,
                mirror_axes=mirror_axes)
    state = {f"model.{k}": v for k, v in build_model(cfg.model).state_dict().items()}
    state["loss_fn.dummy"] = torch.zeros(1)  # extra module keys must be ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"config": cfg.model_dump(mode="json"), "plan": plan.to_dict(), "max_time_s": None},
                "state_dict": state}, path)
    return path


def _scan(path: Path, shape: tuple[int, int, int] = (20, 18, 12), seed: int = 0) -> Path:
    affine = np.array([[-0.9, 0, 0, 10], [0, 0, 1.2, -5], [0, -1.1, 0, 3], [0, 0, 0, 1]])
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.mark.parametrize("name, modality", [("ct_example", "ct"), ("mr_example", "mri")])
def test_real_scans_keep_their_header(real_ct_mr: Path, tmp_path: Path, name: str, modality: str) -> None:
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", modality=modality, spacing=[6.0, 6.0, 6.0])
    predictor = Predictor.from_checkpoint(tmp_path / "run", "cpu", precision="32")
    assert resolve_checkpoint(tmp_path / "run") == ckpt
    source = real_ct_mr / "images" / f"{name}.nii.gz"
    result = predictor.predict_file(source, tmp_path / f"{name}_seg.nii.gz")
    src, out = nib.load(source), nib.load(result["output"])
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    np.testing.assert_allclose(out.get_sform(), src.get_sform(), atol=1e-4)
    np.testing.assert_allclose(out.get_qform(), src.get_qform(), atol=1e-4)
    # the scan's own codes (this CT: sform 2, qform 0), never invented ones
    assert out.header["sform_code"] == src.header["sform_code"] and out.header["qform_code"] == src.header["qform_code"]
    assert set(result["volumes_ml"]) == {"organ1", "organ2"} and result["voxels_per_s"] > 0


def test_batch_with_a_broken_file(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    scans = tmp_path / "scans"
    scans.mkdir()
    _scan(scans / "a.nii.gz", seed=1)
    _scan(scans / "b.nii.gz", (17, 21, 10), seed=2)
    (scans / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    result = runner.invoke(app, ["predict", str(scans), "--model", str(ckpt), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    for name in ("a", "b"):
        src, out = nib.load(scans / f"{name}.nii.gz"), nib.load(scans / f"{name}_seg.nii.gz")
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert not (scans / "broken_seg.nii.gz").exists()
    assert "broken.nii.gz" in result.output and "2 of 3 case(s) segmented" in result.output

    again = runner.invoke(app, ["predict", str(scans / "a.nii.gz"), "--model", str(ckpt), "--device", "cpu"])
    assert again.exit_code == 1 and "exists" in again.output and "--overwrite" in again.output
    forced = runner.invoke(app, ["predict", str(scans / "a.nii.gz"), str(scans / "b.nii.gz"), "-m", str(ckpt),
                                 "--device", "cpu", "--overwrite", "-o", str(tmp_path / "out"), "--save-probabilities"])
    assert forced.exit_code == 0, forced.output
    assert nib.load(tmp_path / "out" / "b_probabilities.nii.gz").shape == (17, 21, 10, 3)


def test_single_output_file_and_bad_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    scan = _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "labels.nii.gz"
    ok = runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "--device", "cpu", "-o", str(out), "--tta"])
    assert ok.exit_code == 0, ok.output
    assert nib.load(out).shape == (20, 18, 12)
    two = runner.invoke(app, ["predict", str(scan), str(scan.with_name("x.nii.gz")), "-m", str(ckpt), "-o", str(out)])
    assert two.exit_code == 1 and "x.nii.gz" in two.output
    monkeypatch.chdir(tmp_path)  # no runs/ folder here
    none = runner.invoke(app, ["predict", str(scan)])
    assert none.exit_code == 2 and "no trained model found" in none.output
    if not torch.cuda.is_available():
        cuda = runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "--device", "cuda"])
        assert cuda.exit_code == 2 and "CUDA is not available" in cuda.output


def test_newest_run_is_the_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    old = make_checkpoint(tmp_path / "runs" / "old" / "checkpoints" / "best.ckpt")
    new = make_checkpoint(tmp_path / "runs" / "new" / "checkpoints" / "last.ckpt")
    os.utime(old, (1e9, 1e9))
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(None).resolve() == new.resolve()
    with pytest.raises(InputError, match="model not found"):
        resolve_checkpoint(tmp_path / "missing")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a segment checkpoint"):
        Predictor.from_checkpoint(bad, "cpu")


def test_broken_links_are_named_not_dropped(tmp_path: Path) -> None:
    """A link to a moved or unmounted scan is a failed case with its reason, in a folder or given by name."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.nii.gz").touch()
    (folder / "gone.nii.gz").symlink_to(tmp_path / "unmounted" / "gone.nii.gz")
    (tmp_path / "direct.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    files, dicom, problems = expand_inputs([str(folder), str(tmp_path / "direct.nii.gz")])
    assert [f.name for f in files] == ["a.nii.gz"] and not dicom
    assert problems == {
        str(folder / "gone.nii.gz"):
            f"{folder / 'gone.nii.gz'}: broken link to {tmp_path / 'unmounted' / 'gone.nii.gz'} (no such file)",
        str(tmp_path / "direct.nii.gz"):
            f"{tmp_path / 'direct.nii.gz'}: broken link to {tmp_path / 'nowhere.nii.gz'} (no such file)"}
    # a folder holding only a broken link is not mistaken for a DICOM series
    only = tmp_path / "only"
    only.mkdir()
    (only / "x.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    files, dicom, problems = expand_inputs([str(only)])
    assert not files and not dicom and list(problems) == [str(only / "x.nii.gz")]


def test_subfolders_beside_scans_are_named_not_silently_skipped(tmp_path: Path) -> None:
    """A folder of scans is read one level deep; its subfolders (a DICOM series, more scans) are said, not dropped."""
    folder = tmp_path / "scans"
    for sub in ("series_b", "more", "series_a"):
        (folder / sub).mkdir(parents=True)
    (folder / "a.nii.gz").touch()
    (folder / "more" / "b.nii.gz").touch()
    notes: list[str] = []
    files, dicom, problems = expand_inputs([str(folder)], notes)
    assert [f.name for f in files] == ["a.nii.gz"] and not dicom and not problems
    assert notes == [f"{folder}: 3 subfolder(s) not searched (more, series_a, series_b); give a subfolder as an input "
                     "of its own to segment what is in it (a DICOM series, more scans)"]
    notes.clear()  # a folder without scans is a DICOM series, as before: nothing to say
    files, dicom, problems = expand_inputs([str(folder / "series_a")], notes)
    assert [c.name for c in dicom] == ["series_a"] and not notes


def test_a_folder_we_may_not_list_is_a_failed_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 on one input folder: that input fails with the reason, the others are still found."""
    good, locked = tmp_path / "good", tmp_path / "locked"
    for folder in (good, locked):
        folder.mkdir()
        (folder / "a.nii.gz").touch()
    real = Path.iterdir

    def iterdir(self: Path):
        if self == locked:  # tests run as root, where chmod 000 does not stop a listing
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    files, dicom, problems = expand_inputs([str(locked), str(good)])
    assert files == [(good / "a.nii.gz").resolve()] and not dicom
    assert problems == {str(locked): f"{locked}: cannot read this folder (Permission denied)"}


def test_expand_groups_channels_and_skips_outputs(tmp_path: Path) -> None:
    for name in ("p1_0000", "p1_0001", "p2_0000", "p2_0001", "s_0001", "s_0002"):
        (tmp_path / f"{name}.nii.gz").touch()
    (tmp_path / "p1_seg.nii.gz").touch()
    (tmp_path / "notes.txt").touch()
    files, dicom, problems = expand_inputs([str(tmp_path), str(tmp_path / "nothing*.nii.gz")])
    assert not dicom and list(problems) == [str(tmp_path / "nothing*.nii.gz")]
    # a two-channel model: numbers running _0000.._0001 are channels; s_0001/s_0002 do not start at 0000
    cases, note = group_numbered(files, channels=2)
    assert {c.name: [p.name for p in c.images] for c in cases} == {
        "p1": ["p1_0000.nii.gz", "p1_0001.nii.gz"], "p2": ["p2_0000.nii.gz", "p2_0001.nii.gz"],
        "s_0001": ["s_0001.nii.gz"], "s_0002": ["s_0002.nii.gz"]}
    assert "grouped as the 2 channels" in note
    # a one-channel model: every numbered file is a scan of its own (a series export, not channels)
    cases, note = group_numbered(files, channels=1)
    assert sorted(c.name for c in cases) == ["p1_0000", "p1_0001", "p2_0000", "p2_0001", "s_0001", "s_0002"]
    assert all(len(c.images) == 1 for c in cases) and "separate scans" in note


def test_python_api_and_unwritable_output(tmp_path: Path) -> None:
    import segment

    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    scan = _scan(tmp_path / "scan.nii.gz")
    out = segment.predict(nib.load(scan), model=ckpt, device="cpu")
    assert out.shape == (20, 18, 12) and np.allclose(out.affine, nib.load(scan).affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    same = segment.predict(scan, model=ckpt, device="cpu")  # a path works too, with the cached model
    np.testing.assert_array_equal(np.asarray(same.dataobj), np.asarray(out.dataobj))
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "-o", str(tmp_path / "file" / "x.nii.gz")])
    assert result.exit_code == 1 and "not a writable folder" in result.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "nope.nii.gz"), "-m", str(ckpt), "-o", str(tmp_path / "o.nii.gz")])
    assert missing.exit_code == 1 and "nope.nii.gz: no such file" in missing.output


def test_tta_on_a_model_trained_without_mirroring_says_so_and_predicts_plainly(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "scan.nii.gz")
    ckpt = make_checkpoint(tmp_path / "fixed.ckpt", mirror_axes=[])
    plain, tta = tmp_path / "plain.nii.gz", tmp_path / "tta.nii.gz"
    assert runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "--device", "cpu", "-o", str(plain)]).exit_code == 0
    res = runner.invoke(app, ["predict", str(scan), "-m", str(ckpt), "--device", "cpu", "-o", str(tta), "--tta"])
    assert res.exit_code == 0, res.output
    assert "trained without mirroring" in res.output
    np.testing.assert_array_equal(np.asarray(nib.load(tta).dataobj), np.asarray(nib.load(plain).dataobj))
    some = runner.invoke(app, ["predict", str(scan), "-m", str(make_checkpoint(tmp_path / "lr.ckpt", mirror_axes=[0])),
                               "--device", "cpu", "-o", str(tmp_path / "lr.nii.gz"), "--tta"])
    assert some.exit_code == 0 and "mirroring axes [0]" in some.output
