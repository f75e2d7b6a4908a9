"""Anisotropic planning (nnU-Net's rules): target spacing, per-axis strides and kernels in the plan and the config, the
U-Net built from them (same and valid padding), old plans and checkpoints without the new fields, and `model-info`.

Expected values are worked out by hand from the rules in segment/data/plan.py (module docstring, `plan_pooling`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import segment.data.plan as plan_module
from segment.config import Config, DataConfig, ModelConfig
from segment.data.plan import Plan, fullres_target_spacing, make_plan, plan_pooling
from segment.io.dataset import Case, Dataset
from segment.nets import build_model, receptive_fields

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int, modality: str = "mri") -> Dataset:
    root = Path("/nonexistent")
    cases = [Case(f"c{i}", (root / f"c{i}.nii.gz",), root / f"c{i}_seg.nii.gz") for i in range(n)]
    return Dataset(root=root, cases=cases, labels={0: "background", 1: "organ"}, modality=modality, channels=1)


def _fake_fingerprint(monkeypatch: pytest.MonkeyPatch, shapes: list[list[int]], spacings: list[list[float]]) -> None:
    fp = {"ordered_axes": {}, "shapes": shapes, "spacings": spacings,
          "median_spacing": np.median(np.array(spacings), axis=0).tolist(), "fg_percentiles": [0.0, 50.0, 100.0],
          "fg_mean": 50.0, "fg_std": 20.0}
    monkeypatch.setattr(plan_module, "fingerprint", lambda dataset, *args, **kwargs: fp)


ANISO = Config(data=DataConfig(anisotropic=True))  # the default since the benchmark in BENCHMARKS.md; spelled out here

# Prostate MR (T2, 0.6 x 0.6 x 3.6 mm): 320 x 320 x 20 voxels = 192 x 192 x 72 mm.
# Patch: 2,048,000 voxels > 64^3 = 262,144, so the physically longest axis shrinks by 0.9 in turn: x and y (192 mm)
# alternate, z (72 mm) is never the longest before the patch fits: x = y = 320 * 0.9^10 = 111.6 (67 mm), and
# 111.6^2 * 20 = 249,000 <= 262,144 (one shrink earlier, 111.6 * 124.0 * 20 = 276,700 did not fit).
# Pooling, level by level (spacing; voxels):
#   level 1: 0.6 0.6 3.6 ; 111.6 111.6 20  z is 6x the finest (> 2): stride 2x2x1, stage-0 kernel 3x3x1
#   level 2: 1.2 1.2 3.6 ; 55.8 55.8 20    z is 3x (> 2):           stride 2x2x1, stage-1 kernel 3x3x1
#   level 3: 2.4 2.4 3.6 ; 27.9 27.9 20    z is 1.5x (<= 2):         stride 2x2x2, stage-2 kernel 3x3x3
#   level 4: 4.8 4.8 7.2 ; 14 14 10        every axis >= 8 voxels:  stride 2x2x2, stage-3 kernel 3x3x3
#   5 stages reached (max_depth); bottleneck kernel 3x3x3 (9.6 9.6 14.4 mm; 7 x 7 x 5 voxels).
# Patch rounded up to the product of each axis's strides: x, y to 16 (111.6 -> 112), z to 4 (20 -> 20).
PROSTATE_SHAPES = [[320, 320, 20]] * 3
PROSTATE_SPACINGS = [[0.6, 0.6, 3.6]] * 3
PROSTATE_STRIDES = [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
PROSTATE_KERNELS = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]


def test_prostate_plan_pools_the_coarse_axis_only_once_the_others_catch_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fingerprint(monkeypatch, PROSTATE_SHAPES, PROSTATE_SPACINGS)
    plan, _ = make_plan(_dataset(3), ANISO, device="cpu")
    assert plan.spacing == pytest.approx([0.6, 0.6, 3.6])  # every case 3.6 mm: the 10th percentile is 3.6 too
    assert plan.strides == PROSTATE_STRIDES
    assert plan.kernels == PROSTATE_KERNELS
    assert plan.patch_size == [112, 112, 20]
    assert plan.features == [8, 32, 64, 128, 256]  # 5 stages: the default widths, the last doubled
    for axis, n in enumerate(plan.patch_size):  # divisible by the product of the strides along each axis
        assert n % math.prod(r[axis] for r in plan.strides) == 0
    assert plan.batch_size == 2  # 448,000 // 250,880 = 1 -> at least 2
    # the same data planned the old way pools z with x and y at every level, so z (20 voxels: log2(20 / 4) = 2.3) limits
    # the whole net to 2 pools, 3 stages
    old, _ = make_plan(_dataset(3), Config(data=DataConfig(anisotropic=False)), device="cpu")
    assert old.strides is None and old.kernels is None and old.features == [8, 32, 64]


def test_isotropic_fingerprint_gives_todays_plan_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = [[35, 50, 36], [34, 52, 35], [36, 49, 38]]  # the hippocampus-like plan of tests/test_planning.py
    _fake_fingerprint(monkeypatch, shapes, [[1.0, 1.0, 1.0]] * 3)
    new, _ = make_plan(_dataset(3), ANISO, device="cpu")
    old, _ = make_plan(_dataset(3), Config(data=DataConfig(anisotropic=False)), device="cpu")
    assert new.to_dict() == old.to_dict()
    assert new.strides is None and new.kernels is None
    assert (new.spacing, new.patch_size, new.features, new.batch_size) == ([1.0, 1.0, 1.0], [40, 56, 40], [8, 32, 64, 128], 5)
    # within a factor 2 is still "isotropic": 0.8 x 0.8 x 1.5 mm pools every axis at every level, as before
    _fake_fingerprint(monkeypatch, shapes, [[0.8, 0.8, 1.5]] * 3)
    off = Config(data=DataConfig(anisotropic=False))
    assert make_plan(_dataset(3), ANISO, device="cpu")[0].to_dict() == make_plan(_dataset(3), off, device="cpu")[0].to_dict()


# The three CTs of tests/test_planning.py, now with the default data.anisotropic=true. Target spacing: medians 0.7, 0.7,
# 2.5; z is > 3 x 0.7 and its median 100 voxels x 3 < 512, so z takes the 10th percentile of 2.0, 2.5, 3.0 = 2.1.
# Resampled (round(n * s / t)): 512x512x119, 512x512x129, 439x439x95 -> median 512 x 512 x 119 (358 x 358 x 250 mm).
# CPU patch: the longest axis in mm shrinks by 0.9 in turn until <= 64^3: 85.4 x 94.9 x 30.2 voxels (60 x 66 x 64 mm).
# Levels (spacing; voxels): 0.7 0.7 2.1 (z 3x) -> 2x2x1, kernel 3x3x1; 1.4 1.4 2.1 (1.5x) -> 2x2x2; 2.8 2.8 4.2 -> 2x2x2;
# 5.6 5.6 8.4, z 7.6 voxels < 8 -> 2x2x1; 5 stages (max). Patch rounded up to 16, 16, 4: 96 x 96 x 32.
CT_SHAPES = [[512, 512, 100], [448, 448, 90], [512, 512, 100]]
CT_SPACINGS = [[0.7, 0.7, 2.5], [0.8, 0.8, 3.0], [0.6, 0.6, 2.0]]


def test_default_plans_thick_slice_ct_per_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fingerprint(monkeypatch, CT_SHAPES, CT_SPACINGS)
    plan, _ = make_plan(_dataset(3, "ct"), Config(), device="cpu")  # the default is data.anisotropic=true
    assert plan.spacing == pytest.approx([0.7, 0.7, 2.1])
    assert plan.median_shape == [512, 512, 119]
    assert plan.strides == [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert plan.kernels == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plan.patch_size == [96, 96, 32] and plan.features == [8, 32, 64, 128, 256]
    assert plan.batch_size == 2  # 448,000 // 294,912 = 1 -> at least 2


def test_fullres_target_spacing_takes_the_10th_percentile_of_a_much_coarser_axis() -> None:
    spacings = [[0.6, 0.6, 3.0], [0.6, 0.6, 3.6], [0.6, 0.6, 3.6], [0.7, 0.7, 4.0], [0.6, 0.6, 3.6]]
    shapes = [[320, 320, 20]] * 5
    # median z 3.6 > 3 * 0.6 and 20 * 3 < 320: z takes the 10th percentile of 3.0, 3.6, 3.6, 3.6, 4.0 = 3.0 + 0.4 * 0.6
    assert fullres_target_spacing(spacings, shapes) == pytest.approx([0.6, 0.6, 3.24])
    # not much coarser (2.5 < 3 * 0.9): the median
    assert fullres_target_spacing([[0.9, 0.9, 2.5], [0.9, 0.9, 2.0], [0.9, 0.9, 3.0]], [[300, 300, 100]] * 3) \
        == pytest.approx([0.9, 0.9, 2.5])
    # much coarser in mm but as many voxels as the others (60 * 3 >= 100): the median, as nnU-Net
    assert fullres_target_spacing([[1, 1, 5.0], [1, 1, 4.0], [1, 1, 6.0]], [[100, 100, 60]] * 3) == pytest.approx([1, 1, 5.0])


def test_plan_pooling_by_hand() -> None:
    # hippocampus resampled to 1 x 1 x 4 mm (35 x 50 x 9 voxels): z is 4x coarser, then 2x (<= 2: pooled), then too small
    assert plan_pooling([35, 50, 9], [1.0, 1.0, 4.0]) == (
        [[2, 2, 1], [2, 2, 2], [2, 2, 1]], [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]])
    # isotropic: every axis at every level while >= 8 voxels, as plan_patch's depth (log2(35/4) = 3.1 -> 3 levels)
    assert plan_pooling([35, 50, 36], [1.0] * 3)[0] == [[2, 2, 2]] * 3
    # z (3 voxels) is never pooled; x 18 -> 9 -> 4.5 stops below 8; y 40 -> 20 -> 10 would still have 8, but a lone
    # axis is pooled only with >= 12 voxels (nnU-Net)
    assert plan_pooling([18, 40, 3], [1.0, 1.0, 1.0], max_depth=6)[0] == [[2, 2, 1], [2, 2, 1]]


def _net(plan: Plan, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    features = [2 * f // 16 for f in plan.features]  # narrow, so the forward pass is quick; the geometry is the plan's
    return build_model(ModelConfig(features=features, strides=plan.strides, kernels=plan.kernels, **kw)).eval()


def test_network_with_planned_strides_runs_on_the_planned_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fingerprint(monkeypatch, PROSTATE_SHAPES, PROSTATE_SPACINGS)
    plan, _ = make_plan(_dataset(3), ANISO, device="cpu")
    model = _net(plan, out_channels=3)
    # the layers are what the plan says: stage 0 convolves 3x3x1, stage 1 downsamples 2x2x1, the decoder mirrors it
    assert tuple(model.encoder.stages[0][0].branch[0].weight.shape[2:]) == (3, 3, 1)
    assert tuple(model.encoder.stages[1][0].branch[0].stride) == (2, 2, 1)
    assert tuple(model.decoder.ups[0].conv.stride) == (2, 2, 1)
    assert model.size_multiples() == (16, 16, 4)
    with torch.no_grad():
        outs = model.forward_all(torch.randn(1, 1, *plan.patch_size))
    assert tuple(outs[0].shape) == (1, 3, *plan.patch_size)  # same padding: output = input
    assert [tuple(o.shape[2:]) for o in outs] == [(112, 112, 20), (56, 56, 20), (28, 28, 20), (14, 14, 10)]
    assert model.output_size(plan.patch_size) == tuple(plan.patch_size)
    # odd sizes still work (centre crop after upsampling), per axis
    with torch.no_grad():
        assert tuple(model(torch.randn(1, 1, 37, 29, 7)).shape[2:]) == (37, 29, 7)


def test_valid_padding_arithmetic_follows_the_per_axis_strides_and_kernels() -> None:
    cfg = ModelConfig(features=[2, 4, 4], padding="valid", norm="batch", strides=[[2, 1], [2, 2]],
                      kernels=[[3, 1], [3, 3], [3, 3]], spatial_dims=2)
    model = build_model(cfg).eval()
    # axis 0 (3x3 everywhere, stride 2 twice) is the isotropic depth-3 net of tests/test_nets_shapes.py: 27 + 4k, margin 25.
    # axis 1: stage 0 kernel 1 (-0), stride 1 into stage 1 (-2 -2), stride 2 into stage 2 ((n - 3) // 2 + 1, only for
    # odd n, then -2); decoder x2 -2, then x1 and kernel 1 (-0). n = 13: 13 -> 9 -> 2 -> 2 -> 2, output 2, margin 11;
    # n = 11 leaves 0; allowed sizes 13 + 2k.
    assert model.size_multiples() == (4, 2)
    lo0, lo1 = model.min_input_sizes()
    assert (lo0, lo1) == (27, 13) and model.output_margins() == (25, 11)
    for n0 in (lo0, lo0 + 4):
        for n1 in (lo1, lo1 + 2, lo1 + 4):
            with torch.no_grad():
                out = model(torch.randn(1, 1, n0, n1))
            assert tuple(out.shape[2:]) == model.output_size((n0, n1)) == (n0 - 25, n1 - 11)
    with pytest.raises(ValueError, match="on this axis"):
        model.output_size((lo0, lo1 + 1))
    assert model.input_size_for((5, 5)) == tuple(lo + st * math.ceil(max(0, 5 + m - lo) / st) for lo, st, m in
                                                   zip(model.min_input_sizes(), model.size_multiples(), model.output_margins()))


def test_valid_anisotropic_tiles_equal_one_forward_pass() -> None:
    from segment.engine.tiler import reflect_pad, tiled_logits, window_geometry

    torch.manual_seed(0)
    model = build_model(ModelConfig(features=[3, 6, 12], padding="valid", norm="batch", out_channels=2,
                                    strides=[[2, 2, 1], [2, 2, 2]], kernels=[[3, 3, 1], [3, 3, 3], [3, 3, 3]])).eval()
    x = torch.randn(1, 1, 14, 12, 9)
    patch = [40, 40, 30]
    win_in, win_out, step = window_geometry(model, patch)
    assert step == 4 and all((w - lo) % st == 0 for w, lo, st in zip(win_in, model.min_input_sizes(), model.size_multiples()))
    margins = model.output_margins()
    covered = [w + step * math.ceil(max(0, n - w) / step) for n, w in zip(x.shape[2:], win_out)]
    before = [m // 2 for m in margins]
    with torch.inference_mode():
        tiled = tiled_logits(model, x, patch, overlap=0.5, sw_batch_size=2, blend="constant")
        padded = reflect_pad(x, before, [m - b + c - n for m, b, c, n in zip(margins, before, covered, x.shape[2:])])
        whole = model(padded)[(slice(None), slice(None)) + tuple(slice(0, n) for n in x.shape[2:])]
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=1e-4)


def test_receptive_field_per_axis_matches_gradient_support() -> None:
    """Batch norm in eval mode is local, so the input-gradient support of one output voxel is its receptive field."""
    cfg = ModelConfig(features=[2, 2, 2], strides=[[2, 2, 1], [2, 2, 2]], kernels=[[3, 3, 1], [3, 3, 1], [3, 3, 3]],
                      out_channels=2, norm="batch", zero_init_residual=False)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    size = 40
    x = torch.randn(1, 1, size, size, size, dtype=torch.float64, requires_grad=True)
    out = model(x)
    widths = [0, 0, 0]
    for phase in range(4):  # the receptive field depends on the output voxel's phase on the coarse grids (period 4x4x2)
        c = size // 2 + phase
        (grad,) = torch.autograd.grad(out[0, 1, c, c, c], x, retain_graph=True)
        support = (grad[0, 0].abs() > 0).nonzero()
        assert support.min() > 0 and support.max() < size - 1  # inside the image, away from the zero padding
        for axis in range(3):
            widths[axis] = max(widths[axis], int(support[:, axis].max() - support[:, axis].min() + 1))
    assert tuple(widths) == receptive_fields(cfg)
    assert widths[2] < widths[0]  # the coarse axis sees fewer voxels (each of them 4x thicker)


def test_old_checkpoint_without_the_new_fields_builds_the_same_network(tmp_path: Path) -> None:
    from segment.inference.loading import load_checkpoint

    old_cfg = Config(model=ModelConfig(features=[4, 8, 16], out_channels=3)).model_dump(mode="json")
    for section, key in (("model", "strides"), ("model", "kernels"), ("data", "anisotropic")):
        old_cfg[section].pop(key)  # a config written before these fields existed
    old_plan = {"spacing": [1.0, 1.0, 1.0], "patch_size": [32, 32, 32], "batch_size": 2, "features": [4, 8, 16],
                "modality": "mri", "channels": 1, "labels": {"0": "background", "1": "a", "2": "b"}}
    reference = build_model(ModelConfig(features=[4, 8, 16], out_channels=3))
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()},
                "hyper_parameters": {"config": old_cfg, "plan": old_plan}}, path)
    model, plan, config = load_checkpoint(path)
    assert plan.strides is None and plan.kernels is None and plan.modality_source is None
    assert config.model.strides is None and config.model.kernels is None
    # the same network as one with every stride 2 and every kernel 3 spelled out
    explicit = build_model(ModelConfig(features=[4, 8, 16], out_channels=3, strides=[[2, 2, 2]] * 2, kernels=[[3, 3, 3]] * 3))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in explicit.state_dict().items()}
    explicit.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 20, 18, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), explicit.eval()(x))


def test_config_rejects_strides_that_do_not_fit_the_depth() -> None:
    with pytest.raises(ValueError, match="strides must be 2 lists"):
        ModelConfig(features=[4, 8, 16], strides=[[2, 2, 1]])
    with pytest.raises(ValueError, match="kernels must be 3 lists"):
        ModelConfig(features=[4, 8, 16], kernels=[[3, 3, 5]] * 3)


def test_model_info_shows_per_axis_strides_and_kernels() -> None:
    from segment.cli import app

    sets = ["model.features=[4,8,16,32]", "model.strides=[[2,2,1],[2,2,2],[2,2,1]]",
            "model.kernels=[[3,3,1],[3,3,3],[3,3,3],[3,3,3]]"]
    result = CliRunner().invoke(app, ["model-info", *[a for s in sets for a in ("--set", s)], "--size", "40,56,10"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "strides 2x2x1 2x2x2 2x2x1" in out and "kernels 3x3x1 3x3x3 3x3x3 3x3x3" in out
    assert "encoder stage 0 (4 ch, blocks: 1, kernel 3x3x1)" in out
    assert "encoder stage 1 (8 ch, blocks: 1, kernel 3x3x3, stride 2x2x1)" in out
    assert "8x8x2" in out  # size multiple per axis
    assert "(40, 56, 10)" in out


def test_runner_puts_the_planned_strides_into_the_model_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.train.setup import apply_plan

    _fake_fingerprint(monkeypatch, PROSTATE_SHAPES, PROSTATE_SPACINGS)
    plan, _ = make_plan(_dataset(3), ANISO, device="cpu")
    cfg = apply_plan(ANISO, plan)
    assert cfg.model.strides == PROSTATE_STRIDES and cfg.model.kernels == PROSTATE_KERNELS
    assert cfg.model.features == plan.features
    # patch, batch and spacing live in the plan only; the config keeps the user's own (unset) values
    assert cfg.data.patch_size == ANISO.data.patch_size and cfg.data.batch_size == ANISO.data.batch_size
