"""The disk cache of preprocessed cases (issue 15.2): same patches as the RAM cache, reused across runs, keyed by the
plan and the source files, rebuilt (never crashed on) when an entry is damaged."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from segment.config import load_config
from segment.data import pipeline, preprocess
from segment.data.demo import make_demo_dataset
from segment.data.plan import make_plan
from segment.io.dataset import discover

# patch 64 > the demo volumes' first axis (~55 voxels): the padding path is exercised too
TINY = [
    "model.features=[4,8,16]", "data.patch_size=[64,24,24]", "data.batch_size=2", "train.steps_per_epoch=3",
    "data.augment.rotate_prob=0.3", "data.augment.intensity_prob=0.5", "data.augment.noise_prob=0.5", "seed=7",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=4, seed=3, progress=False)


@pytest.fixture(scope="module")
def setup(tiny_data: Path):
    dataset = discover(tiny_data)
    cfg = load_config(overrides=[f"data.root={tiny_data}", *TINY])
    plan, _ = make_plan(dataset, cfg, device="cpu")
    split = pipeline.make_split([c.name for c in dataset.cases], 7, 0.25, 5, None)
    return dataset, plan, split


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of load_case (the preprocessing a warm cache avoids), by case file name."""
    seen: list[str] = []
    real = preprocess.load_case

    def counting(images, label, plan):
        seen.append(Path(images[0]).name)
        return real(images, label, plan)

    monkeypatch.setattr(preprocess, "load_case", counting)
    monkeypatch.setattr(pipeline, "load_case", counting)
    return seen


def _cfg(data: Path, *extra: str):
    return load_config(overrides=[f"data.root={data}", *TINY, *extra])


def _batches(loader, epochs: int = 2) -> list[dict]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += list(loader)
    return out


def test_disk_cache_gives_exactly_the_patches_of_the_ram_cache(setup, tiny_data: Path, tmp_path: Path) -> None:
    dataset, plan, split = setup
    loaders = {mode: pipeline.make_loaders(dataset, split, plan, _cfg(tiny_data, f"data.cache={mode}",
                                                                      f"data.cache_dir={tmp_path}"))
               for mode in ("ram", "disk")}
    ram, disk = (_batches(loaders[m][0]) for m in ("ram", "disk"))
    assert len(ram) == len(disk) == 6
    for a, b in zip(ram, disk):
        assert a["image"].shape == b["image"].shape == (2, 1, 64, 24, 24)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert any(bool((b["label"] > 0).any()) for b in disk)  # foreground oversampling found foreground
    # whole validation volumes too
    (rv,), (dv,) = ([h.load() for h in loaders[m][1]] for m in ("ram", "disk"))
    assert torch.equal(rv["image"], dv["image"]) and torch.equal(rv["label"], dv["label"])
    assert dv["label"].dtype == torch.int64


