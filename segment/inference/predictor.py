"""Load a checkpoint once, segment many scans: the Python API behind `segment predict` and `segment.predict`.

A scan is preprocessed exactly as in training (`segment.data.preprocess`), predicted window by window, and its
probabilities are mapped back onto the scan's own grid, so a written label map has the scan's shape and affine.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from segment.config import Config
from segment.data.labels import class_values, decode_labels
from segment.data.plan import Plan
from segment.data.preprocess import prepare_image, to_source_grid
from segment.data.profile import ood_reasons
from segment.device import available_memory_bytes, inference_dtype, resolve_device
from segment.engine.stream import predict_canonical_labels
from segment.errors import GeometryError, InputError
from segment.inference.confidence import DEFAULT_THRESHOLD, ConfidenceStats
from segment.inference.loading import load_models
from segment.inference.postprocess import keep_largest_components, label_volumes
from segment.io.case import read_case
from segment.io.geometry import Geometry, canonical_grid, fmt_values, require_volume, resampled_shape
from segment.io.nifti import (
    check_target,
    nifti_geometry,
    to_nifti_image,
    write_image,
    write_label,
)
from segment.run_folder import resolve_checkpoint


class Predictor:
    """A network with its plan and config, ready to segment scans of any size, orientation and spacing."""

    def __init__(self, model: nn.Module, plan: Plan, config: Config, *, device: str = "auto", overlap: float | None = None,
                 tta: bool | None = None, largest_component: bool | None = None, precision: str | None = None,
                 members: list[nn.Module] | None = None, profile: dict[str, Any] | None = None,
                 threshold: float | None = None) -> None:
        """Settings left as None come from the model's own config (`predict.*`, as trained or set with --set).

        `members`: the networks of an ensemble (their probabilities are averaged; `model` is the first). `profile` (the
        run's scan_profile.json) enables the out-of-distribution check; `threshold` is the confidence below which a
        case is flagged (DEFAULT_THRESHOLD when None).
        """
        self.device = resolve_device(device)
        self.members = [m.to(self.device).eval() for m in (members or [model])]
        self.model = self.members[0]
        self.profile = profile
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        self.plan, self.config = plan, config
        wanted = config.predict
        self.overlap = wanted.overlap if overlap is None else float(overlap)
        if not 0 <= self.overlap < 1:
            raise InputError(f"--overlap {self.overlap}: expected a value in [0, 1)")
        self.tta = wanted.tta if tta is None else bool(tta)
        self.largest_component = wanted.largest_component if largest_component is None else bool(largest_component)
        precision = wanted.precision if precision is None else str(precision)
        window = [min(int(p), 32) for p in plan.patch_size]
        if hasattr(self.model, "input_size_for"):
            window = list(self.model.input_size_for(window))
        self.dtype = inference_dtype(precision, self.device, self.model, window, plan.channels)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", *, overlap: float | None = None,
                        tta: bool | None = None, largest_component: bool | None = None,
                        precision: str | None = None) -> Predictor:
        """Rebuild the network, plan and config stored in a checkpoint (or a run folder's best one), or every fold of a
        k-fold ensemble run; the run's scan profile and confidence threshold come along where it has them."""
        from segment.inference.export import is_package, package_checks

        resolved = resolve_checkpoint(path)
        models, plan, config, run = load_models(resolved)
        profile = run.read_optional_json(run.PROFILE) if run else None
        threshold = (run.read_optional_json(run.CONFIDENCE) or {}).get("threshold") if run else None
        if run is None and is_package(resolved):
            profile, threshold = package_checks(resolved)
        return cls(models[0], plan, config, device=device, overlap=overlap, tta=tta, largest_component=largest_component,
                   precision=precision, members=models, profile=profile, threshold=threshold)

    @property
    def label_names(self) -> dict[int, str]:
        """Label value as written to disk (the dataset's own: 0, 1, 3 when dataset.json skips 2) -> class name."""
        values = class_values(self.plan, int(self.config.model.out_channels))
        return {v: self.plan.labels.get(i, f"class_{v}") for i, v in enumerate(values)}

    # ---- core -----------------------------------------------------------------------------------------------
    def _check_input(self, channels: list[np.ndarray], geometry: Geometry) -> None:
        if len(channels) != self.plan.channels:
            raise InputError(f"{geometry.source}: {len(channels)} channel image(s) given, the model expects "
                             f"{self.plan.channels} (nnU-Net naming: case_0000.nii.gz, case_0001.nii.gz, ...)")
        dims = int(self.config.model.spatial_dims)
        if dims != 3:
            raise InputError(f"{geometry.source}: predicting with a {dims}D model is not supported; train a 3D model")
        for c in channels:
            if c.shape != geometry.shape:
                raise GeometryError(f"{geometry.source}: channel of shape {c.shape} does not match the grid {geometry.shape}")
        require_volume(geometry)

    def _network_grid(self, geometry: Geometry) -> tuple[Geometry, tuple[int, ...]]:
        """The scan's canonical grid and the shape it takes once resampled to the model's spacing."""
        canonical = canonical_grid(geometry)
        return canonical, resampled_shape(canonical.shape, canonical.spacing, self.plan.spacing)

    def memory_needed(self, geometry: Geometry, probability_bytes: int = 0) -> int:
        """Bytes a prediction of this scan will add, beyond the channels already read (an upper estimate).

        A canonical copy of the channels and the network-grid input (float32), the label map at both resolutions, one
        slab of class scores (several with TTA, see `segment.engine.stream.SLAB_BYTES`), and the probabilities
        on the scan's grid when they are asked for.
        """
        from segment.engine.stream import SLAB_BYTES

        voxels = float(np.prod(geometry.shape))
        net = float(np.prod(self._network_grid(geometry)[1]))
        k, c = int(self.config.model.out_channels), int(self.plan.channels)
        copies = (2 if self.tta else 1) + (1 if len(self.members) > 1 else 0)
        slab = min(4.0 * k * net * copies, 3.0 * SLAB_BYTES * copies)
        if self.config.model.padding == "valid":  # not slabbed: logits, their blend weights and probabilities, whole
            slab = 3 * 4.0 * k * net * copies
        return int(4 * c * (voxels + net) + 3 * (voxels + net) + slab + 2 * probability_bytes * k * voxels)

    def _check_memory(self, geometry: Geometry, probability_bytes: int) -> None:
        """A scan too big for this machine is one line naming it and the estimate, not an out-of-memory kill."""
        if self.device.type != "cpu":
            return  # on a GPU the slabs live on the device; host memory holds only the label map and the input
        need, have = self.memory_needed(geometry, probability_bytes), available_memory_bytes()
        if have is not None and need > have:
            canonical, net = self._network_grid(geometry)
            grid = ""
            if np.prod(net, dtype=float) > 8 * np.prod(geometry.shape, dtype=float):
                # a small scan blown up by resampling: most likely its header's spacing (or units) is wrong
                grid = (f", resampled from its spacing {fmt_values(canonical.spacing)} mm to the model's "
                        f"{fmt_values(self.plan.spacing)} mm: {'x'.join(map(str, net))} voxels; check the header's spacing")
            raise InputError(f"{geometry.source}: predicting this scan ({'x'.join(map(str, geometry.shape))} voxels, "
                             f"{self.config.model.out_channels} classes{grid}) needs about {need / 2**30:.1f} GB of "
                             f"memory, {have / 2**30:.1f} GB is available; free memory, leave out "
                             "--save-probabilities/--tta, or use a machine with more memory")

    def _canonical_probabilities(self, channels: list[np.ndarray], geometry: Geometry, probabilities: type | None = None,
                                 stats: ConfidenceStats | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(labels, probabilities of dtype `probabilities` or None) on the canonical source grid, as numpy arrays.

        Streamed slab by slab (`segment.engine.stream.predict_canonical_labels`): never K x voxels floats at
        either resolution, so memory is bounded by the label map (plus the probabilities only when asked for them).
        An ensemble's members are averaged slab by slab; `stats` collects the confidence score.
        """
        self._check_input(channels, geometry)
        self._check_memory(geometry, np.dtype(probabilities).itemsize if probabilities is not None else 0)
        x = prepare_image(channels, geometry, self.plan)[None].to(self.device)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with torch.inference_mode(), autocast:
            return predict_canonical_labels(
                self.members, x, self.plan, canonical_grid(geometry).shape, overlap=self.overlap,
                sw_batch_size=self.config.predict.sw_batch_size, blend=self.config.predict.blend, tta=self.tta,
                mirror_axes=self.plan.tta_axes(), want_probabilities=probabilities is not None,
                probability_dtype=probabilities or np.uint8, on_probabilities=stats.add if stats is not None else None,
            )

    def predict_probabilities(self, channels: list[np.ndarray], geometry: Geometry,
                              stats: ConfidenceStats | None = None) -> np.ndarray:
        """Class probabilities (K, *geometry.shape) in float32 on the scan's own grid (K x voxels: for evaluation)."""
        _, probs = self._canonical_probabilities([np.asarray(c) for c in channels], geometry, np.float32, stats)
        assert probs is not None
        return to_source_grid(probs, geometry)

    def predict_labels(self, channels: list[np.ndarray], geometry: Geometry, keep_probabilities: bool = False,
                       stats: ConfidenceStats | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map on the scan's own grid (uint8; int16 from 256 classes) and, if asked, its probabilities.

        The probabilities (K, *geometry.shape) are uint8 scaled to 0..255: p = value / 255 (a quarter of the float32
        size; the label map itself is computed from the unrounded values).
        """
        labels, probs = self._canonical_probabilities([np.asarray(c) for c in channels], geometry,
                                                      np.uint8 if keep_probabilities else None, stats)
        labels = to_source_grid(labels, geometry)
        if self.largest_component:
            labels = keep_largest_components(labels)
        if labels.shape != geometry.shape:
            raise GeometryError(f"{geometry.source}: prediction has shape {labels.shape}, the scan {geometry.shape}")
        return labels, (to_source_grid(probs, geometry) if probs is not None else None)

    # ---- files --------------------------------------------------------------------------------------------
    def predict_file(self, images: list[Path] | Path, out: Path | None, *, overwrite: bool = False,
                     probabilities: Path | None = None, series: str | None = None,
                     dicom_seg: Path | None = None) -> dict[str, Any]:
        """Segment one case (one file per channel, or one 4D file) into `out`; returns timing and label volumes.

        Outputs are checked before any compute (never an input, never a file segment did not write), then written
        through a temporary file that is read back and checked before it replaces anything. `dicom_seg` also writes a
        DICOM Segmentation (.dcm) referencing the source series (a DICOM folder only); `out=None` skips the NIfTI.
        """
        paths = tuple(Path(p) for p in (images if isinstance(images, (list, tuple)) else [images]))
        if out is None and dicom_seg is None:
            raise InputError(f"{paths[0]}: no output asked for (neither a NIfTI label map nor a DICOM-SEG)")
        for target in ([out] if out is not None else []) + ([probabilities] if probabilities else []):
            check_target(Path(target), overwrite, paths)
        seg_headers = None
        if dicom_seg is not None:
            from segment.io.dicom_seg import check_seg_target, seg_source

            if len(paths) != 1 or not paths[0].is_dir():
                raise InputError(f"{paths[0]}: DICOM-SEG needs a DICOM source series (a DICOM folder), not a "
                                 f"{'file' if paths[0].is_file() else 'set of files'}; use --format nifti for it")
            check_seg_target(Path(dicom_seg), overwrite, paths)
            seg_headers = seg_source(paths[0], series)  # what a SEG needs in the headers: refused before compute
        t0 = time.perf_counter()
        case = read_case(paths, expected_channels=self.plan.channels, series=series)
        stats = ConfidenceStats()
        labels, probs = self.predict_labels(case.channels, case.geometry, keep_probabilities=probabilities is not None,
                                            stats=stats)
        # class indices -> the dataset's own label values (3, not 2, when dataset.json declares 0, 1, 3)
        written = (write_label(decode_labels(labels, self.plan), case.geometry, out, overwrite=overwrite, inputs=paths)
                   if out is not None else None)
        if probabilities is not None and probs is not None:
            write_image(np.moveaxis(probs, 0, -1), case.geometry, probabilities, overwrite=overwrite, inputs=paths)
        names = dict(enumerate(self.label_names.values()))  # class index -> name; index = DICOM-SEG segment number
        warnings: list[str] = []
        seg_written = None
        if dicom_seg is not None:
            from segment.io.dicom_seg import write_dicom_seg

            seg_written = write_dicom_seg(labels, case.geometry, dicom_seg, source=paths[0], series=series,
                                          names={i: n for i, n in names.items() if i > 0}, overwrite=overwrite,
                                          inputs=paths, headers=seg_headers)
            if not labels.any():
                warnings.append(f"{paths[0]}: no class found; the DICOM-SEG {seg_written.name} has only empty segments")
        seconds = time.perf_counter() - t0
        result = {
            "case": paths[0].name, "output": str(written if written is not None else seg_written), "seconds": seconds,
            "voxels_per_s": float(np.prod(case.geometry.shape)) / max(seconds, 1e-9),
            "volumes_ml": label_volumes(labels, case.geometry, names),
            "confidence": stats.score(), "threshold": self.threshold,
            "ood": ood_reasons(self.profile, case.channels, case.geometry), "members": len(self.members),
        }
        if seg_written is not None:
            result["dicom_seg"] = str(seg_written)
        if warnings:
            result["warnings"] = warnings
        return result

    def predict_nifti(self, img: nib.Nifti1Image | str | Path) -> nib.Nifti1Image:
        """A label image with exactly the input's shape and header (qform, sform, codes, units kept)."""
        if isinstance(img, (str, Path)):
            case = read_case([img], expected_channels=self.plan.channels)
            channels, geometry = case.channels, case.geometry
        else:  # a 4D image holds one channel per volume along its last axis
            array = np.asarray(img.dataobj, dtype=np.float32)
            while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1[, 1]) is one 3D volume, as when read from disk
                array = array[..., 0]
            if array.ndim not in (3, 4):
                raise InputError(f"<in-memory image>: {array.ndim}D image of shape {tuple(img.shape)}, expected a 3D "
                                 "volume (or 4D with one volume per channel)")
            channels = [array[..., i] for i in range(array.shape[3])] if array.ndim == 4 else [array]
            geometry = nifti_geometry(img, channels[0].shape, "<in-memory image>")
        labels = decode_labels(self.predict_labels(channels, geometry)[0], self.plan)
        return to_nifti_image(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16), geometry)


_CACHE: dict[tuple[str, str, bool], Predictor] = {}


def predict(path_or_nifti: nib.Nifti1Image | str | Path, model: str | Path | None = None, *, device: str = "auto",
            tta: bool | None = None) -> nib.Nifti1Image:
    """Segment a scan (path or in-memory NIfTI) with a trained model; the network is loaded once per process."""
    ckpt = resolve_checkpoint(model)
    key = (str(ckpt.resolve()), device, tta)
    if key not in _CACHE:
        _CACHE.clear()  # one model in memory at a time
        _CACHE[key] = Predictor.from_checkpoint(ckpt, device, tta=tta)
    return _CACHE[key].predict_nifti(path_or_nifti)
