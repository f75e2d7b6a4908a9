"""Preprocessed cases cached on disk, read patch by patch: training memory that does not grow with the dataset.

Layout: `<cache_dir>/<plan key>/<case name>-<paths key>/` holds

- `image.npy`: the preprocessed (C, *spatial) float32 volume, exactly what `load_case` returns;
- `label.npy`: the (1, *spatial) class-index map, as uint8 (int16 beyond 255 classes);
- `meta.json`, written last: shape, dtypes, the byte size of both arrays, the foreground voxel count of every slice
  along the first spatial axis (what the foreground-oversampled crop needs, see
  `segment.data.cache_reads.CachedPosNegCropd`) and the size and modification time of every source file.

The plan key is a hash of every plan field that changes what preprocessing produces (spacing, modality, CT window and
statistics, channels and their modalities, labels and label values; any field this module does not know to be
irrelevant counts, so a new preprocessing field can only cause a rebuild, never a stale read), the cache format and
the segment version. The entry key is a hash of the source paths; an entry whose sources changed size or mtime, or
whose files are missing, truncated or unreadable, is rebuilt. An entry is written into a temporary folder and renamed
into place (atomic on POSIX), so a killed run never leaves a half-written case that looks complete. Any folder here
may be deleted at any time; it is rebuilt when needed.

The stored volumes are unpadded in both padding modes (valid padding's mirrored border is cut virtually, see
`segment.data.cache_reads`), so the key need not name the padding. Training reads `np.load(mmap_mode="r")` views and
copies only the patch region (and, to choose a crop centre, one slice of the label), so the pages a step touches are
about one patch per draw, whatever the number of cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from segment.data import preprocess
from segment.data.plan import Plan
from segment.io.dataset import Case
from segment.version import segment_version

CACHE_FORMAT = 1
# Plan fields that shape the network or the sampling but not the preprocessed voxels; every other field is in the key.
NOT_PREPROCESSING = frozenset({"patch_size", "batch_size", "features", "median_shape", "num_cases", "mirror_axes",
                               "strides", "kernels", "modality_source", "output_size"})
IMAGE, LABEL, META = "image.npy", "label.npy", "meta.json"
STALE_TMP_S = 24 * 3600  # temporary folders of another host (or of a live process) are left alone this long


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def preprocessing_fields(plan: Plan) -> dict[str, Any]:
    """The plan fields the preprocessed voxels depend on (see NOT_PREPROCESSING)."""
    d = plan.to_dict()
    return {f.name: d[f.name] for f in fields(plan) if f.name not in NOT_PREPROCESSING and f.name in d}


def plan_key(plan: Plan) -> str:
    """The cache folder of a plan: changes whenever preprocessing would produce other voxels."""
    return _digest({"format": CACHE_FORMAT, "segment": segment_version(), "plan": preprocessing_fields(plan)})


def _sources(case: Case) -> list[Path]:
    return [Path(p) for p in case.images] + ([Path(case.label)] if case.label is not None else [])


def source_stats(case: Case) -> list[list]:
    """[absolute path, size, mtime_ns] of every source file of a case."""
    out = []
    for p in _sources(case):
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)[:80] or "case"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove(path: Path) -> None:
    """Move a folder aside (atomic), then delete it: a reader never sees it half deleted."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class DiskCache:
    """The cached, preprocessed cases of one plan under `root/<plan key>/`. Picklable (loader workers)."""

    def __init__(self, root: str | Path, plan: Plan) -> None:
        self.root = Path(root)
        self.plan = plan
        self.key = plan_key(plan)
        self.dir = self.root / self.key
        self._meta: dict[str, dict] = {}  # per process: entry folder -> its meta.json
        self._entries: dict[Case, Path] = {}
        self.built: list[str] = []  # names of the cases this instance preprocessed (what a warm cache avoids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_meta": {}}

    # ---- where and whether ----------------------------------------------------------------------------------------
    def entry(self, case: Case) -> Path:
        """The case's folder: its name and a hash of its source paths (their size and mtime are checked by `valid`)."""
        found = self._entries.get(case)
        if found is None:
            key = _digest([str(p.resolve()) for p in _sources(case)], 12)
            found = self._entries[case] = self.dir / f"{_safe(case.name)}-{key}"
        return found

    def _read_meta(self, entry: Path) -> dict | None:
        try:
            meta = json.loads((entry / META).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None

    def valid(self, case: Case, check_sources: bool = True) -> bool:
        """Complete (meta.json written last), arrays of the recorded byte size, and built from these very files."""
        entry = self.entry(case)
        meta = self._read_meta(entry)
        if meta is None:
            return False
        try:
            if any((entry / name).stat().st_size != size for name, size in meta["bytes"].items()):
                return False
            return not check_sources or meta["sources"] == source_stats(case)
        except (OSError, KeyError, TypeError):
            return False

    # ---- building -------------------------------------------------------------------------------------------------
    def _write_plan(self) -> None:
        target = self.dir / "plan.json"
        if target.is_file():
            return
        tmp = self.dir / f".plan-{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps(preprocessing_fields(self.plan), indent=2))
        os.replace(tmp, target)

    def clean(self) -> None:
        """Remove what killed runs left: temporary folders of dead processes on this host (or old ones), trash."""
        if not self.dir.is_dir():
            return
        host = socket.gethostname()
        for p in self.dir.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".tmp-"):
                try:
                    p_host, pid = p.name.split("@")[-3:-1]  # .tmp-<entry>@<host>@<pid>@<tag>
                    dead = p_host == host and not _pid_alive(int(pid))
                    old = time.time() - p.stat().st_mtime > STALE_TMP_S
                except (ValueError, OSError):
                    dead, old = False, True
                if dead or old:
                    shutil.rmtree(p, ignore_errors=True)

    def build(self, case: Case) -> Path:
        """Preprocess one case into its entry: written in a temporary folder, then renamed into place."""
        final = self.entry(case)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_plan()
        tmp = self.dir / f".tmp-{final.name}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            stats = source_stats(case)
            item = preprocess.load_case(case.images, case.label, self.plan)
            image = np.ascontiguousarray(item["image"].numpy(), dtype=np.float32)
            meta: dict[str, Any] = {"format": CACHE_FORMAT, "case": case.name, "name": item["name"],
                                    "shape": list(image.shape[1:]), "channels": int(image.shape[0]), "sources": stats}
            np.save(tmp / IMAGE, image)
            meta["bytes"] = {IMAGE: (tmp / IMAGE).stat().st_size}
            if "label" in item:
                label = item["label"].numpy()
                dtype = np.uint8 if label.max(initial=0) < 2**8 and label.min(initial=0) >= 0 else np.int16
                small = np.ascontiguousarray(label.astype(dtype))
                np.save(tmp / LABEL, small)
                meta["bytes"][LABEL] = (tmp / LABEL).stat().st_size
                # foreground (label != 0) voxels of every slice along the first spatial axis
                meta["fg_per_slice"] = np.count_nonzero(small[0].reshape(small.shape[1], -1), axis=1).tolist()
            del item
            text = json.dumps(meta)
            (tmp / META).write_text(text)
            self._publish(tmp, final, case)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._meta.pop(str(final), None)
        self.built.append(case.name)
        return final

    def _publish(self, tmp: Path, final: Path, case: Case) -> None:
        for _ in range(3):
            try:
                os.rename(tmp, final)  # atomic; fails when `final` exists (and is not empty)
                return
            except OSError:
                if self.valid(case):  # another process finished the same case first
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                _remove(final)  # stale or broken: replace it
        raise OSError(f"could not publish the cache entry {final}")

    def prepare(self, cases: Sequence[Case], progress: Any = None) -> list[str]:
        """Make sure every case has a complete, current entry; returns the names of the cases (re)built.

        `progress(iterable, total)` may wrap the loop over the cases to rebuild (a progress bar).
        """
        self.clean()
        todo = [c for c in cases if not self.valid(c)]
        rebuilt: list[str] = []
        for case in (progress(todo, len(todo)) if progress and todo else todo):
            self.build(case)
            rebuilt.append(case.name)
        return rebuilt

    # ---- reading --------------------------------------------------------------------------------------------------
    def open(self, case: Case, label: bool = True) -> tuple[dict, np.ndarray, np.ndarray | None]:
        """(meta, image, label) as read-only memory maps; an unreadable entry is rebuilt once, not crashed on."""
        for attempt in (0, 1):
            entry = self.entry(case)
            try:
                meta = self._meta.get(str(entry)) or self._read_meta(entry)
                if meta is None:
                    raise ValueError("incomplete")
                image = np.load(entry / IMAGE, mmap_mode="r")
                lab = np.load(entry / LABEL, mmap_mode="r") if label and LABEL in meta["bytes"] else None
                if tuple(image.shape) != (meta["channels"], *meta["shape"]) or (
                        lab is not None and tuple(lab.shape) != (1, *meta["shape"])):
                    raise ValueError("shape mismatch")
                self._meta[str(entry)] = meta
                return meta, image, lab
            except (OSError, ValueError, KeyError, TypeError, EOFError):
                self._meta.pop(str(entry), None)
                if attempt:
                    raise
                _remove(entry)
                self.build(case)
        raise AssertionError("unreachable")


