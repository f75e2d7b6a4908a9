"""The schema: every hyperparameter as a field of a pydantic v2 model, unknown keys rejected, durations parsed.

`validate` turns a plain dict into a `Config` or one ConfigError line naming the offending key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segment.errors import ConfigError


DURATIONS = "30m, 2h, 90s, 1d, 45 (minutes), HH:MM:SS or DD:HH:MM:SS"


def parse_duration(text: str | int | float | None) -> float | None:
    """A time budget in seconds: '30m', '2h', '90s', '1d', a bare number (minutes), 'HH:MM:SS' or 'DD:HH:MM:SS'."""
    if text is None:
        return None
    text = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 60}[m.group(2)]
    elif re.fullmatch(r"\d+(:\d\d){2,3}", text):
        *head, mi, s = (int(p) for p in text.split(":"))
        d, h = head if len(head) == 2 else (0, head[0])
        if mi >= 60 or s >= 60 or (len(head) == 2 and h >= 24):
            raise ConfigError(f"train.max_time: {text!r}: minutes and seconds must be < 60 (hours < 24 after days)")
        seconds = float(((d * 24 + h) * 60 + mi) * 60 + s)
    else:
        raise ConfigError(f"train.max_time: {text!r} is not a duration (use e.g. {DURATIONS})")
    if seconds <= 0:
        raise ConfigError(f"train.max_time: {text!r} is not a positive duration")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Random augmentation applied to training patches only."""

    flip_prob: float = Field(0.5, ge=0, le=1, description="probability of a flip, per mirrored axis")
    mirror_axes: list[int] | None = Field(
        None, description="axes to mirror in training and --tta (canonical: 0 left-right, 1 back-front, 2 down-up); "
        "null = all. Leave out an axis along which labels are counterparts, e.g. [1, 2] for left/right kidneys",
    )
    rotate_prob: float = Field(0.2, ge=0, le=1, description="probability of a small rotation/scaling")
    rotate_deg: float = Field(15.0, ge=0, le=180, description="max rotation angle about each axis (degrees)")
    scale_range: float = Field(0.15, ge=0, lt=1, description="max relative zoom in or out")
    intensity_prob: float = Field(0.15, ge=0, le=1, description="probability of intensity scale/shift/gamma")
    noise_prob: float = Field(0.1, ge=0, le=1, description="probability of additive Gaussian noise")
    noise_std: float = Field(0.1, ge=0, description="std of that noise (after normalisation)")
    blur_prob: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur (sigma 0.5-1 voxel), as nnU-Net")
    lowres_prob: float = Field(
        0.0, ge=0, le=1, description="probability of simulated low resolution (down to 0.5-1x, back up), as nnU-Net",
    )

    @field_validator("mirror_axes")
    @classmethod
    def _axes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (any(a not in (0, 1, 2) for a in v) or len(set(v)) != len(v)):
            raise ValueError("must list distinct axes out of 0, 1, 2")
        return None if v is None else sorted(v)


class DataConfig(_Strict):
    """Where the data is and how it becomes network input."""

    root: Path | None = Field(None, description="dataset folder (MSD layout or plain pairs); null = embedded demo")
    modality: Literal["auto", "mri", "ct", "other"] = Field(
        "auto", description="normalisation scheme (ct: clip + dataset z-score; mri/other: per-image z-score); auto reads "
        "dataset.json, or without one detects CT by its Hounsfield range (segment.data.modality.detect_ct)",
    )
    anisotropic: bool = Field(
        True, description="when one axis is > 2x coarser: nnU-Net's target spacing and per-axis strides and kernels "
        "(no pooling, kernel 1 along that axis until the others catch up); false = every axis pooled at every level",
    )
    target_spacing: list[float] | None = Field(None, description="resample to this spacing (mm, canonical RAS axes); null = median")
    patch_size: list[int] | None = Field(None, description="training patch (voxels); null = planned from the data")
    batch_size: int | None = Field(None, ge=1, description="patches per step; null = planned")
    foreground_fraction: float = Field(0.33, ge=0, le=1, description="share of patches centred on foreground")
    ct_clip: list[float] | None = Field(None, description="CT intensity window [lo, hi]; null = dataset 0.5/99.5 percentiles")
    cache: Literal["auto", "ram", "disk", "none"] = Field(
        "auto", description="where preprocessed volumes are kept: ram (in memory), disk (memory-mapped files in "
        "cache_dir, reused by later runs and resumes; patches are read from them), none (preprocess at every draw); "
        "auto = ram when the estimate is under 25% of the free memory, else disk. true/false (older configs) = ram/none",
    )
    cache_dir: Path | None = Field(None, description="folder of the disk cache; null = cache/ in the segment home "
                                   "($SEGMENT_HOME, else the user cache folder)")
    num_workers: int = Field(0, ge=0, description="data loader worker processes (0 = main process)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of cases held out for validation (when fold is null)")
    folds: int = Field(5, ge=2, description="number of folds for k-fold splits")
    fold: int | None = Field(None, ge=0, description="use this fold of a k-fold split; null = one seeded split")
    train_on_all: bool = Field(
        False, description="train on the validation cases too (a final model from every case): validation then only "
        "monitors progress, its Dice is optimistic and the confidence threshold is not calibrated",
    )
    max_cases: int | None = Field(None, ge=2, description="use only the first N cases (quick experiments)")
    skip_bad: bool = Field(False, description="train on the cases that pass the pre-training check and list the others in skipped.json; false = stop with the list of problems")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _fold_in_range(self) -> "DataConfig":
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} does not exist with folds={self.folds}: fold must be in 0..{self.folds - 1}")
        return self

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_bool(cls, v: Any) -> Any:
        """Configs written before the disk cache had `cache: true/false`."""
        return {True: "ram", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) not in (2, 3) or any(s <= 0 for s in v)):
            raise ValueError("must be 2 or 3 positive numbers (mm)")
        return v

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) not in (2, 3) or any(s < 4 for s in v)):
            raise ValueError("must be 2 or 3 sizes of at least 4 voxels")
        return v

    @field_validator("ct_clip")
    @classmethod
    def _ordered_window(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or v[0] >= v[1]):
            raise ValueError("must be [low, high] with low < high")
        return v


