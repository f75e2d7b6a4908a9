"""Valid padding (the original U-Net) as a planned, trained and predicted mode: planner, label crops, foreground
sampling into the output region, overlap-tile = one forward pass, and a short training run whose loss falls."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segment.config import Config, load_config
from segment.data.plan import Plan, make_plan
from segment.engine.sliding import sliding_logits
from segment.engine.tiler import grown_window, reflect_pad, tiled_logits, window_geometry
from segment.errors import ConfigError
from segment.io.dataset import discover
from segment.nets import build_model
from segment.train.plan_valid import plan_run, planned_model


def _write_dataset(root: Path, n: int, shape: tuple[int, ...], spacing: tuple[float, ...], seed: int = 0,
                   corner_case: bool = False) -> Path:
    """MSD-layout cases: noise plus a bright ellipsoid (label 1); with `corner_case`, case 0's object is one voxel
    in the corner."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * np.array(spacing)
    names = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        if corner_case and i == 0:
            label[0, 0, 0] = 1
        else:
            centre = np.array([rng.uniform(0.35, 0.65) * s * sp for s, sp in zip(shape, spacing)])
            radius = 0.22 * min(s * sp for s, sp in zip(shape, spacing))
            label[np.linalg.norm(grid - centre, axis=-1) < radius] = 1
        image = rng.normal(0, 0.5, shape).astype(np.float32) + 2.0 * label
        affine = np.diag([*spacing, 1.0])
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        names.append(name)
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "ball"},
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
    }))
    return root


def _cfg(root: Path, *extra: str) -> Config:
    return load_config(overrides=[f"data.root={root}", "model.padding=valid", *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("tiny"), 6, (24, 24, 24), (1.0, 1.0, 1.0), corner_case=True)


# ---- (c) planner ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("shape, spacing", [((40, 48, 36), (1.0, 1.0, 1.0)), ((56, 56, 14), (1.0, 1.0, 4.0)),
                                            ((96, 96, 80), (0.8, 0.8, 1.0))])
def test_planned_valid_patch_is_accepted_and_fits_the_same_budget(tmp_path: Path, device: str, shape, spacing) -> None:
    ds = discover(_write_dataset(tmp_path / "d", 2, shape, spacing))
    cfg = _cfg(tmp_path / "d")
    same, _ = make_plan(ds, cfg, device=device)
    plan, _ = plan_run(ds, cfg, device=device)
    model = planned_model(plan, cfg)
    out = model.output_size(plan.patch_size)  # raises if the network does not accept the patch
    assert list(out) == plan.output_size
    assert plan.output_margins() == [i - o for i, o in zip(plan.patch_size, out)] == list(model.output_margins())
    assert all(m > 0 for m in plan.output_margins())
    # the same network shape (widths, per-axis strides and kernels) as the same-padding plan, or a shallower cut of it
    d = len(plan.features)
    assert plan.features == same.features[:d]
    assert plan.strides == (same.strides[:d - 1] if same.strides else None)
    if spacing[2] == 4.0:
        assert plan.strides is not None and any(r[2] == 1 for r in plan.strides)  # the coarse axis is pooled later
    # memory: no more input voxels per step than the same-padding step (unless one smallest input alone is more)
    budget = same.batch_size * math.prod(same.patch_size)
    assert plan.batch_size * math.prod(plan.patch_size) <= budget or plan.batch_size == 1
    assert 1 <= plan.batch_size <= 16
    # the output aims at the same-mode patch: never more than one size step beyond it
    assert all(o < p + s for o, p, s in zip(out, same.patch_size, model.size_multiples()))


