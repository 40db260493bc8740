"""The package's import graph: no cycles between modules, no import against the layer order.

Every module under src/stablepipe is parsed with `ast` (nothing is imported). An import at module level
is a "top" edge; one inside a function or method is a "late" edge (it runs on first call). Both count:
a late import that goes upward is still a dependency in the wrong direction, it only hides from the
import-time check. `importlib.import_module("a.literal.name")` counts as a late edge too.

Run `python tests/test_import_graph.py` to print every cycle and upward edge with its line.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "stablepipe"
SOURCE = Path(__file__).resolve().parent.parent / "src" / PACKAGE

# Layers, lowest first. A module may import its own layer and the layers below it, never one above.
# A module belongs to the longest prefix (relative to the package) that names it; "" is the root package,
# whose public names (`from stablepipe import StableDiffusionPipeline`) resolve lazily to every layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaf", ("outputs", "random", "image", "cache", "version")),
    # reading files from folders and the Hub, weight files checked before use; nothing of models or pipelines
    ("files", ("loading.files", "loading.checkpoint", "loading.dtypes")),
    ("configuration", ("configuration",)),  # config.json for models and schedulers, read through "files"
    ("kernels", ("kernels",)),  # compiled hot kernels with their PyTorch fallbacks; the models call them
    ("models", ("models",)),
    ("schedulers", ("schedulers",)),
    ("loading", ("loading",)),  # pipelines' components, single files and key maps, LoRA, textual inversion
    ("pipelines", ("pipelines",)),
    # the public names, and what the front ends share: built-in models, infotext, batching, the model flags,
    # writing output files
    ("library", ("", "builtin", "infotext", "batching", "model_flags", "output_files")),
    # the front ends: each may use the library, none the front end above it (nor serve and batch each other)
    ("serve/batch", ("serve", "batch")),
    ("ui", ("ui",)),
    ("cli", ("cli",)),
]

# Pairs inside one layer that must not import each other (importer prefix, imported prefix).
FORBIDDEN_SIDEWAYS: tuple[tuple[str, str], ...] = (
    ("serve", "batch"),
    ("batch", "serve"),
)

# Known upward or cyclic edges whose fix lives in files outside this change, each with the fix proposed.
# The lead deletes an entry once its fix lands; the tests then hold the line. Nothing else belongs here.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    late: bool  # inside a function: runs on first call, not at import

    def __str__(self) -> str:
        path = module_files().get(self.importer)
        where = f"{path.relative_to(SOURCE.parent.parent) if path else self.importer}:{self.line}"
        return f"{self.importer} -> {self.imported} ({'late' if self.late else 'top'}, {where})"


@functools.cache
def module_files() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package."""
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, names: tuple[str, ...], modules: dict[str, Path]) -> list[str]:
    """The package modules that `from name import names` (or `import name`) loads."""
    if name not in modules:
        return []
    targets = [f"{name}.{n}" if f"{name}.{n}" in modules else name for n in names] or [name]
    return list(dict.fromkeys(targets))


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, importer: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.importer, self.is_package, self.modules = importer, is_package, modules
        self.depth = 0
        self.edges: list[Edge] = []

    def _add(self, targets: list[str], node: ast.AST, *, late: bool) -> None:
        for target in targets:
            if target != self.importer:
                self.edges.append(Edge(self.importer, target, node.lineno, late))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(_resolve(alias.name, (), self.modules), node, late=self.depth > 0)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        name = _absolute(node, self.importer, self.is_package)
        names = tuple(alias.name for alias in node.names)
        self._add(_resolve(name, names, self.modules), node, late=self.depth > 0)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            self._add(_resolve(str(node.args[0].value), (), self.modules), node, late=True)
        self.generic_visit(node)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def import_edges() -> list[Edge]:
    """Every import between two package modules; `if TYPE_CHECKING:` blocks are skipped (they never run)."""
    modules = module_files()
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                node.body = []
        collector = _Collector(name, path.name == "__init__.py", modules)
        collector.visit(tree)
        edges.extend(collector.edges)
    return edges


