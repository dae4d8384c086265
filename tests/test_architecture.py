"""The shape of the code base: layering without import cycles, files of a readable size, `fit` short enough to read."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import flaxvision

PACKAGE = Path(flaxvision.__file__).parent
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = ("flaxvision", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the flaxvision modules it imports anywhere (top level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # "flaxvision.data.sources.load" -> the module
                    target = target.rpartition(".")[0]
                if target.startswith("flaxvision") and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_flaxvision_modules():
    graph = import_graph()
    assert graph["flaxvision.train.loop"], "the graph must see the loop's imports"
    assert cycles(graph) == []


def test_layering_the_registry_is_a_leaf_and_the_report_does_not_train():
    graph = import_graph()
    registry = graph["flaxvision.models.registry"]
    assert not {m for m in registry if m.startswith(("flaxvision.weights", "flaxvision.train", "flaxvision.data"))}
    assert not {m for m in graph["flaxvision.report"] if m.startswith("flaxvision.train")}
    for module, imports in graph.items():  # the library never reaches up into the command line
        if not module.startswith(("flaxvision.commands", "flaxvision.cli", "flaxvision.__main__")):
            assert not {m for m in imports if m.startswith(("flaxvision.commands", "flaxvision.cli"))}, module


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_fit_reads_in_under_150_lines():
    from flaxvision.train.loop import fit

    assert len(inspect.getsource(fit).splitlines()) < 150
