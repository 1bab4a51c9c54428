"""The shape of the package: no import cycles, and a core that knows no concrete method.

The import graph is read from the source with ``ast``: module-level imports only (an import
inside a function runs late and cannot close a cycle at import time). ``import leantune.x``,
``from leantune.x import y`` and ``from leantune import x`` all count. A module's parent
package is not counted as an import of it: Python puts a package in ``sys.modules`` before
running its ``__init__``, so a package importing its own submodules is no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "leantune"
CONCRETE_METHODS = (
    "lora",
    "lora_layers",
    "lora_math",
    "lora_peft",
    "delta",
    "bitfit",
    "layernorm",
    "sparse",
    "mixed",
    "ia3",
    "vera",
    "bottleneck",
    "lora_conv",
    "lora_arith",
    "virtual",
    "prompt",
    "prefix_tuning",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: if/try blocks at module level count;
    imports inside functions and under ``if TYPE_CHECKING:`` (never run) do not."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif isinstance(node, ast.If) and _type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _top_level_imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    here = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        here = here.rpartition(".")[0]
                    base = f"{here}.{base}" if base else here
                # ``from pkg import x`` imports the module pkg.x when there is one, else pkg.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                found = _resolve(target, modules)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "leantune.methods.base" in graph["leantune.methods.lora"]
    assert "leantune.formats" in graph["leantune.accounting"]
    assert "leantune.formats" not in graph["leantune.inject"]  # a lazy re-export only


def test_type_checking_imports_are_left_out() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nimport b\n"
    )
    imports = _top_level_imports(tree)
    names = [i.module if isinstance(i, ast.ImportFrom) else i.names[0].name for i in imports]
    assert sorted(n or "" for n in names) == ["b", "typing"]


def test_find_cycle_reports_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_core_modules_import_no_concrete_method() -> None:
    concrete = {f"leantune.methods.{m}" for m in CONCRETE_METHODS}
    graph = import_graph()
    core_modules = (
        "leantune.methods.base",
        "leantune.methods.config",
        "leantune.targets",
        "leantune.inject",
        "leantune.formats",
        "leantune.accounting",
        "leantune.plan",
        "leantune.select",
        "leantune.train.regularize",
        "leantune.train.schedule",
        "leantune.train.adapt",
        "leantune.train.loop",
    )
    for core in core_modules:
        # Everything the core pulls in at import time, not only its direct imports.
        seen: set[str] = set()
        todo = [core]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        wrong = sorted(seen & concrete)
        assert not wrong, f"{core} imports concrete method modules {wrong}"


def test_no_file_over_450_lines_and_no_function_over_80() -> None:
    """Issue 14: files stay readable (report.py, rendering only, is the exception)."""
    src = Path(__file__).resolve().parent.parent / "src" / "leantune"
    long_files, long_functions = [], []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        if path.name != "report.py" and len(text.splitlines()) > 450:
            long_files.append(f"{path.relative_to(src)}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{path.relative_to(src)}:{node.name}: {length}")
    assert not long_files, long_files
    assert not long_functions, long_functions


# ---------------------------------------------------------------------------- method switches

CORE_ONLY = ("methods/base.py", "methods/config.py", "methods/__init__.py")
"""Files of methods/ that are the core (protocol, config, registry), not a method."""


def _method_names() -> set[str]:
    import leantune.methods  # noqa: F401  (registers leantune's methods)
    from leantune.methods.base import METHODS

    return set(METHODS)


def _method_classes() -> set[str]:
    """Names of the classes the concrete method modules define."""
    found: set[str] = set()
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        if str(path.relative_to(PACKAGE)) in CORE_ONLY:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    return found


def method_switches(source: str, methods: set[str], classes: set[str]) -> list[str]:
    """``isinstance`` on a concrete method class and comparisons with a method's name
    (``==``, ``!=``, ``in``/``not in`` a literal tuple, list or set), as ``line: code``."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        hit = False
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            hit = any(
                (isinstance(n, ast.Name) and n.id in classes)
                or (isinstance(n, ast.Attribute) and n.attr in classes)
                for n in ast.walk(node.args[1])
            )
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = [n for side in sides for n in ast.walk(side) if isinstance(n, ast.Constant)]
            hit = any(isinstance(c.value, str) and c.value in methods for c in consts)
        if hit:
            found.append(f"{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_the_switch_finder_finds_switches() -> None:
    methods, classes = {"lora", "bitfit"}, {"LoraLayer"}
    code = (
        "if isinstance(layer, LoraLayer):\n    pass\n"
        "if config.method == 'lora':\n    pass\n"
        "ok = m in ('bitfit', 'head')\n"
        "fine = plan.of('lora')\n"
        "also_fine = isinstance(layer, AdapterLayer)\n"
    )
    assert [f.split(":")[0] for f in method_switches(code, methods, classes)] == ["1", "3", "5"]


def test_no_method_switch_outside_the_methods() -> None:
    """Issue 14: the core reaches a method through the registry and the layer hooks only."""
    methods, classes = _method_names(), _method_classes()
    assert {"lora", "sparse"} <= methods and {"LoraLayer", "SparseConfig"} <= classes
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith("methods/") and rel not in CORE_ONLY:
            continue
        found += [f"{rel}:{hit}" for hit in method_switches(path.read_text(), methods, classes)]
    assert not found, "method switches outside methods/:\n" + "\n".join(found)
