"""The pre-training check: every file is read once before the first step, and every problem is one line naming it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from segment.config import load_config
from segment.data.check import check_dataset, usable_cpus
from segment.errors import InputError
from segment.io.dataset import discover
from segment.train.setup import load_dataset

SHAPE = (12, 12, 12)
GOOD = ["ok1", "ok2", "ok3"]
# case -> (file that must be named, words its line must hold)
BAD = {
    "truncated": ("imagesTr/truncated.nii.gz", "not a readable NIfTI"),
    "nan": ("imagesTr/nan.nii.gz", "NaN or infinite"),
    "nanaffine": ("imagesTr/nanaffine.nii.gz", "degenerate geometry: the affine holds NaN"),
    "zerocol": ("imagesTr/zerocol.nii.gz", "degenerate geometry: affine column 2 is zero"),
    "moved": ("labelsTr/moved.nii.gz", "does not share the voxel grid of image"),
    "fraction": ("labelsTr/fraction.nii.gz", "non-integer values"),
    "undeclared": ("labelsTr/undeclared.nii.gz", "label value 2 found, but only 2 classes"),
    "slice": ("imagesTr/slice.nii.gz", "image of shape (12, 12, 1) is 2D (a single slice)"),
}


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)  # incompressible: truncation hits voxels


def _label(value: float = 1) -> np.ndarray:
    out = np.zeros(SHAPE, np.float32)
    out[3:7, 3:7, 3:7] = value
    return out


def _raw_sform(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """sform rows written as given (nibabel refuses to build a degenerate affine itself)."""
    img = nib.Nifti1Image(data, None)
    img.header["srow_x"], img.header["srow_y"], img.header["srow_z"] = affine[0], affine[1], affine[2]
    img.header["sform_code"] = 1
    return img


def make_dataset(root: Path) -> Path:
    """3 good cases and one case per problem the check must find; dataset.json declares labels 0 and 1."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a"}}))
    for i, name in enumerate(GOOD + list(BAD)):
        nib.save(nib.Nifti1Image(_image(i), np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(_label().astype(np.uint8), np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
    good = gzip.compress(nib.Nifti1Image(_image(0), np.eye(4)).to_bytes())
    (root / "imagesTr" / "truncated.nii.gz").write_bytes(good[: len(good) * 6 // 10])
    nan = _image(1)
    nan[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), root / "imagesTr" / "nan.nii.gz")
    nib.save(_raw_sform(_image(2), np.diag([1.0, np.nan, 1.0, 1.0])), root / "imagesTr" / "nanaffine.nii.gz")
    nib.save(_raw_sform(_image(3), np.diag([1.0, 1.0, 0.0, 1.0])), root / "imagesTr" / "zerocol.nii.gz")
    nib.save(nib.Nifti1Image(_label().astype(np.uint8), np.diag([1.0, 1.0, 1.5, 1.0])), root / "labelsTr" / "moved.nii.gz")
    nib.save(nib.Nifti1Image(_label(0.5), np.eye(4)), root / "labelsTr" / "fraction.nii.gz")
    nib.save(nib.Nifti1Image(_label(2).astype(np.uint8), np.eye(4)), root / "labelsTr" / "undeclared.nii.gz")
    nib.save(nib.Nifti1Image(_image(4)[:, :, :1], np.eye(4)), root / "imagesTr" / "slice.nii.gz")  # predict refuses it
    nib.save(nib.Nifti1Image(_label().astype(np.uint8)[:, :, 4:5], np.eye(4)), root / "labelsTr" / "slice.nii.gz")
    return root


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("check"))


def test_every_problem_is_one_line_naming_its_file(bad_root: Path) -> None:
    dataset = discover(bad_root, check=False)  # pairing alone: headers and voxels are the check's job
    assert len(dataset.cases) == len(GOOD) + len(BAD)
    with pytest.raises(InputError) as err:
        check_dataset(dataset, workers=2, progress=False)
    head, *lines = str(err.value).splitlines()
    assert head.startswith(f"{len(BAD)} of {len(GOOD) + len(BAD)} cases have problems") and "--skip-bad" in head
    assert len(lines) == len(BAD)
    for name, (path, words) in BAD.items():
        mine = [line for line in lines if str(bad_root / path) in line]
        assert len(mine) == 1 and words in mine[0], (name, lines)
    assert not any(g in str(err.value) for g in GOOD)
    assert len(dataset.cases) == len(GOOD) + len(BAD)  # nothing is dropped without skip_bad


def test_skip_bad_keeps_the_rest_and_says_why(bad_root: Path) -> None:
    dataset = discover(bad_root, check=False)
    report = check_dataset(dataset, workers=2, skip_bad=True, progress=False)
    assert [c.name for c in dataset.cases] == GOOD
    assert sorted(dataset.skipped) == sorted(BAD)
    for name, (path, words) in BAD.items():
        assert str(bad_root / path) in dataset.skipped[name] and words in dataset.skipped[name]
        assert "\n" not in dataset.skipped[name]
    assert report.checked == len(GOOD) + len(BAD) and report.values == {0, 1}
    assert usable_cpus() >= 1


def test_structural_problems_from_discovery_are_in_the_list(tmp_path: Path) -> None:
    """A case missing a channel file is a problem like any other: listed with the rest, skipped only on request."""
    root = tmp_path / "two"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"0": "bg", "1": "a"}}))
    for name in ("a", "b", "c"):
        for channel in range(2 if name != "c" else 1):
            nib.save(nib.Nifti1Image(_image(channel), np.eye(4)), root / "imagesTr" / f"{name}_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(_label().astype(np.uint8), np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
    with pytest.warns(UserWarning, match="skipping case c"):
        dataset = discover(root, check=False)
    with pytest.raises(InputError, match=r"(?s)1 of 3 cases have problems.*case c: channels \[0\] found"):
        check_dataset(dataset, progress=False)
    check_dataset(dataset, skip_bad=True, progress=False)
    assert [c.name for c in dataset.cases] == ["a", "b"] and list(dataset.skipped) == ["c"]


def test_load_dataset_stops_by_default_and_skips_on_request(bad_root: Path) -> None:
    with pytest.raises(InputError, match=rf"^{len(BAD)} of {len(GOOD) + len(BAD)} cases have problems"):
        load_dataset(load_config(overrides=[f"data.root={bad_root}"]))
    dataset = load_dataset(load_config(overrides=[f"data.root={bad_root}", "data.skip_bad=true"]))
    assert [c.name for c in dataset.cases] == GOOD and sorted(dataset.skipped) == sorted(BAD)
    assert json.loads(json.dumps(dataset.skipped)) == dataset.skipped  # what skipped.json holds
    # max_cases takes the first N cases by name, bad ones included, and checks only those
    small = load_dataset(load_config(overrides=[f"data.root={bad_root}", "data.skip_bad=true", "data.max_cases=6"]))
    assert [c.name for c in small.cases] == ["ok1", "ok2"]
    assert sorted(small.skipped) == ["fraction", "moved", "nan", "nanaffine"]


def test_cli_prints_the_list_without_a_traceback(bad_root: Path, tmp_path: Path) -> None:
    from segment.cli import app

    result = CliRunner().invoke(app, ["train", "--data", str(bad_root), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"{len(BAD)} of {len(GOOD) + len(BAD)} cases" in result.output
    for path, words in BAD.values():
        assert any(path in line and words in line for line in result.output.splitlines()), (path, result.output)


def test_cli_names_a_broken_link_once(tmp_path: Path) -> None:
    """A broken link in labelsTr: one line naming it (discovery's own log line is not printed beside the list)."""
    from segment.cli import app

    root = _labelled(tmp_path / "data", {"0": "background", "1": "a"}, [1, 1, 1])
    (root / "labelsTr" / "c1.nii.gz").unlink()
    (root / "labelsTr" / "c1.nii.gz").symlink_to(tmp_path / "unmounted" / "c1.nii.gz")
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--output", str(tmp_path / "run"), "--max-epochs",
                                      "1", "--set", "train.steps_per_epoch=1"])  # short, should the check regress
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if "labelsTr/c1.nii.gz" in ln]
    assert len(lines) == 1 and "broken link to" in lines[0] and "unmounted/c1.nii.gz" in lines[0], result.output
    assert "1 of 3 cases have problems" in result.output and "without a partner" not in result.output


