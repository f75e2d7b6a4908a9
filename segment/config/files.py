"""Where configs come from: the shipped YAML files, `--config FILE`, `--set key=value` overrides and typed CLI values,
all through the schema's validation; and `segment_home()`, where segment keeps what it writes for itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from segment.config.schema import Config, _describe
from segment.errors import ConfigError


def packaged_config_dir() -> Path:
    """segment/configs/: the shipped configs (default, demo, gpu) as package data, the one copy of them; read in place."""
    from importlib.resources import files

    return Path(str(files("segment") / "configs"))


# The shipped configs (a source checkout, an editable or a wheel install alike), or SEGMENT_CONFIG_DIR if set.
CONFIG_DIR = Path(os.environ.get("SEGMENT_CONFIG_DIR") or packaged_config_dir())


def segment_home() -> Path:
    """Where segment keeps what it writes for itself (the demo dataset): $SEGMENT_HOME, else the user cache folder
    (platformdirs' user_cache_dir("segment") if installed, else $XDG_CACHE_HOME/segment or ~/.cache/segment).
    Never the installed package or the current folder, so a read-only install and any working directory are fine."""
    env = os.environ.get("SEGMENT_HOME")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "segment"
    return Path(user_cache_dir("segment", appauthor=False))


def _parse_value(text: str) -> Any:
    """A CLI override value, parsed as YAML so `5`, `1e-3`, `[0,1]`, `none` and `null` mean what they look like."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--set key.sub=value` strings -> {"key.sub": value}, each value parsed as YAML (the only place that happens)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_epochs=5")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def set_values(raw: dict[str, Any], values: dict[str, Any], source: str = "--set") -> dict[str, Any]:
    """Set dotted keys (`train.max_epochs`) of a raw config dict to values as they are (validation happens afterwards)."""
    for key, value in values.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML) to a raw config dict (validation happens afterwards)."""
    return set_values(raw, parse_overrides(overrides))


def _names(key: str, given: Any) -> bool:
    """Whether a validation error at `key` is about one of the `given` dotted keys (or the section holding one)."""
    return any(key == g or key.startswith(g + ".") or g.startswith(key + ".") for g in given)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Load `path` (default `configs/default.yaml` if present, else built-in defaults) and apply overrides.

    `overrides` are `--set key=value` strings (values parsed as YAML); `values` are typed values of command-line flags
    ({"data.root": "2024"} stays the folder name "2024"), applied after them. All go through the same validation.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is None and (CONFIG_DIR / "default.yaml").is_file():
        path = CONFIG_DIR / "default.yaml"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        source = str(path)
    raw = apply_overrides(raw, overrides or [])
    raw = set_values(raw, values or {}, "command line:")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        key = ".".join(str(p) for p in err.errors()[0]["loc"])
        given = {o.split("=", 1)[0].strip() for o in overrides or []}
        where = "command line" if _names(key, values or {}) else "--set" if _names(key, given) else source
        raise ConfigError(_describe(err, where)) from None


def dump_config(cfg: Config) -> str:
    """YAML text of a config (JSON-compatible types only), for run folders and checkpoints."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Fields whose default changed after runs had been written without them: the value those runs were trained with.
# A config that segment stored (run folder, checkpoint, model package) gets these before validation, so an older model
# rebuilds the network its weights belong to; a user's own config file gets today's defaults.
TRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"encoder_block": "residual"},  # plain became the default on 2026-12-02 (BENCHMARKS.md, issue 16)
}


def stored_config(raw: Any) -> Any:
    """A config dict segment wrote earlier, with the values of TRAINED_DEFAULTS filled in where it has none."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for section, values in TRAINED_DEFAULTS.items():
        if isinstance(out.get(section), dict):
            out[section] = {**values, **out[section]}
    return out
