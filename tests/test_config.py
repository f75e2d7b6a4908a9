"""The typed config: every shipped file validates, unknown keys and wrong types are rejected with the key named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from segment.config import CONFIG_DIR, Config, load_config
from segment.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_default_yaml_documents_every_field_and_is_current() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from gen_default_config import render

    text = (CONFIG_DIR / "default.yaml").read_text()
    assert text == render(), "segment/configs/default.yaml is stale: run python tools/gen_default_config.py"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"undocumented field line: {line!r}"
    assert yaml.safe_load(text) == Config().model_dump(mode="json")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_epoch: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.max_epoch: unknown key"):
        load_config(bad)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  features: [16, many]\n")
    with pytest.raises(ConfigError, match=r"model\.features\.1"):
        load_config(bad)


def test_override_goes_through_validation() -> None:
    cfg = load_config(overrides=["train.max_epochs=7", "model.skip_connections=[0, 1]", "data.target_spacing=[1, 1, 2.5]"])
    assert cfg.train.max_epochs == 7
    assert cfg.model.kept_skips() == [0, 1]
    assert cfg.data.target_spacing == [1.0, 1.0, 2.5]
    with pytest.raises(ConfigError, match=r"^--set: train\.max_epochs: .*integer"):
        load_config(overrides=["train.max_epochs=lots"])
    with pytest.raises(ConfigError, match=r"^--set: train\.max_epoch: unknown key"):
        load_config(overrides=["train.max_epoch=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["train.max_epochs"])


@pytest.mark.parametrize("override, key", [
    ("model.skip_connections=[5]", "model"),
    ("model.blocks_per_stage=[1,2]", "model"),
    ("data.ct_clip=[100,-100]", "data.ct_clip"),
    ("train.lr=-1", "train.lr"),
    ("model.padding=full", "model.padding"),
])
def test_bad_values_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_missing_config_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_kept_skips() -> None:
    assert load_config(overrides=["model.skip_connections=all"]).model.kept_skips() == [0, 1, 2]
    assert load_config(overrides=["model.skip_connections=none"]).model.kept_skips() == []