def estimate_ram_bytes(plan: Plan, n_train: int, n_val: int, cases: Iterable[Case] = ()) -> int:
    """Bytes the RAM cache (MONAI CacheDataset) would hold: per training case the float32 image, the int64 label and
    the int64 foreground/background voxel indices of the padded volume (with valid padding grown by the network's
    margin, `segment.data.mirror.MirrorPadd`); per validation case image and label, unpadded."""
    shape = list(plan.median_shape or [])
    if not shape:  # plans written before median_shape: read the headers
        from segment.io.image import read_channel_geometry
        from segment.io.geometry import canonical_grid, resampled_shape

        shapes = []
        for case in cases:
            grid = canonical_grid(read_channel_geometry(case.images[0])[0])
            shapes.append(resampled_shape(grid.shape, grid.spacing, plan.spacing))
        shape = [int(v) for v in np.median(np.array(shapes), axis=0)] if shapes else list(plan.patch_size)
    margins = plan.output_margins() or [0] * len(shape)
    voxels = int(np.prod([max(int(s) + m, int(p)) for s, m, p in zip(shape, margins, plan.patch_size)]))
    val_voxels = int(np.prod([max(int(s), int(p)) for s, p in zip(shape, plan.patch_size)]))
    c = int(plan.channels)
    return n_train * voxels * (4 * c + 8 + 8) + n_val * val_voxels * (4 * c + 8)