SkipSpec = Union[Literal["all", "none"], list[int]]


class ModelConfig(_Strict):
    """The U-Net. Everything `build_model` needs; stored in every checkpoint."""

    spatial_dims: Literal[2, 3] = Field(3, description="2D or 3D convolutions")
    in_channels: int = Field(1, ge=1, description="image channels (modalities)")
    out_channels: int = Field(2, ge=2, description="classes including background (set from the dataset)")
    features: list[int] = Field(
        [8, 32, 64, 128], min_length=2,
        description="channels per encoder stage; depth = len; the planner sets the depth, cutting this list or doubling "
        "its last width. A cheap full-resolution stage (8) measured better than 16 at equal time (BENCHMARKS.md)",
    )
    blocks_per_stage: Union[int, list[int]] = Field(1, description="two-conv blocks per encoder stage")
    decoder_blocks: int = Field(1, ge=1, description="conv blocks per decoder stage")
    padding: Literal["same", "valid"] = Field("same", description="'valid' = original U-Net, output smaller than input")
    skip_connections: SkipSpec = Field("all", description="'all', 'none', or list of levels to keep (0 = highest resolution)")
    norm: Literal["instance", "batch"] = Field("instance", description="normalisation layer")
    act: Literal["leakyrelu", "relu"] = Field("leakyrelu", description="activation")
    encoder_block: Literal["residual", "plain"] = Field(
        "plain", description="encoder block: plain (conv-norm-act twice) or residual (the same two convs + identity or "
        "1x1 shortcut). Plain measured better at equal time on hippocampus, two seeds (BENCHMARKS.md)",
    )
    preactivation: bool = Field(False, description="pre-activation residual blocks (norm-act-conv)")
    zero_init_residual: bool = Field(True, description="zero the last norm scale in each residual branch")
    shortcut: Literal["conv", "avgpool"] = Field(
        "conv", description="residual projection where the resolution changes: strided 1x1 conv, or avgpool + 1x1 conv (ResNet-D)",
    )
    upsample: Literal["transpose", "interpolate"] = Field("transpose", description="decoder upsampling")
    deep_supervision: bool = Field(False, description="use auxiliary heads at lower decoder levels in the loss")
    strides: list[list[int]] | None = Field(
        None, description="stride per axis of each downsampling, depth - 1 entries of 1 or 2; null = 2 on every axis",
    )
    kernels: list[list[int]] | None = Field(
        None, description="conv kernel per axis of each stage, depth entries of 1 or 3; null = 3 on every axis",
    )

    @field_validator("features")
    @classmethod
    def _positive_features(cls, v: list[int]) -> list[int]:
        if any(f < 1 for f in v):
            raise ValueError("every stage needs at least 1 channel")
        return v

    @model_validator(mode="after")
    def _check_lists(self) -> "ModelConfig":
        depth = len(self.features)
        if isinstance(self.blocks_per_stage, list) and len(self.blocks_per_stage) != depth:
            raise ValueError(f"blocks_per_stage has {len(self.blocks_per_stage)} entries for {depth} stages")
        blocks = self.blocks_per_stage if isinstance(self.blocks_per_stage, list) else [self.blocks_per_stage]
        if any(b < 1 for b in blocks):
            raise ValueError("blocks_per_stage must be >= 1")
        if isinstance(self.skip_connections, list):
            bad = [lvl for lvl in self.skip_connections if not 0 <= lvl < depth - 1]
            if bad:
                raise ValueError(f"skip_connections levels {bad} out of range 0..{depth - 2}")
        for name, rows, n, allowed in (("strides", self.strides, depth - 1, (1, 2)), ("kernels", self.kernels, depth, (1, 3))):
            if rows is not None and (len(rows) != n or any(len(r) != self.spatial_dims or any(v not in allowed for v in r)
                                                           for r in rows)):
                raise ValueError(f"{name} must be {n} lists of {self.spatial_dims} values out of {allowed} (depth {depth})")
        return self

    def stride_list(self) -> list[list[int]]:
        """Stride per axis of the downsampling into stages 1..depth-1 (2 on every axis unless `strides` says otherwise)."""
        return [list(r) for r in self.strides] if self.strides else [[2] * self.spatial_dims] * (len(self.features) - 1)

    def kernel_list(self) -> list[list[int]]:
        """Conv kernel per axis of stages 0..depth-1 (3 on every axis unless `kernels` says otherwise)."""
        return [list(r) for r in self.kernels] if self.kernels else [[3] * self.spatial_dims] * len(self.features)

    def kept_skips(self) -> list[int]:
        """Levels (0 = highest resolution) whose long skip connection is kept."""
        n = len(self.features) - 1
        if self.skip_connections == "all":
            return list(range(n))
        if self.skip_connections == "none":
            return []
        return sorted(set(self.skip_connections))


