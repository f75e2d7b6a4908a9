"""One typed configuration for everything: pydantic v2 models loaded from YAML, overridden from the CLI.

Every hyperparameter is a field of the schema (`segment/config/schema.py`); unknown keys are rejected, and CLI overrides
(`--set a.b=value`) go through the same validation (`segment/config/files.py`), so a typo never silently does nothing.
Import from `segment.config`.
"""

from segment.config.files import (
    CONFIG_DIR,
    apply_overrides,
    dump_config,
    load_config,
    packaged_config_dir,
    parse_overrides,
    segment_home,
    set_values,
    stored_config,
)
from segment.config.schema import (
    DURATIONS,
    AugmentConfig,
    Config,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PredictConfig,
    SkipSpec,
    TrainConfig,
    parse_duration,
    validate,
)

__all__ = [
    "CONFIG_DIR", "DURATIONS", "AugmentConfig", "Config", "DataConfig", "EvaluateConfig", "ModelConfig", "PredictConfig",
    "SkipSpec", "TrainConfig", "apply_overrides", "dump_config", "load_config", "packaged_config_dir", "parse_duration",
    "parse_overrides", "segment_home", "set_values", "stored_config", "validate",
]