def test_isotropic_cpu_plan_values(tmp_path: Path) -> None:
    ds = discover(_write_dataset(tmp_path / "d", 2, (40, 48, 36), (1.0, 1.0, 1.0)))
    plan, _ = plan_run(ds, _cfg(tmp_path / "d"), device="cpu")
    # 4 levels, 3x3x3: allowed inputs 55 + 8k, margin 53; the same-mode patch [40, 48, 40] (batch 5, 384,000 voxels)
    # would need [95, 103, 95]; the output shrinks along its longest axis until one input fits
    assert plan.features == [32, 64, 128, 256][:len(plan.features)] or len(plan.features) == 4
    assert plan.output_margins() == [53, 53, 53]
    assert all((p - 55) % 8 == 0 for p in plan.patch_size)
    assert math.prod(plan.patch_size) <= 384_000 and plan.batch_size == 1


def test_a_given_patch_is_the_input_and_must_be_allowed(tiny: Path) -> None:
    ds = discover(tiny)
    plan, _ = plan_run(ds, _cfg(tiny, "model.features=[4,8,16]", "data.patch_size=[35,35,31]"))
    assert plan.patch_size == [35, 35, 31] and plan.output_size == [10, 10, 6]
    with pytest.raises(ConfigError, match=r"data.patch_size=\[36, 35, 35\].*27 \+ k\*4"):
        plan_run(ds, _cfg(tiny, "model.features=[4,8,16]", "data.patch_size=[36,35,35]"))


def test_same_padding_plans_have_no_output_size(tiny: Path) -> None:
    plan, _ = plan_run(discover(tiny), load_config(overrides=[f"data.root={tiny}"]))
    assert plan.output_size is None and plan.output_margins() is None


# ---- (d) the loss sees only the region the network predicts -------------------------------------------------------
def _module(plan: Plan, **model: object):
    from segment.train.module import SegmentationModule

    cfg = load_config(values={"model": {"out_channels": 2, "padding": "valid", **model}})
    return SegmentationModule(cfg.model_dump(mode="json"), plan.to_dict())


@pytest.mark.parametrize("deep, strides, kernels", [
    (False, None, None), (True, None, None), (True, [[2, 2, 1], [2, 2, 2]], [[3, 3, 1], [3, 3, 3], [3, 3, 3]])])
