"""The import graph of the project's own modules: no cycles, and no import that runs back up the layers.

Layers, bottom to top: models (networks and their math) < sampling (how a family's steps run) < util
(training state, data, evaluation, files) < engine_mar (the training epoch and evaluation) < the entry
scripts and bench/. Every import counts, lazy ones inside functions too.
"""
import ast

from tests.conftest import REPO

LAYERS = {"models": 0, "sampling": 1, "util": 2, "engine_mar": 3}
TOP = 4  # main_mar, sample, main_cache, demo_edit, bench.*


def project_modules():
    files = [p for p in REPO.rglob("*.py") if not any(part.startswith(".") or part == "tests"
                                                      for part in p.relative_to(REPO).parts)]
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports_of(path, modules):
    """The project modules a file imports (anywhere in it), resolved to the longest known module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def layer(module):
    return LAYERS.get(module.split(".")[0], TOP)


def test_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_import_runs_up_the_layers():
    upward = sorted(f"{module} imports {dep}" for module, deps in import_graph().items() for dep in deps
                    if layer(dep) > layer(module))
    assert upward == []


def test_the_graph_sees_lazy_and_package_imports():
    """The checks above would pass vacuously if the parser missed imports: it must see these edges."""
    graph = import_graph()
    assert "models.families.mar" in graph["models.families"]  # `from models.families import mar`
    assert "util.evaluation.metrics" in graph["engine_mar"]    # imported inside evaluate()
    assert "sampling.backends" in graph["sampling.cuda_graphs"]
