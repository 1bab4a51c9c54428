"""The shape of the package: layers that import only downward, no import cycle as Python runs
it, a protocol that loads no concrete method, small files.

The import graph is read from the source with ``ast``, every import counted: module level,
inside functions (a deferred import still closes a cycle when it runs) and, for the layer
order only, under ``if TYPE_CHECKING:`` (never run, so it cannot close a cycle, but it still
ties a lower layer to a higher one). ``import leantune.x``, ``from leantune.x import y`` and
``from leantune import x`` all count, and importing ``leantune.a.b`` runs ``leantune.a``'s
``__init__`` too, so that is an edge as well. The root ``leantune/__init__.py`` is the public
facade: it may import anything, and no module inside imports it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "leantune"
LAYERS = ("core", "models", "adapters", "analysis", "train", "tune", "export", "search", "cli")
"""Bottom to top: a module imports from its own layer and the ones below only."""


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(src: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, runtime: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import of the module, in functions too; ``runtime``: not those under
    ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif runtime and isinstance(node, ast.If) and _type_checking(node):
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


def import_graph(
    src: Path = SRC, package: str = "leantune", runtime: bool = True
) -> dict[str, set[str]]:
    """module -> the package's modules it imports (and the packages whose ``__init__`` that
    runs), the root package left out."""
    modules = _modules(src, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree, runtime):
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
                while found is not None and found != package:
                    if found != name and not name.startswith(found + "."):
                        graph[name].add(found)
                    found = found.rpartition(".")[0]  # the packages above run their __init__
                if _resolve(target, modules) == package and name != package:
                    graph[name].add(package)
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


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a layer to a higher one, and imports of the root facade from inside."""
    wrong = []
    for module, deps in graph.items():
        here = layer(module)
        for dep in sorted(deps):
            there = layer(dep)
            if dep == "leantune" or (here is not None and there is not None and there > here):
                wrong.append(f"{module} -> {dep}")
    return wrong


def test_the_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "leantune.adapters.base" in graph["leantune.adapters.methods.lora.config"]
    assert "leantune.adapters" in graph["leantune.analysis.plan"]  # its __init__ runs
    assert "leantune.adapters.formats" in graph["leantune.adapters.accounting"]
    # A function-local import counts (the CLI's lazy imports of the job).
    assert "leantune.tune.run" in graph["leantune.cli.tune"] or any(
        d.startswith("leantune.tune") for d in graph["leantune.cli.tune"]
    )


def test_a_deferred_import_that_closes_a_cycle_is_seen(tmp_path: Path) -> None:
    """A planted tree: b imports a inside a function, a imports b at module level."""
    pkg = tmp_path / "planted"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from planted.low import b\n")
    (pkg / "low" / "b.py").write_text(
        textwrap.dedent(
            """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from planted.low import c
            def late():
                from planted.low.a import x
            """
        )
    )
    (pkg / "low" / "c.py").write_text("import planted.low.b\n")
    graph = import_graph(tmp_path, "planted")
    assert find_cycle(graph) == ["planted.low.a", "planted.low.b", "planted.low.a"]
    # Type-only imports close no cycle as Python runs it, but count for the layers.
    assert "planted.low.c" not in graph["planted.low.b"]
    assert "planted.low.c" in import_graph(tmp_path, "planted", runtime=False)["planted.low.b"]
    (pkg / "low" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path, "planted")) is None


def test_find_cycle_reports_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_as_python_runs_it() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_import_only_downward() -> None:
    assert upward_imports({"leantune.core.a": {"leantune.tune.b"}}) == [
        "leantune.core.a -> leantune.tune.b"
    ]
    wrong = upward_imports(import_graph(runtime=False))
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_package_root_holds_the_layers_only() -> None:
    entries = sorted(
        p.name
        for p in PACKAGE.iterdir()
        if p.name not in ("__pycache__", "__init__.py", "py.typed")
    )
    assert entries == sorted(LAYERS)


def test_the_protocol_loads_no_concrete_method() -> None:
    graph = import_graph()
    for core in ("leantune.adapters.base", "leantune.adapters.config"):
        seen: set[str] = set()
        todo = [core]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        wrong = sorted(d for d in seen if d.startswith("leantune.adapters.methods"))
        assert not wrong, f"{core} loads concrete method modules {wrong}"


def test_no_file_over_450_lines_and_no_function_over_80() -> None:
    """Issues 14 and 27: files stay readable, the report included."""
    src = Path(__file__).resolve().parent.parent / "src" / "leantune"
    long_files, long_functions = [], []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long_files.append(f"{path.relative_to(src)}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{path.relative_to(src)}:{node.name}: {length}")
    assert not long_files, long_files
    assert not long_functions, long_functions


# ---------------------------------------------------------------------------- method switches

CORE_ONLY = ("adapters/methods/__init__.py",)
"""Files of adapters/methods/ that are not a method (the registrations)."""


def _method_names() -> set[str]:
    import leantune.adapters.methods  # noqa: F401  (registers leantune's methods)
    from leantune.adapters.config import METHODS

    return set(METHODS)


def _method_classes() -> set[str]:
    """Names of the classes the concrete method modules define."""
    found: set[str] = set()
    for path in sorted((PACKAGE / "adapters" / "methods").rglob("*.py")):
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
        if rel.startswith("adapters/methods/") and rel not in CORE_ONLY:
            continue
        found += [f"{rel}:{hit}" for hit in method_switches(path.read_text(), methods, classes)]
    assert not found, "method switches outside methods/:\n" + "\n".join(found)


def test_the_paths_users_are_shown_import() -> None:
    """The public API: what README and the docs show (``leantune.X`` and the training loop),
    and every method's config from the package root."""
    import re

    import leantune
    from leantune.adapters.config import METHODS

    root = PACKAGE.parent.parent
    shown = set()
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        shown |= set(re.findall(r"`(?:lt|leantune)\.([A-Za-z_]\w*)", text)) - {"json", "yaml"}
    missing = sorted(name for name in shown if not hasattr(leantune, name) and not _is_module(name))
    assert not missing, f"README/docs show leantune.{missing[0]}, which does not exist"
    for cls in METHODS.values():
        assert getattr(leantune, cls.__name__) is cls
    from leantune.train.loop import train  # noqa: F401  (README's training loop)


def _is_module(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(f"leantune.{name}")
    except ImportError:
        return False
    return True
