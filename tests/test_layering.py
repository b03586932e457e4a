"""The package's modules form layers: the imports at the tops of its files give an acyclic graph, and no module
imports another of ours inside a function (where a cycle could hide)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "geochange"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(node: ast.AST, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The geochange modules one import statement names (``from .x import y`` names .x, or .x.y when y is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    named = {f"{source}.{alias.name}" for alias in node.names} & modules
    return named | ({source} & modules)


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> the modules it imports at its top, module -> 'line: module' of imports of ours inside functions)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    top: dict[str, set[str]] = {}
    nested: dict[str, list[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        top[name] = set().union(*(own_imports(n, name, is_package, modules) for n in tree.body)) - {name}
        body = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            imported = own_imports(node, name, is_package, modules) if id(node) not in body else set()
            if imported:
                nested.setdefault(name, []).append(f"{node.lineno}: {sorted(imported)}")
    return top, nested


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] when it is acyclic (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_a_cycle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_is_read_from_the_files():
    top, _ = import_graph()
    # Known edges, one per import form: "from .x import", "from .. import x", "from ..x import".
    assert "geochange.errors" in top["geochange.video"]
    assert "geochange.changechat_format" in top["geochange.sample.data"]
    assert "geochange.locks" in top["geochange.deltavlm.tiny"]
    assert "geochange.deltavlm" in top["geochange.report"]  # a package's own __init__ (its constants)
    assert "geochange.deltavlm.model" in top["geochange.deltavlm.loading"]
    assert top["geochange.errors"] == set()


def test_package_imports_form_layers():
    top, _ = import_graph()
    assert find_cycle(top) == [], "import cycle: " + " -> ".join(find_cycle(top))




def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_deltavlm_does_not_import_the_video_stack_and_shared_modules_import_no_subpackage():
    top, _ = import_graph()
    for entry in ("geochange.deltavlm.training", "geochange.deltavlm.run"):
        assert not {m for m in reachable(top, entry) if m.startswith("geochange.video_llm")}, entry
    # what both sides share, at the package root, stands below both subpackages
    # report.py, demo.py and change_maps.py gather both families (the notebook's tables, the browser chat, whole
    # scenes): the top of the package
    top_modules = ("geochange.report", "geochange.demo", "geochange.change_maps")
    shared = [m for m in top if m.count(".") == 1 and m not in top_modules]
    above = {m: sorted(d for d in reachable(top, m) if d.startswith(("geochange.video_llm", "geochange.deltavlm.")))
             for m in shared}
    assert {m: deps for m, deps in above.items() if deps} == {}


def test_no_module_imports_ours_inside_a_function():
    _, nested = import_graph()
    assert nested == {}, f"imports of geochange modules inside functions (move them to the top): {nested}"


def test_no_cycle_hides_inside_functions():
    top, nested = import_graph()
    graph = {name: set(edges) for name, edges in top.items()}
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name in nested:
        tree = ast.parse(files[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            graph[name] |= own_imports(node, name, files[name].name == "__init__.py", set(files)) - {name}
    assert find_cycle(graph) == [], "import cycle through a function-level import: " + " -> ".join(find_cycle(graph))


def test_the_architecture_page_names_every_module_in_layer_order():
    """docs/architecture.md's module table names each module (its one job), bottom layer first: a module imports
    only modules listed before it."""
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = ["geochange." + path.replace("/", ".")
              for path in re.findall(r"^\| `geochange/([\w/]+)\.py` \| \S", page, re.M)]
    top, _ = import_graph()
    packages = {"geochange", "geochange.deltavlm", "geochange.video_llm", "geochange.sample"}
    modules = set(top) - packages
    assert sorted(modules - set(listed)) == [], "modules without a row in docs/architecture.md's module table"
    assert sorted(set(listed) - modules) == [], "docs/architecture.md rows for modules that do not exist"
    position = {name: i for i, name in enumerate(listed)}
    late = [f"{name} imports {dep}" for name in listed for dep in sorted(top[name])
            if dep in position and position[dep] > position[name]]
    assert late == [], "docs/architecture.md's module table is not in layer order: " + "; ".join(late)


def test_the_results_notebook_reads_the_package_without_loading_torch():
    """Results.ipynb imports geochange.report: reading result files needs neither torch nor transformers (seconds
    of start-up each), so nothing report imports loads them at its top."""
    import sys

    from conftest import run_command

    code = "import sys, geochange.report; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    run = run_command([sys.executable, "-c", code], cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
