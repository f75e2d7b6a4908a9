"""The embedded demo dataset: small, realistic synthetic 3D MR-like scans that `segment train` uses by default.

Why generate instead of download: a new user sees training work in minutes, offline, with no licence questions.
Why make it realistic: the same pipeline must cope with what real scans throw at it, so every case has a different
orientation (RAS, LPS, LIA, ...), anisotropic spacing, a random origin, a bias field, texture, noise and partial-volume
edges. The anatomy is built in one canonical RAS millimetre frame and then sampled on each case's voxel grid, so after
reorientation and resampling all cases look alike, just as real patients do.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from segment.config import segment_home
from segment.errors import InputError

GENERATOR = "segment.data.demo"
GENERATOR_VERSION = 1  # bump when the content changes, so old copies are regenerated instead of reused
LABELS = {"0": "background", "1": "organ", "2": "lesion"}

_GRID_STEP = 1.5  # mm: canonical grid on which the smooth random fields live
_GRID_HALF = 48.0  # mm: that grid spans anatomy centre +- this, enough for every field of view below
_FOV = 64.0  # mm: nominal field of view per axis
_MIN_VOX, _MAX_VOX = 32, 64
# tissue: (mean intensity, texture amplitude) before bias, noise and the per-scan gain
_TISSUE = {"background": (300.0, 45.0), "vessel": (430.0, 20.0), "organ": (560.0, 30.0), "lesion": (730.0, 35.0)}
_NOISE_STD = 20.0
_PARTIAL_VOLUME_SIGMA = 0.6  # voxels: edges blur over about one voxel, more in mm along thick slices


@dataclass(frozen=True)
class DemoCase:
    """One generated scan: image voxels, label voxels (0/1/2) and the shared voxel-to-world affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def _orientations(seed: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """All 48 axis permutations x flips, shuffled by seed; case i takes entry i, so neighbours always differ."""
    combos = [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product((1, -1), repeat=3)]
    order = np.random.default_rng([seed, 48]).permutation(len(combos))
    return [combos[i] for i in order]


def _case_geometry(
    rng: np.random.Generator, orient: tuple[tuple[int, ...], tuple[int, ...]], anchor: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine: voxel axis j runs along world axis perm[j]; axis 2 is the thick slice axis."""
    perm, flips = orient
    inplane = rng.uniform(0.9, 1.4)
    spacing = np.array([inplane, inplane, rng.uniform(max(1.0, 1.3 * inplane), 2.5)])
    shape = tuple(int(np.clip(round(_FOV / s), _MIN_VOX, _MAX_VOX)) for s in spacing)
    matrix = np.zeros((3, 3))
    for j in range(3):
        matrix[perm[j], j] = flips[j] * spacing[j]
    centre = anchor + rng.uniform(-4.0, 4.0, 3)  # the scan is never perfectly centred on the organ
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = centre - matrix @ ((np.array(shape) - 1) / 2.0)
    return shape, affine  # type: ignore[return-value]


def _voxel_world(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of every voxel centre, shape (3, *shape)."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


def _smooth_field(rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Gaussian-filtered white noise on the canonical grid, rescaled to zero mean and unit std."""
    n = int(round(2 * _GRID_HALF / _GRID_STEP)) + 1
    field = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), sigma_mm / _GRID_STEP, mode="wrap")
    return (field - field.mean()) / field.std()


def _sample(field: np.ndarray, world: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Linearly interpolate a canonical-grid field at world points, so the field is fixed in world space."""
    coords = (world - (anchor - _GRID_HALF).reshape(3, *([1] * (world.ndim - 1)))) / _GRID_STEP
    return ndimage.map_coordinates(field, coords.reshape(3, -1), order=1, mode="nearest").reshape(world.shape[1:])


def _ellipsoid_level(world: np.ndarray, centre: np.ndarray, semi_axes: np.ndarray, rot: Rotation) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a rotated ellipsoid."""
    local = rot.inv().apply((world.reshape(3, -1) - centre[:, None]).T).T
    radius = np.sqrt(((local / semi_axes[:, None]) ** 2).sum(axis=0))
    return ((radius - 1.0) * semi_axes.mean()).reshape(world.shape[1:])


def _random_rotation(rng: np.random.Generator, max_deg: float) -> Rotation:
    axis = rng.standard_normal(3)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(0, max_deg)))


