"""The import graph of `segment`, by layer, and the imports that break the layering.

    python tools/import_graph.py            # edges between modules' layers, then violations (exit 1 if any)
    python tools/import_graph.py --dot      # Graphviz text of the layer graph (docs/architecture.md shows it)

Every import counts, also the ones inside functions (they are still dependencies, only deferred for start-up time).
The layers, bottom to top, are `LAYERS`; a module may import its own layer or lower ones, never a higher one, and
siblings in one layer (train / evaluation) do not import each other.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "segment"

# bottom -> top; names are module paths under segment/ (a package stands for everything in it)
LAYERS: list[list[str]] = [
    ["errors", "version"],
    ["config", "device"],
    ["io"],
    ["data"],
    ["nets"],
    ["run_folder", "figures"],
    ["engine"],
    ["inference"],
    ["train", "evaluation", "doctor"],
    ["experiments"],
    ["cli", "__init__", "__main__"],
]


def unit_of(module: str) -> str:
    """'segment.io.image' -> 'io'; 'segment' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(unit: str) -> int:
    for index, names in enumerate(LAYERS):
        if unit in names:
            return index
    raise SystemExit(f"tools/import_graph.py: segment.{unit} is in no layer; add it to LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every `segment.*` module `path` imports, at module level or inside functions (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("segment"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("segment"):
                found.add(base)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        s_unit = unit_of(source)
        for target in sorted(targets):
            t_unit = unit_of(target)
            if s_unit == t_unit:
                continue
            if layer_of(t_unit) > layer_of(s_unit):
                bad.append(f"{source} imports {target}: layer '{t_unit}' is above '{s_unit}'")
            elif layer_of(t_unit) == layer_of(s_unit):
                bad.append(f"{source} imports {target}: '{s_unit}' and '{t_unit}' are siblings in one layer")
    return bad


def unit_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            if unit_of(source) != unit_of(target):
                out[unit_of(source)].add(unit_of(target))
    return out


def dot(edges: dict[str, set[str]]) -> str:
    lines = ["digraph segment {", "  rankdir=BT; node [shape=box];"]
    for index, names in enumerate(LAYERS):
        lines.append(f"  {{ rank=same; {'; '.join(repr(n).replace(chr(39), chr(34)) for n in names)} }}")
    for source, targets in sorted(unit_edges(edges).items()):
        for target in sorted(targets):
            lines.append(f'  "{source}" -> "{target}";')
    lines.append("}")
    return "\n".join(lines)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly connected components).

    A package's `__init__` that only re-exports its own modules is not counted as part of a cycle with them.
    """
    graph_ = {m: {t for t in ts if t in edges and not (m.startswith(t + ".") or t == m)} for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph_.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph_):
        if node not in index:
            visit(node)
    return found


def main(argv: list[str]) -> int:
    edges = graph()
    if "--dot" in argv:
        print(dot(edges))
        return 0
    for index, names in reversed(list(enumerate(LAYERS))):
        for name in names:
            deps = sorted(unit_edges(edges).get(name, ()), key=layer_of)
            print(f"{index}  {name:12s} -> {', '.join(deps) or '-'}")
    bad = violations(edges)
    print(f"\n{len(bad)} layering violation(s)" + (":" if bad else ""))
    for line in bad:
        print("  " + line)
    loops = cycles(edges)
    print(f"{len(loops)} import cycle(s)" + (":" if loops else ""))
    for group in loops:
        print("  " + " <-> ".join(group))
    return 1 if bad or loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
