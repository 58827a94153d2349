"""The import graph of oaml_jax and data_pipelines runs one way, and no module is over 600 lines.

The graph is read from the source (ast), not by importing: every `import` and `from ... import`, at module
level and inside functions, is an edge. Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first,
so an edge to a module is also an edge to each package above it: a package whose `__init__` imports a
module that imports the package back is a cycle too. Each subpackage of oaml_jax (evaluation, models,
configs) is also taken as one node: a module that imports a subpackage's module while another module of
that subpackage imports it is a cycle. (`data_pipelines` and `oaml_jax` themselves are not merged:
`data_pipelines` uses the leaf modules `oaml_jax.paths` and `oaml_jax.models.face_input`.)
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("oaml_jax", "data_pipelines")
MAX_LINES = 600


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of `PACKAGES` (a package is its `__init__`)."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(name: str, tree: ast.AST, is_package: bool) -> set[str]:
    """Every dotted name `tree` imports (`from p import m` gives both `p` and `p.m`), relative ones resolved."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                anchor = parts[:len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports, each with the packages above it."""
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for target in _imported(name, tree, path.endswith("__init__.py")):
            parts = target.split(".")
            edges.update(".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_function_level_imports_and_packages():
    """Known answers on a made-up tree: a function-level import, a relative one, a package's `__init__`."""
    tree = ast.parse("import os\nfrom . import b\ndef f():\n    from oaml_jax.models import oaml\n")
    assert _imported("oaml_jax.x", tree, is_package=False) == {"os", "oaml_jax", "oaml_jax.b", "oaml_jax.models",
                                                               "oaml_jax.models.oaml"}
    assert _imported("oaml_jax.models", ast.parse("from .oaml import OAML\n"), is_package=True) == {
        "oaml_jax.models.oaml", "oaml_jax.models.oaml.OAML"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _by_subpackage(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`graph` with each subpackage (`oaml_jax.evaluation`, `oaml_jax.models`, ...) as one node."""
    node = lambda name: ".".join(name.split(".")[:2])
    merged = {}
    for name, targets in graph.items():
        merged.setdefault(node(name), set()).update(node(t) for t in targets if node(t) != node(name))
    return merged


def test_no_module_or_subpackage_imports_one_that_imports_it_back():
    graph = _graph(_modules())
    assert "oaml_jax.serving" in graph and "oaml_jax.evaluation.verdict" in graph["oaml_jax.inference"]
    assert _cycles(graph) == []
    # A subpackage is one node: evaluation imports serving, so serving must not reach any module of it.
    assert _cycles(_by_subpackage(graph)) == []


def test_a_module_and_a_subpackage_that_import_each_other_are_a_cycle():
    """What the code had before serving moved out of inference.py: evaluation.pairs imported inference,
    inference imported evaluation.calibration."""
    graph = {"oaml_jax.inference": {"oaml_jax.evaluation", "oaml_jax.evaluation.calibration"},
             "oaml_jax.evaluation.pairs": {"oaml_jax.evaluation", "oaml_jax.inference"},
             "oaml_jax.evaluation.calibration": {"oaml_jax.evaluation"}, "oaml_jax.evaluation": set()}
    assert _cycles(graph) == []
    assert _cycles(_by_subpackage(graph)) == [["oaml_jax.evaluation", "oaml_jax.inference"]]


def test_serving_sits_below_evaluation_and_the_command_lines():
    """FaceModel's module reaches the models, the checkpoint reader and device helpers only."""
    graph = _graph(_modules())
    reached, todo = set(), ["oaml_jax.serving"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not {m for m in reached if m.startswith(("oaml_jax.evaluation", "oaml_jax.train"))}
    assert not reached & {"oaml_jax.inference", "oaml_jax.cli", "oaml_jax.photos", "oaml_jax.export"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_600_lines(package):
    long = {name: n for name, path in _modules().items() if name.split(".")[0] == package
            for n in [sum(1 for _ in open(path, encoding="utf-8"))] if n > MAX_LINES}
    assert long == {}