def _prefix_match(module: str, prefix: str) -> int:
    """How long a match `prefix` (relative to the package) is for `module`; -1 when it does not name it."""
    full = f"{PACKAGE}.{prefix}" if prefix else PACKAGE
    return len(full) if module == full or (prefix and module.startswith(full + ".")) else -1


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            length = _prefix_match(module, prefix)
            if length > best_len:
                best, best_len = rank, length
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def upward_edges(edges: list[Edge]) -> list[tuple[Edge, str]]:
    broken = []
    for edge in edges:
        low, high = layer_of(edge.importer), layer_of(edge.imported)
        if high > low:
            rule = f"layer '{LAYERS[low][0]}' imports layer '{LAYERS[high][0]}' above it"
            broken.append((edge, rule))
        for importer, imported in FORBIDDEN_SIDEWAYS:
            if _prefix_match(edge.importer, importer) > 0 and _prefix_match(edge.imported, imported) > 0:
                broken.append((edge, f"front end '{importer}' must not import front end '{imported}'"))
    return [(edge, rule) for edge, rule in broken if (edge.importer, edge.imported) not in ALLOWED]


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each in a stable order."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if (edge.importer, edge.imported) not in ALLOWED:
            graph.setdefault(edge.importer, set()).add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _cycle_edges(component: list[str], edges: list[Edge]) -> list[Edge]:
    members = set(component)
    return [e for e in edges if e.importer in members and e.imported in members]


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_upward_imports():
    broken = upward_edges(import_edges())
    assert not broken, (
        "imports against the layer order (lowest first: "
        + " < ".join(name for name, _ in LAYERS)
        + "):\n"
        + "\n".join(f"  {edge}: {rule}" for edge, rule in broken)
        + "\nMove what the importer needs down to its own layer or below (or pass it in as an argument); "
        "do not hide the import inside a function."
    )


def test_no_import_cycles():
    edges = import_edges()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(component) + "\n" + "\n".join(f"      {e}" for e in _cycle_edges(component, edges))
        for component in found
    ) + "\nBreak each cycle: move the shared piece into a lower module that both import."


def test_every_allowed_edge_still_exists():
    """An entry of ALLOWED whose import is gone must go too, so that the import cannot come back unseen."""
    present = {(e.importer, e.imported) for e in import_edges()}
    stale = [edge for edge in ALLOWED if edge not in present]
    assert not stale, f"these imports are gone: delete their entries from ALLOWED in {Path(__file__).name}: {stale}"


def test_graph_sees_imports_of_every_kind():
    """The parser finds top and late edges, and the checks fail on an upward edge, a cycle, a forbidden pair."""
    edges = import_edges()
    late = {(e.importer, e.imported) for e in edges if e.late}
    top = {(e.importer, e.imported) for e in edges if not e.late}
    assert (f"{PACKAGE}.schedulers", f"{PACKAGE}.schedulers.ddim") in top
    assert any(importer == PACKAGE for importer, _ in late)  # the root's lazy scheduler table
    fake = [Edge(f"{PACKAGE}.models.unet", f"{PACKAGE}.pipelines.base", 1, True),
            Edge(f"{PACKAGE}.pipelines.base", f"{PACKAGE}.models.unet", 1, False),
            Edge(f"{PACKAGE}.ui.run", f"{PACKAGE}.cli.common", 3, False),
            Edge(f"{PACKAGE}.serve.app", f"{PACKAGE}.batch.jobs", 4, False)]
    assert [rule for _, rule in upward_edges(fake)] == [
        "layer 'models' imports layer 'pipelines' above it",
        "layer 'ui' imports layer 'cli' above it",
        "front end 'serve' must not import front end 'batch'",
    ]
    assert cycles(fake) == [[f"{PACKAGE}.models.unet", f"{PACKAGE}.pipelines.base"]]


def _report() -> None:
    edges = import_edges()
    print(f"{len(edges)} edges ({sum(e.late for e in edges)} late)")
    broken = upward_edges(edges)
    print(f"\n{len(broken)} upward edges ({sum(e.late for e, _ in broken)} late):")
    for edge, rule in broken:
        print(f"  {edge}: {rule}")
    found = cycles(edges)
    print(f"\n{len(found)} cycles:")
    for component in found:
        print("  " + " <-> ".join(component))
        for edge in _cycle_edges(component, edges):
            print(f"      {edge}")


if __name__ == "__main__":
    _report()
