"""The package's layers point one way and nothing imports in a circle (tools/import_graph.py; docs/architecture.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def _tool():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_a_layer_above_its_own() -> None:
    tool = _tool()
    assert tool.violations(tool.graph()) == []


def test_no_import_cycles() -> None:
    tool = _tool()
    assert tool.cycles(tool.graph()) == []


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path: Path) -> None:
    """The rule must be able to fail: an import inside a function counts, and a two-module loop is found."""
    tool = _tool()
    edges = {"segment.io.image": {"segment.train.runner"}, "segment.train.runner": {"segment.io.image"}}
    assert tool.violations(edges) == ["segment.io.image imports segment.train.runner: layer 'train' is above 'io'"]
    assert tool.cycles(edges) == [["segment.io.image", "segment.train.runner"]]
    lazy = tmp_path / "mod.py"
    lazy.write_text("def f():\n    from segment.train import runner\n")
    tool.ROOT = tmp_path  # module_name() is relative to ROOT's parent
    assert "segment.train" in tool.imports(lazy)