class TrainConfig(_Strict):
    """The optimisation loop (run by Lightning)."""

    max_epochs: int = Field(50, ge=1, description="epochs (an epoch = steps_per_epoch steps)")
    steps_per_epoch: int = Field(100, ge=1, description="training steps per epoch")
    max_time: str | None = Field(None, description="wall-clock budget 'DD:HH:MM:SS' or minutes like '30m'; null = none")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimiser")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="weight decay")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (nesterov)")
    scheduler: Literal["poly", "cosine", "constant"] = Field("poly", description="learning-rate schedule over the run")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    dice_weight: float = Field(1.0, ge=0, description="weight of the Dice term in the loss")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    batch_dice: bool = Field(
        True, description="Dice over the whole batch as one volume (nnU-Net's batch Dice); false = per patch, then averaged",
    )
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="keep an exponential moving average of the weights with this decay (e.g. 0.99; "
        "Lightning's WeightAveraging): validation and the saved checkpoints use the average; null = off",
    )
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = Field("auto", description="auto: 16/bf16 on CUDA, bf16 on capable CPUs")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field("auto", description="Lightning accelerator")
    devices: Union[int, str] = Field("auto", description="number of devices or 'auto'")
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp, ddp_spawn, ...")
    num_nodes: int = Field(1, ge=1, description="machines (multi-node with SLURM/torchrun)")
    val_every: int = Field(1, ge=1, description="validate every N epochs")
    val_overlap: float = Field(0.25, ge=0, lt=1, description="sliding-window overlap during validation")
    val_time_fraction: float = Field(
        0.1, ge=0, le=1, description="most of the wall time whole-volume validation may take: beyond it a fixed seeded "
        "subset of the validation cases (plus rotating others while time is left) is validated, or a validation is "
        "skipped; 0 or 1 = every case at every validation",
    )
    tensorboard: bool = Field(False, description="also log to TensorBoard")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; null = all cores")

    _precision_text = field_validator("precision", mode="before")(lambda v: str(v) if isinstance(v, int) else v)

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        """A bare number (YAML `45`) means minutes, like `--max-time 45`; anything else must parse as a duration."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str):
            try:
                parse_duration(v)
            except ConfigError as err:
                raise ValueError(str(err).removeprefix("train.max_time: ")) from None
        return v


class PredictConfig(_Strict):
    """Inference settings (defaults for `segment predict`)."""

    overlap: float = Field(0.5, ge=0, lt=1, description="sliding-window overlap")
    sw_batch_size: int | None = Field(
        None, ge=1, description="windows per forward pass; null = 2 on CPU (fastest there, see BENCHMARKS.md), 4 on GPU",
    )
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="how overlapping windows are blended")
    tta: bool = Field(False, description="mirror test-time augmentation")
    largest_component: bool = Field(False, description="keep only the largest connected component per class")
    precision: Literal["auto", "32", "bf16", "16"] = Field("auto", description="autocast dtype for inference")

    _precision_text = field_validator("precision", mode="before")(lambda v: str(v) if isinstance(v, int) else v)


class EvaluateConfig(_Strict):
    """Metric settings for `segment evaluate` and `segment ablate`."""

    nsd_tolerance_mm: float = Field(1.0, gt=0, description="tolerance of normalised surface Dice (mm)")
    hd_percentile: float = Field(95.0, gt=0, le=100, description="Hausdorff percentile")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples for confidence intervals")


class Config(_Strict):
    """Root of a `configs/*.yaml` file."""

    seed: int = Field(0, description="seed for splits, sampling and initialisation")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {key}: {msg}"


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict, raising ConfigError with the offending key named."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