def _organ_and_lesion(rng: np.random.Generator, world: np.ndarray, anchor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Level sets (mm, negative inside) of the organ and of a lesion placed inside it, both with irregular surfaces."""
    centre = anchor + rng.uniform(-3.0, 3.0, 3)
    semi = np.array([13.0, 10.0, 18.0]) * rng.uniform(0.85, 1.15, 3)  # elongated head-feet, like a kidney or spleen
    rot = _random_rotation(rng, 25.0)
    organ_noise = _smooth_field(rng, 6.0) * semi.mean() * 0.16  # low-frequency bumps of a few mm
    organ = _ellipsoid_level(world, centre, semi, rot) + _sample(organ_noise, world, anchor)
    r = rng.uniform(4.5, 7.0)
    inside = np.argwhere(organ < -0.6 * r)  # lesion centre deep enough that most of it lies in the organ
    if len(inside):
        spot = tuple(inside[rng.integers(len(inside))])
    else:  # organ too thin for the lesion: use its deepest voxel
        spot = np.unravel_index(int(np.argmin(organ)), organ.shape)
    lesion_centre = world[(slice(None), *spot)]
    lesion_semi = r * rng.uniform(0.75, 1.25, 3)
    lesion_noise = _smooth_field(rng, 3.0) * r * 0.15
    lesion = _ellipsoid_level(world, lesion_centre, lesion_semi, _random_rotation(rng, 180.0))
    return organ, lesion + _sample(lesion_noise, world, anchor)


def _vessel(rng: np.random.Generator, world: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Level set of an unlabelled tube beside the organ: a distractor the model must learn to ignore."""
    direction = np.array([0.0, 0.0, 1.0]) + rng.normal(0, 0.25, 3)
    direction /= np.linalg.norm(direction)
    side = np.cross(direction, rng.standard_normal(3))
    point = anchor + side / np.linalg.norm(side) * rng.uniform(22.0, 28.0)
    rel = world.reshape(3, -1) - point[:, None]
    dist = np.linalg.norm(rel - np.outer(direction, direction @ rel), axis=0)
    return (dist - rng.uniform(2.5, 4.0)).reshape(world.shape[1:])


def _bias(rng: np.random.Generator, world: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias field (about +-25 %): a linear plus a radial term in world space."""
    rel = (world - anchor.reshape(3, 1, 1, 1)) / 40.0
    log_bias = np.tensordot(rng.normal(0, 0.12, 3), rel, axes=1) + rng.uniform(-0.12, 0.12) * ((rel**2).sum(0) - 1.0)
    return np.exp(log_bias)


def _paint(rng: np.random.Generator, masks: dict[str, np.ndarray], texture: np.ndarray) -> np.ndarray:
    """Intensities per tissue (painted in order, later wins), then partial-volume blur at the edges."""
    image = np.zeros(texture.shape)
    for tissue, mask in masks.items():
        mean, amp = _TISSUE[tissue]
        image[mask] = (mean * rng.uniform(0.93, 1.07) + amp * texture)[mask]
    return ndimage.gaussian_filter(image, _PARTIAL_VOLUME_SIGMA)


def make_case(seed: int, index: int) -> DemoCase:
    """Generate case `index` of the demo set for `seed`; independent of how many cases are made."""
    rng = np.random.default_rng([seed, index])
    anchor = rng.uniform(-80.0, 80.0, 3)  # anatomy centre in scanner coordinates: gives a random origin
    shape, affine = _case_geometry(rng, _orientations(seed)[index % 48], anchor)
    world = _voxel_world(shape, affine)
    organ, lesion = _organ_and_lesion(rng, world, anchor)
    label = np.zeros(shape, np.uint8)
    label[organ < 0] = 1
    label[lesion < 0] = 2
    masks = {"background": np.ones(shape, bool), "vessel": _vessel(rng, world, anchor) < 0, "organ": label == 1}
    masks["lesion"] = label == 2
    texture = _sample(_smooth_field(rng, 1.5), world, anchor)
    image = _paint(rng, masks, texture) * _bias(rng, world, anchor)
    image = (image + rng.normal(0, _NOISE_STD, shape)) * rng.uniform(0.7, 1.4)  # scanner gain is arbitrary in MR
    image = np.clip(image, 0, None)
    image = np.round(image).astype(np.int16) if index % 3 == 1 else image.astype(np.float32)
    return DemoCase(image=image, label=label, affine=affine)


def _manifest(n_cases: int, seed: int) -> dict[str, Any]:
    names = [f"demo_{i:03d}.nii.gz" for i in range(n_cases)]
    return {
        "name": "SegmentDemo",
        "description": "Synthetic MR-like volumes: an irregular organ (1) with a lesion (2), random orientation/spacing",
        "reference": "generated by segment (segment.data.demo)",
        "licence": "generated by segment, CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": n_cases,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
        "generator": {"name": GENERATOR, "version": GENERATOR_VERSION, "n_cases": n_cases, "seed": seed},
    }


def _read_generator(out_dir: Path) -> dict[str, Any] | None:
    """The `generator` record of a previous demo dataset in out_dir, or None if it is not one."""
    try:
        meta = json.loads((out_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    gen = meta.get("generator") if isinstance(meta, dict) else None
    return gen if isinstance(gen, dict) and gen.get("name") == GENERATOR else None


def _is_complete(out_dir: Path, n_cases: int, seed: int) -> bool:
    want = _manifest(n_cases, seed)["generator"]
    if _read_generator(out_dir) != want:
        return False
    return all((out_dir / p).is_file() for e in _manifest(n_cases, seed)["training"] for p in e.values())


def _prepare(out_dir: Path, overwrite: bool) -> None:
    """Refuse a foreign non-empty folder; otherwise clear what a previous demo (or an overwrite) left behind."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; the demo dataset needs a folder there")
    if out_dir.is_dir() and any(out_dir.iterdir()) and _read_generator(out_dir) is None and not overwrite:
        raise InputError(
            f"{out_dir} is not empty and does not hold a segment demo dataset; "
            "choose an empty folder or pass overwrite=True to replace its dataset.json, imagesTr/ and labelsTr/"
        )
    (out_dir / "dataset.json").unlink(missing_ok=True)  # first, so an interrupted run is never taken as complete
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True)


