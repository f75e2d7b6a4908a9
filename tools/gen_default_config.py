"""Write segment/configs/default.yaml from the schema, one comment per field, so the documentation never drifts from the code.

usage: python tools/gen_default_config.py   (tests/test_config.py checks the file is current)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from segment.config import CONFIG_DIR, Config  # noqa: E402


def _lines(model: BaseModel, indent: int = 0) -> list[str]:
    out: list[str] = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            out.append(f"{pad}{name}:  # {doc}")
            out.extend(_lines(value, indent + 1))
        else:
            plain = str(value) if isinstance(value, Path) else value
            # YAML 1.1 reads `1e-05` as a string, so floats go through the YAML dumper; the rest as JSON (valid YAML)
            shown = yaml.safe_dump(plain).split("\n")[0] if isinstance(plain, float) else json.dumps(plain)
            out.append(f"{pad}{name}: {shown}  # {field.description}")
    return out


def render() -> str:
    head = [
        "# segment: default configuration. Every field, with its default and meaning.",
        "# Generated from segment/config/schema.py by tools/gen_default_config.py; edit the schema, then regenerate.",
        "# Override any field on the command line: segment train --set train.max_epochs=5 --set model.skip_connections=none",
        "",
    ]
    return "\n".join(head + _lines(Config())) + "\n"


if __name__ == "__main__":
    (CONFIG_DIR / "default.yaml").write_text(render())
    print(f"wrote {CONFIG_DIR / 'default.yaml'}")
