"""The layering `docs/design.md` states, checked on the source: imports only go down its table, no
module imports a private name of another, and there is no import cycle (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmstages"

# docs/design.md's "Layers" table, bottom first: a module may import its own layer and those below
LAYERS = [
    ("errors",),
    ("options",),
    ("losses",),
    ("data",),
    ("model",),
    ("evaluation", "metrics"),
    ("stages",),
    ("run_plan", "checkpointing", "preemption", "callbacks", "loggers", "strategies", "trainer_cli", "progress", "noise"),
    ("cli", "tools"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        imports = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmstages"):
                imports.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                imports += [(a.name, []) for a in node.names if a.name.startswith("llmstages")]
        found[_module_name(path)] = imports
    return found


def test_every_module_has_a_layer():
    assert len(_imports()) > 50  # the package was found
    assert [m for m in _imports() if m != "llmstages" and "." in m and _layer(m) is None
            and m != "llmstages.__main__"] == []


def test_imports_only_go_down_the_layers():
    upward = []
    for module, imports in _imports().items():
        mine = _layer(module)
        for target, _ in imports:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{module}: {target}.{name}" for module, imports in _imports().items() for target, names in imports
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_no_import_cycle_between_modules():
    modules = _imports()
    graph = {m: {t if t in modules else t.rsplit(".", 1)[0] for t, _ in imports} & modules.keys() - {m}
             for m, imports in modules.items()}
    graph = {m: {t for t in targets if not (m.startswith(t + ".") or t == "llmstages")} for m, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