def test_second_run_and_resume_reuse_the_cache(tiny_data: Path, tmp_path: Path, calls: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.train.runner import train

    monkeypatch.setenv("SEGMENT_HOME", str(tmp_path / "home"))  # data.cache_dir unset: the cache is in the home
    extra = ["data.cache=disk", "train.precision=32", "train.threads=1", "train.accelerator=cpu", "train.max_epochs=1",
             "train.steps_per_epoch=2"]
    train(_cfg(tiny_data, *extra), output=tmp_path / "first")
    assert sorted(calls) == sorted(p.name for p in (tiny_data / "imagesTr").iterdir())  # each case preprocessed once
    assert len(list((tmp_path / "home" / "cache").glob("*/*-*/image.npy"))) == 4
    calls.clear()
    train(_cfg(tiny_data, *extra), output=tmp_path / "second")
    assert calls == []  # a second run reads the cache: no preprocessing at all
    train(_cfg(tiny_data, *extra[:-2], "train.max_epochs=2"), output=tmp_path / "second", resume=True)
    assert calls == []  # nor does a resume


def test_the_key_follows_the_preprocessing_and_the_sources(setup, tmp_path: Path, calls: list[str]) -> None:
    from segment.data.cache import DiskCache, plan_key

    dataset, plan, _ = setup
    finer = dataclasses.replace(plan, spacing=[s * 0.9 for s in plan.spacing])
    assert plan_key(finer) != plan_key(plan)
    assert plan_key(dataclasses.replace(plan, ct_mean=plan.ct_mean + 1)) != plan_key(plan)
    # patch, batch and network shape do not change the voxels: same cache
    assert plan_key(dataclasses.replace(plan, patch_size=[32, 32, 32], batch_size=7, features=[8, 16])) == plan_key(plan)

    cache = DiskCache(tmp_path, plan)
    case = dataset.cases[0]
    assert cache.prepare([case]) == [case.name] and cache.prepare([case]) == []
    assert DiskCache(tmp_path, finer).dir != cache.dir and not DiskCache(tmp_path, finer).valid(case)
    st = case.images[0].stat()
    os.utime(case.images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed (newer mtime)
    try:
        calls.clear()
        assert cache.prepare([case]) == [case.name] and len(calls) == 1
    finally:
        os.utime(case.images[0], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_truncated_or_half_written_entry_is_rebuilt(setup, tmp_path: Path, calls: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from segment.data.cache import IMAGE, LABEL, DiskCache
    from segment.data.cache_reads import LoadCachedd

    dataset, plan, _ = setup
    case = dataset.cases[1]
    cache = DiskCache(tmp_path, plan)
    cache.prepare([case])
    entry = cache.entry(case)
    reference = LoadCachedd(cache)(case)

    with (entry / IMAGE).open("r+b") as f:  # truncated (say, the disk filled up): found when the run starts
        f.truncate((entry / IMAGE).stat().st_size // 2)
    calls.clear()
    assert DiskCache(tmp_path, plan).prepare([case]) == [case.name] and len(calls) == 1
    again = LoadCachedd(DiskCache(tmp_path, plan))(case)
    assert torch.equal(again["image"], reference["image"]) and torch.equal(again["label"], reference["label"])

    with (entry / LABEL).open("r+b") as f:  # damaged while a run uses it: rebuilt when read, not a crash
        f.truncate(100)
    calls.clear()
    again = LoadCachedd(DiskCache(tmp_path, plan))(case)
    assert len(calls) == 1 and torch.equal(again["label"], reference["label"])

    # a run killed while writing an entry leaves nothing that looks complete (and no temporary folder behind)
    other = dataset.cases[2]
    real_save, saved = np.save, []

    def dies(path, array, *a, **k):
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed between the image and the label
        return real_save(path, array, *a, **k)

    monkeypatch.setattr(np, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        DiskCache(tmp_path, plan).prepare([other])
    monkeypatch.setattr(np, "save", real_save)
    assert not cache.entry(other).exists() and not list(cache.dir.glob(".tmp-*"))
    assert not DiskCache(tmp_path, plan).valid(other)
    assert DiskCache(tmp_path, plan).prepare([other]) == [other.name]


def test_auto_keeps_the_cases_in_ram_only_when_they_fit(setup, tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    import segment.device

    dataset, plan, split = setup
    cases = dataset.cases
    train_cases, val_cases = cases[:3], cases[3:]
    cfg = _cfg(tiny_data, f"data.cache_dir={tmp_path}")
    assert cfg.data.cache == "auto"
    monkeypatch.setattr(segment.device, "available_memory_bytes", lambda: 64 * 2**30)
    assert pipeline.choose_cache(cfg, plan, train_cases, val_cases)[0] == "ram"
    monkeypatch.setattr(segment.device, "available_memory_bytes", lambda: 2**20)  # 1 MB free
    mode, why = pipeline.choose_cache(cfg, plan, train_cases, val_cases)
    assert mode == "disk" and "25%" in why
    pipeline.make_loaders(dataset, split, plan, cfg)
    assert "data cache: disk" in capsys.readouterr().err
    # older configs said true/false
    assert _cfg(tiny_data, "data.cache=true").data.cache == "ram"
    assert _cfg(tiny_data, "data.cache=false").data.cache == "none"


def test_ram_estimate_counts_the_mirrored_border_of_valid_padding() -> None:
    from segment.data.cache import estimate_ram_bytes
    from segment.data.plan import Plan

    same = Plan(spacing=[1.0] * 3, patch_size=[40, 56, 40], batch_size=2, features=[4, 8], modality="mri",
                channels=1, labels={0: "background", 1: "x"}, median_shape=[35, 50, 36])
    # same padding: max(median, patch) per axis; 20 bytes per training voxel (image, label, indices), 12 per val voxel
    assert estimate_ram_bytes(same, 10, 2) == 40 * 56 * 40 * (10 * 20 + 2 * 12)
    valid = dataclasses.replace(same, patch_size=[71, 79, 79], output_size=[18, 26, 26])  # margin 53
    # valid padding: training cases grow by the margin (35 + 53 = 88, ...), validation cases are kept unpadded
    assert estimate_ram_bytes(valid, 10, 2) == 88 * 103 * 89 * 10 * 20 + 71 * 79 * 79 * 2 * 12