def test_cli_skip_bad_trains_on_the_rest_and_records_the_skipped(bad_root: Path, tmp_path: Path) -> None:
    import json

    from segment.cli import app
    from tests.test_train import TINY

    run = tmp_path / "run"
    sets = [a for o in TINY for a in ("--set", o)]
    result = CliRunner().invoke(app, ["train", "--data", str(bad_root), "--output", str(run), "--skip-bad", *sets,
                                      "--max-epochs", "1", "--set", "train.steps_per_epoch=1"])
    assert result.exit_code == 0, result.output
    skipped = json.loads((run / "skipped.json").read_text())
    assert sorted(skipped) == sorted(BAD)
    for name, (path, words) in BAD.items():
        assert path in skipped[name] and words in skipped[name]
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == GOOD


def _labelled(root: Path, labels: dict[str, str], values: list[int]) -> Path:
    """One case per value in `values`: a cube of that value (0 = an all-background label map)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": labels}))
    for i, value in enumerate(values):
        nib.save(nib.Nifti1Image(_image(i), np.eye(4)), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(_label(value).astype(np.uint8), np.eye(4)), root / "labelsTr" / f"c{i}.nii.gz")
    return root


def test_all_background_labels_stop_before_training(tmp_path: Path) -> None:
    """Label maps without any foreground (the wrong files, an export that lost the labels) are nothing to learn."""
    root = _labelled(tmp_path / "empty", {"0": "background", "1": "a"}, [0, 0, 0])
    with pytest.raises(InputError) as err:
        check_dataset(discover(root, check=False), progress=False)
    assert str(err.value) == (f"{root}: every label map is all background (0) in all 3 cases: nothing to learn; "
                              "are these the right label files?")
    # one case without foreground among others is normal data (a scan without a lesion)
    report = check_dataset(discover(_labelled(tmp_path / "some", {"0": "background", "1": "a"}, [0, 1, 1]), check=False),
                           progress=False)
    assert report.values == {0, 1} and report.notes == []


def test_a_blank_image_is_a_warning_naming_it(tmp_path: Path) -> None:
    """An image whose every voxel is the same (a failed export) teaches nothing: said, not fatal (a deliberately empty
    channel of a multi-modal case may be intended)."""
    root = _labelled(tmp_path / "b", {"0": "background", "1": "a"}, [1, 1, 1])
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), root / "imagesTr" / "c1.nii.gz")
    report = check_dataset(discover(root, check=False), progress=False)
    assert report.notes == [f"{root / 'imagesTr' / 'c1.nii.gz'}: every voxel is 0 (a blank export?): the network "
                            "learns nothing from it; check the file, or leave the case out"]


def test_a_declared_class_found_in_no_case_is_a_warning(tmp_path: Path) -> None:
    root = _labelled(tmp_path / "d", {"0": "background", "1": "liver", "2": "tumour", "3": "vessel"}, [1, 3, 1])
    report = check_dataset(discover(root, check=False), progress=False)
    assert report.notes == ["label 2 (tumour) is declared in dataset.json but found in no case: the model cannot "
                            "learn to predict it"]
