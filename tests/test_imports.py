"""The package's imports go one way.

* Statically: the graph of the package's module-level imports (parsed with ``ast``; an import inside a function runs
  later and is no edge) has no cycle, and no function imports another module of the package except where the reason
  is written down below.
* Dynamically: every module imports on its own in a fresh interpreter, then with ``import easy_context`` after it,
  and after ``import easy_context``, without an ImportError. Each scenario runs in a child forked from one interpreter
  that has imported the package's third-party dependencies (torch, transformers, accelerate) and no module of the
  package, so each costs only the package's own imports.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "easy_context"

# Imports inside functions that are kept, each with its reason. Every other import of a package module inside a
# function fails the test: it would hide an import cycle or a layer reached from below.
ALLOWED_FUNCTION_IMPORTS = {
    # transformers.Trainer takes seconds to import; `import easy_context` should not pay for it.
    ("easy_context", "easy_context.trainer"),
}


def package_modules():
    """``{module name: path}`` of every module of the package."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def _ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _resolve(module, node):
    """The absolute module name an ``ImportFrom`` node names, from inside ``module``."""
    if not node.level:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module, statements):
    """Package modules that executing ``statements`` of ``module`` imports (and needs initialised), in order."""
    found = []

    def need(target):
        # Importing a.b.c runs the __init__ of a and a.b first, unless they are this module's own packages, which are
        # already being imported when this module runs.
        for name in sorted(_ancestors(target) - _ancestors(module) - {module}, key=len):
            found.append(name)
        if target != module:
            found.append(target)

    for node in statements:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    need(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target is None or target.split(".")[0] != PACKAGE:
                continue
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            names = [a.name for a in node.names if f"{target}.{a.name}" not in MODULES]
            if names or target not in _ancestors(module):
                need(target)  # names defined by ``target``: its code must have run (nothing, for this module's own)
            for sub in submodules:
                need(sub)
    return [name for name in found if name in MODULES]


def _module_level(statements):
    """The statements that run when the module is imported: not function bodies, nor ``if TYPE_CHECKING:`` blocks."""
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        yield node
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(node, field, None) or [])
        for handler in getattr(node, "handlers", None) or []:
            yield from _module_level(handler.body)


def _function_level(tree):
    """Import statements inside function bodies."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def import_graph():
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        statements = [n for n in _module_level(tree.body) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = list(dict.fromkeys(_imports(name, statements)))
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_the_graph_sees_what_a_cycle_needs():
    """A method module that takes names from its package's ``__init__``, which imports it back, is a cycle."""
    module, init = "easy_context.methods.ring", "easy_context.methods"
    tree = ast.parse("from . import Method, register\nfrom ..comm import RingComm\n")
    assert _imports(module, tree.body) == [init, "easy_context.comm"]
    tree = ast.parse("from . import ring, Method\n")  # a submodule, and a name of the __init__ itself
    assert _imports(init, tree.body) == ["easy_context.methods.ring"]


def test_module_level_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle among the package's modules: " + " -> ".join(cycle)


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


# What the scripts use; ``import easy_context`` loads none of it.
APPLICATION = ("easy_context.assets", "easy_context.training", "easy_context.evaluation", "easy_context.adapters",
               "easy_context.trainer", "easy_context.run_safety", "easy_context.cli")


def test_the_library_does_not_import_the_applications():
    graph = import_graph()
    library = reachable(graph, PACKAGE)
    loaded = sorted(m for m in library if m.startswith(APPLICATION))
    assert not loaded, f"import easy_context loads application modules: {loaded}"
    assets = reachable(graph, "easy_context.assets")
    assert not assets & {"easy_context.assets.fetch", "easy_context.assets.rdata"}, sorted(assets)


def test_no_function_imports_a_package_module_unless_written_down():
    found = set()
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _function_level(tree):
            targets = _imports(name, [node])
            found.update((name, target) for target in targets if target not in _ancestors(name))
    unexpected = sorted(found - ALLOWED_FUNCTION_IMPORTS)
    assert not unexpected, (f"imports of package modules inside functions: {unexpected}; import them at the top of "
                            "the module, or write down why not in ALLOWED_FUNCTION_IMPORTS")


RUNNER = r"""
import importlib, json, os, sys, traceback
import torch, transformers, accelerate  # noqa: F401 - third-party dependencies, loaded once for every child
assert not [m for m in sys.modules if m.split(".")[0] == "easy_context"], "the package was imported too early"
scenarios, results = json.loads(sys.argv[1]), []
for names in scenarios:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        for step, name in enumerate(names):
            try:
                importlib.import_module(name)
            except BaseException:
                os.write(write, f"step {step} (import {name}):\n{traceback.format_exc()}".encode())
                code = 1
                break
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    results.append([names, os.waitstatus_to_exitcode(status), message])
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


def _scenarios():
    for name in MODULES:
        if name == PACKAGE:
            yield [PACKAGE]
        else:
            yield [name, PACKAGE]  # the module alone in a fresh interpreter, then the package
            yield [PACKAGE, name]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone_and_in_either_order(tmp_path):
    scenarios = list(_scenarios())
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(scenarios), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert [r[0] for r in results] == scenarios
    failed = [f"{' then '.join(names)}: {message or f'exit code {code}'}" for names, code, message in results if code]
    assert not failed, "\n\n".join(failed)