def test_label_outside_the_output_region_never_changes_the_loss(deep: bool, strides, kernels) -> None:
    torch.manual_seed(0)
    features = [4, 8, 16]
    plan = Plan(spacing=[1.0] * 3, patch_size=[1, 1, 1], batch_size=1, features=features, modality="mri", channels=1,
                labels={0: "background", 1: "ball"})
    module = _module(plan, features=features, deep_supervision=deep, strides=strides, kernels=kernels)
    net = module.model
    size = net.input_size_for((8, 8, 8))
    x = torch.randn(2, 1, *size)
    outputs = net.forward_all(x) if deep else [net(x)]
    label = torch.randint(0, 2, (2, 1, *size))
    # the union of the regions the heads predict: the largest, centred (the deepest head's covers the most)
    scale, region = [1, 1, 1], list(outputs[0].shape[2:])
    for level, out in enumerate(outputs):
        if level:
            scale = [f * s for f, s in zip(scale, net.cfg.stride_list()[level - 1])]
        region = [max(r, n * f) for r, n, f in zip(region, out.shape[2:], scale)]
    inside = torch.zeros(size, dtype=torch.bool)
    inside[tuple(slice((n - r) // 2, (n - r) // 2 + r) for n, r in zip(size, region))] = True
    assert (~inside).any()  # there is a margin to change
    outside_changed = torch.where(inside, label, 1 - label)
    inside_changed = torch.where(inside, 1 - label, label)
    loss = module._supervised_loss(outputs, label)
    assert torch.equal(module._supervised_loss(outputs, outside_changed), loss)
    assert not torch.isclose(module._supervised_loss(outputs, inside_changed), loss)


def test_main_head_target_is_the_centre_crop_not_a_resize() -> None:
    plan = Plan(spacing=[1.0] * 3, patch_size=[1, 1, 1], batch_size=1, features=[4, 8], modality="mri", channels=1,
                labels={0: "background", 1: "ball"})
    module = _module(plan, features=[4, 8])
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[:, 1, 2:] = 20.0  # class 1 in the second half of axis 0
    logits[:, 0, :2] = 20.0
    label = torch.ones(1, 1, 10, 10, 10, dtype=torch.long)  # outside the centre: class 1 (a resize would see it)
    label[..., 3:5, 3:7, 3:7] = 0  # the centre 4^3 (starting at (10 - 4) // 2 = 3) is exactly the prediction
    assert module._supervised_loss([logits], label) < 1e-3
    shifted = torch.roll(label, 1, dims=2)  # one voxel off: no longer perfect
    assert module._supervised_loss([logits], shifted) > 0.1


# ---- (2) foreground sampling lands in the output region -----------------------------------------------------------
@pytest.mark.parametrize("disk", [False, True])
def test_foreground_patches_put_the_foreground_in_the_output_region(tmp_path: Path, disk: bool) -> None:
    from monai.data import set_track_meta

    from segment.data.cache import DiskCache
    from segment.data.pipeline import train_transforms

    set_track_meta(False)
    root = _write_dataset(tmp_path / "big", 2, (40, 40, 40), (1.0, 1.0, 1.0), corner_case=True)
    ds = discover(root)
    # a patch smaller than the scan, so the crop is shifted inwards at the corner
    cfg = _cfg(root, "model.features=[4,8,16]", "data.patch_size=[31,35,31]", "data.foreground_fraction=1.0",
               "data.augment.flip_prob=0", "data.augment.rotate_prob=0", "data.augment.intensity_prob=0",
               "data.augment.noise_prob=0")
    plan, _ = plan_run(ds, cfg)
    corner = ds.cases[0]  # a single foreground voxel at the scan's corner
    cache = None
    if disk:
        cache = DiskCache(tmp_path / "cache", plan)
        cache.prepare([corner])
    transform = train_transforms(plan, cfg, cache)
    out = plan.output_size
    m0 = [m // 2 for m in plan.output_margins()]
    hits = []
    for seed in range(6):
        transform.set_random_state(seed=seed)
        sample = transform(corner)
        sample = sample[0] if isinstance(sample, list) else sample
        label = sample["label"][0]
        assert tuple(label.shape) == tuple(plan.patch_size)
        region = label[tuple(slice(b, b + o) for b, o in zip(m0, out))]
        hits.append(int(region.sum()))
    assert hits == [1] * 6  # every patch has the corner voxel in its output region


def test_ram_and_disk_pipelines_cut_the_same_valid_patch(tiny: Path, tmp_path: Path) -> None:
    from monai.data import set_track_meta

    from segment.data.cache import DiskCache
    from segment.data.pipeline import train_transforms

    set_track_meta(False)
    ds = discover(tiny)
    cfg = _cfg(tiny, "model.features=[4,8,16]", "data.augment.rotate_prob=0")
    plan, _ = plan_run(ds, cfg)
    cache = DiskCache(tmp_path / "cache", plan)
    cache.prepare(ds.cases[:3])
    ram, disk = train_transforms(plan, cfg), train_transforms(plan, cfg, cache)
    for case in ds.cases[:3]:
        for seed in (1, 2):
            ram.set_random_state(seed=seed)
            disk.set_random_state(seed=seed)
            a, b = ram(case), disk(case)
            a, b = (a[0] if isinstance(a, list) else a), (b[0] if isinstance(b, list) else b)
            torch.testing.assert_close(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
            assert torch.equal(torch.as_tensor(a["label"]).long(), torch.as_tensor(b["label"]).long())


# ---- training pads like prediction: the image mirrored by the one rule of segment.data.mirror ----------------------
@pytest.mark.parametrize("n, before, after", [(5, 2, 3), (5, 4, 4), (3, 7, 11), (2, 5, 0), (1, 3, 2), (6, 0, 0)])
def test_the_mirror_rule_is_numpys_reflect_and_the_tilers(n: int, before: int, after: int) -> None:
    from segment.data.mirror import mirror_indices, mirror_pad

    x = np.arange(2 * n * 4, dtype=np.float32).reshape(2, n, 4)
    mode = "edge" if n == 1 else "reflect"  # one voxel cannot be mirrored: it is repeated
    expected = np.pad(np.pad(x, [(0, 0), (before, after), (0, 0)], mode=mode), [(0, 0), (0, 0), (1, 2)], mode="reflect")
    np.testing.assert_array_equal(mirror_pad(x, [before, 1], [after, 2]), expected)
    np.testing.assert_array_equal(reflect_pad(torch.from_numpy(x)[None], [before, 1], [after, 2])[0].numpy(), expected)
    if n == 5 and before == 2:  # written out: reflect without repeating the edge voxel
        assert mirror_indices(5, 2, 3).tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2, 1]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cases thinner than the patch along two axes: the padding there is wider than the scan."""
    return _write_dataset(tmp_path_factory.mktemp("small"), 2, (5, 24, 9), (1.0, 1.0, 1.0), corner_case=True)


@pytest.mark.parametrize("which", ["tiny", "small"])
@pytest.mark.parametrize("disk", [False, True])
def test_a_training_patch_at_the_corner_is_the_mirror_padded_scan(which: str, disk: bool, tiny: Path, small: Path,
                                                                  tmp_path: Path) -> None:
    """The corner patch (foreground voxel at [0, 0, 0]) equals, voxel by voxel, the crop of `reflect_pad` (what
    overlap-tile prediction feeds the network) at the same place; the label there is the scan's, background outside."""
    from monai.data import set_track_meta

    from segment.data.cache import DiskCache
    from segment.data.mirror import padded_geometry
    from segment.data.pipeline import train_transforms, valid_border
    from segment.data.preprocess import load_case

    set_track_meta(False)
    root = tiny if which == "tiny" else small
    ds = discover(root)
    cfg = _cfg(root, "model.features=[4,8,16]", "data.patch_size=[35,35,31]", "data.foreground_fraction=1.0",
               "data.augment.flip_prob=0", "data.augment.rotate_prob=0", "data.augment.intensity_prob=0",
               "data.augment.noise_prob=0")
    plan, _ = plan_run(ds, cfg)
    corner = ds.cases[0]
    cache = None
    if disk:
        cache = DiskCache(tmp_path / "cache", plan)
        cache.prepare([corner])
    transform = train_transforms(plan, cfg, cache)
    transform.set_random_state(seed=0)
    sample = transform(corner)
    sample = sample[0] if isinstance(sample, list) else sample
    item = load_case(corner.images, corner.label, plan)
    image, label = torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
    shape = tuple(image.shape[1:])
    padded, offset = padded_geometry(shape, valid_border(plan), plan.patch_size)
    after = [q - o - n for q, o, n in zip(padded, offset, shape)]
    if which == "small":
        assert offset[0] > shape[0] and after[2] > shape[2]  # mirrored more than once
    # the single foreground voxel sits at padded (offset); the crop is pushed inwards to start at 0 on every axis
    box = (slice(None), *(slice(0, p) for p in plan.patch_size))
    expected = reflect_pad(image[None].float(), offset, after)[0][box]
    got = torch.as_tensor(sample["image"]).float()
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert got[0, offset[0] - 1, offset[1], offset[2]] == image[0, 1, 0, 0]  # mirrored, not zero
    assert float(got[(0, *(slice(0, o) for o in offset))].abs().sum()) > 0
    want = torch.zeros((1, *padded), dtype=torch.long)
    want[(slice(None), *(slice(o, o + n) for o, n in zip(offset, shape)))] = label.long()
    assert torch.equal(torch.as_tensor(sample["label"]).long(), want[box])
    assert int(want[box].sum()) == 1


def test_same_padding_still_pads_with_zeros(tiny: Path) -> None:
    from monai.data import set_track_meta

    from segment.data.pipeline import train_transforms

    set_track_meta(False)
    ds = discover(tiny)
    cfg = load_config(overrides=[f"data.root={tiny}", "model.features=[4,8,16]", "data.patch_size=[32,32,32]",
                                 "data.augment.flip_prob=0", "data.augment.rotate_prob=0",
                                 "data.augment.intensity_prob=0", "data.augment.noise_prob=0"])
    plan, _ = plan_run(ds, cfg)
    transform = train_transforms(plan, cfg)
    transform.set_random_state(seed=0)
    sample = transform(ds.cases[1])
    image = torch.as_tensor((sample[0] if isinstance(sample, list) else sample)["image"])
    assert tuple(image.shape[1:]) == (32, 32, 32)
    assert float(image[:, :4].abs().sum()) == 0 and float(image[:, 4:28, 4:28, 4:28].abs().sum()) > 0  # 24 -> 32


# ---- (b) prediction = one forward pass over the mirror-padded volume ----------------------------------------------
def test_one_tile_prediction_equals_a_direct_forward_pass() -> None:
    torch.manual_seed(0)
    model = build_model(load_config(overrides=["model.padding=valid", "model.features=[3,6,12]"]).model).eval()
    patch = [35, 35, 35]  # output windows of 10
    x = torch.randn(1, 1, 9, 10, 7)  # fits in one output window
    win_in, win_out, _ = window_geometry(model, patch)
    margin = model.output_margin()
    before = margin // 2
    with torch.inference_mode():
        tiled = sliding_logits(model, x, patch, overlap=0.5)
        padded = reflect_pad(x, [before] * 3, [margin - before + w - n for w, n in zip(win_out, x.shape[2:])])
        assert tuple(padded.shape[2:]) == win_in
        direct = model(padded)[(slice(None), slice(None)) + tuple(slice(0, n) for n in x.shape[2:])]
    assert tiled.shape == (1, 2, 9, 10, 7)
    torch.testing.assert_close(tiled, direct, atol=1e-5, rtol=1e-5)
    assert direct.std() > 1e-3


def test_validation_windows_are_larger_and_give_the_same_logits() -> None:
    torch.manual_seed(0)
    model = build_model(load_config(overrides=["model.padding=valid", "model.features=[3,6,12]", "model.norm=batch"]).model).eval()
    patch = [31, 31, 31]  # output windows of 6
    x = torch.randn(1, 1, 20, 17, 13)
    grown = grown_window(model, patch, x.shape[2:], grow=8.0)
    assert math.prod(grown) <= 8 * 31**3 and all(g >= p for g, p in zip(grown, patch))
    assert model.output_size(grown)[0] > 6  # fewer, larger windows
    with torch.inference_mode():
        small = tiled_logits(model, x, patch, overlap=0.5, blend="constant")
        large = tiled_logits(model, x, grown, overlap=0.5, blend="constant")
    torch.testing.assert_close(small, large, atol=1e-4, rtol=1e-4)


# ---- (a) training from the planner's own patch ---------------------------------------------------------------------
def test_valid_training_from_the_planned_patch_lowers_the_loss(tiny: Path, tmp_path: Path) -> None:
    from segment.train.runner import train

    cfg = _cfg(tiny, "model.features=[4,8,16]", "train.steps_per_epoch=6", "train.max_epochs=5", "train.precision=32",
               "train.threads=1", "data.augment.rotate_prob=0", "train.lr=0.01", "seed=0")
    result = train(cfg, output=tmp_path / "run")
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["output_size"] is not None and plan["patch_size"] != plan["output_size"]
    assert result.steps == 30
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) == 5
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0.0 <= result.val_dice["val_dice_mean"] <= 1.0
