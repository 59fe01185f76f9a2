"""The import graph of refnet/, manual/ and the top-level pytest plugin module: no cycles, and no function-level import without a reason.

Read with `ast` (nothing is imported): every `import` and `from … import`, at module level and
inside functions, is an edge to the module it names.  `from pkg import name` is an edge to
`pkg.name` when that is a module of the package, else to `pkg` itself.  The parent packages that
Python initialises on the way (`refnet` for `refnet.compare`) are not edges: they are always
already importing, and only a name taken from a half-initialised module breaks.

A function-level import is allowed only with a reason: a comment containing the word `optional`
(an optional dependency: matplotlib, tqdm, hypothesis, safetensors) or `lazy` (kept out of
start-up for speed), on the import's first line or on the line just above it, e.g.

    from tqdm import tqdm  # optional: refnet[progress]
    # lazy: the compiler stack takes seconds to import
    from torch import _dynamo
"""
import ast
import os
import re
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("refnet", "manual", "_refnet_pytestplugin")   # packages, or a top-level module
REASON = re.compile(r"#.*\b(optional|lazy)\b", re.IGNORECASE)


def find_modules(root, packages):
    """{dotted module name: (path, is_package)} for every .py file under the packages (a name
    with a .py file at the root is that one module)."""
    modules = {}
    for pkg in packages:
        if os.path.isfile(os.path.join(root, pkg + ".py")):
            modules[pkg] = (os.path.join(root, pkg + ".py"), False)
            continue
        for folder, dirs, files in os.walk(os.path.join(root, pkg)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            rel = os.path.relpath(folder, root).replace(os.sep, ".")
            for f in sorted(files):
                if f.endswith(".py"):
                    is_pkg = f == "__init__.py"
                    name = rel if is_pkg else f"{rel}.{f[:-3]}"
                    modules[name] = (os.path.join(folder, f), is_pkg)
    return modules


def _imports(tree):
    """(node, inside a function) for every import statement of a module."""
    out = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_function))
            walk(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    walk(tree, False)
    return out


def _targets(node, module, is_package, modules):
    """The modules of the graph that one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, `level - 1` packages up
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if node.module else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    found = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a non-module: its longest module
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def import_graph(root, packages):
    """({module: {imported module: first line}}, [(module, line, source) of function-level
    imports without a reason])."""
    modules = find_modules(root, packages)
    graph, unexplained = {}, []
    for module, (path, is_package) in modules.items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        lines = source.splitlines()
        edges = graph.setdefault(module, {})
        for node, in_function in _imports(ast.parse(source, path)):
            for target in _targets(node, module, is_package, modules):
                edges.setdefault(target, node.lineno)
            if in_function:
                here = lines[node.lineno - 1]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                if not REASON.search(here) and not (above.startswith("#") and REASON.search(above)):
                    unexplained.append((module, node.lineno, here.strip()))
    return graph, unexplained


def find_cycles(graph):
    """Every strongly connected group of two or more modules (or one that imports itself), each as
    one cycle path [a, b, …, a] through it."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(graph, group) for group in groups]


def _path_through(graph, group):
    """A shortest cycle from the group's first module back to itself, within the group."""
    start, members = group[0], set(group)
    paths, queue = {start: [start]}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return group


def _describe(graph, cycle):
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + \
        f" -> {cycle[-1]}"


# --- the project -------------------------------------------------------------------------------
def test_no_import_cycle_in_refnet_or_manual():
    graph, _ = import_graph(ROOT, PACKAGES)
    assert {"refnet.harness", "manual.mlp", "_refnet_pytestplugin"} <= set(graph)  # all found
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_every_function_level_import_states_a_reason():
    _, unexplained = import_graph(ROOT, PACKAGES)
    assert not unexplained, (
        "function-level imports without '# optional: …' or '# lazy: …' (move them to the top of "
        "the module, or say why they stay):\n"
        + "\n".join(f"{m}:{line}: {text}" for m, line, text in unexplained))


# --- the checks can fail: a synthetic package ---------------------------------------------------
def _package(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path)


def test_a_cycle_is_found_at_module_and_at_function_level(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from pkg import c  # lazy: for the test\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from . import a\nfrom .sub import e\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/e.py": "from .. import d\n",
    })
    graph, unexplained = import_graph(root, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c": 2} and graph["pkg.d"] == {"pkg.a": 1, "pkg.sub.e": 2}
    assert graph["pkg.sub.e"] == {"pkg.d": 1}
    cycles = find_cycles(graph)
    assert sorted(c[:-1] for c in cycles) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.d", "pkg.sub.e"]]
    assert "pkg.a (line 1) -> pkg.b (line 2) -> pkg.c (line 1) -> pkg.a" in \
        [_describe(graph, c) for c in cycles]
    assert unexplained == []


def test_an_acyclic_package_passes_and_parent_packages_are_not_edges(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "import os\nfrom pkg import b\nfrom pkg.b import g\n",
        "pkg/b.py": "import pkg.c\n",
        "pkg/c.py": "import numpy\n",
    })
    graph, _ = import_graph(root, ("pkg",))
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.c": 1},
                     "pkg.c": {}}
    assert find_cycles(graph) == []


def test_a_name_taken_from_a_package_is_an_edge_to_it(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from pkg import helper\n\ndef f():\n    pass\n",
    })
    graph, _ = import_graph(root, ("pkg",))
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg"]]


def test_a_function_level_import_needs_a_reason(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": """\
            import os


            def plain():
                import json
                return json


            def optional():
                from tqdm import tqdm  # optional: refnet[progress]
                # lazy: slow to import
                import torch._dynamo
                return tqdm


            class K:
                def method(self):
                    from pkg import b
                    return b
            """,
        "pkg/b.py": "",
    })
    _, unexplained = import_graph(root, ("pkg",))
    assert unexplained == [("pkg.a", 5, "import json"), ("pkg.a", 18, "from pkg import b")]


def private_imports(root, packages):
    """(module, source module, name) for every `_name` a module takes from another module of the
    packages: `from m import _name`, or `m._name` on a module imported as `import m` /
    `from pkg import m`.  Dunder names are not private."""
    modules = find_modules(root, packages)
    found = []
    for module, (path, is_pkg) in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        aliases = {}
        for node, _ in _imports(tree):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name in modules})
                continue
            base = _targets_base(node, module, is_pkg)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__") and base in modules \
                        and base != module:
                    found.append((module, base, a.name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and node.attr.startswith("_") and \
                    not node.attr.startswith("__") and aliases[node.value.id] != module:
                found.append((module, aliases[node.value.id], node.attr))
    return sorted(set(found))


def _targets_base(node, module, is_package):
    """The package a `from … import` names (relative imports resolved)."""
    if not node.level:
        return node.module
    parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def test_no_private_name_is_imported_across_modules():
    found = private_imports(ROOT, PACKAGES)
    assert not found, "private names taken across modules:\n" + "\n".join(
        f"{m} takes {name} from {src}" for m, src, name in found)


def test_a_private_import_is_found(tmp_path):
    pkg = tmp_path / "refnet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _hidden():\n    pass\n")
    (pkg / "b.py").write_text("from refnet.a import _hidden\n")
    (pkg / "c.py").write_text("from refnet import a\n\n\ndef f():\n    return a._hidden()\n")
    assert private_imports(str(tmp_path), ("refnet",)) == [
        ("refnet.b", "refnet.a", "_hidden"), ("refnet.c", "refnet.a", "_hidden")]