def _steps(n_cases: int, progress: bool) -> Iterable[int]:
    if not progress:
        return range(n_cases)
    from rich.console import Console
    from rich.progress import track

    return track(range(n_cases), description="Generating demo dataset", console=Console(stderr=True))


def make_demo_dataset(
    out_dir: str | Path, *, n_cases: int = 24, seed: int = 0, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write the synthetic demo dataset in MSD layout into out_dir and return it; reuse it if already complete."""
    if n_cases < 1:
        raise InputError(f"n_cases must be at least 1, got {n_cases}")
    out_dir = Path(out_dir)
    if _is_complete(out_dir, n_cases, seed):
        return out_dir
    _prepare(out_dir, overwrite)
    manifest = _manifest(n_cases, seed)
    for i in _steps(n_cases, progress):
        case = make_case(seed, i)
        entry = manifest["training"][i]
        for key, data in (("image", case.image), ("label", case.label)):
            img = nib.Nifti1Image(data, case.affine)
            img.set_qform(case.affine, code=1)
            img.set_sform(case.affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, out_dir / entry[key])
    (out_dir / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def default_demo_dir() -> Path:
    """Where `segment train` keeps the demo dataset: `demo/` in the user's segment home ($SEGMENT_HOME, else the user
    cache folder, e.g. ~/.cache/segment/demo), never inside the installed package or the current folder."""
    return segment_home() / "demo"


def __getattr__(name: str) -> Path:
    """DEFAULT_DEMO_DIR, looked up when used, so a SEGMENT_HOME set after import still counts."""
    if name == "DEFAULT_DEMO_DIR":
        return default_demo_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ensure_demo_dataset(progress: bool = True) -> Path:
    """The default demo dataset in default_demo_dir(), generated on first use (a few seconds) and reused after."""
    return make_demo_dataset(default_demo_dir(), progress=progress)
