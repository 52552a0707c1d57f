"""tinyhun's imports go one way: faces (the command line, the server, the chat) -> the engine (Model, generation)
-> backends -> formats and weights -> model families -> shared data and ops -> kernels. Checked over the source
(function-level imports included, where a cycle hides), and every module imports on its own."""
import ast
import importlib
from pathlib import Path

import pytest

import tinyhun

PACKAGE = Path(tinyhun.__file__).parent
KERNELS = PACKAGE.parent / "kernels"   # packaged as tinyhun.kernels

# lowest first; a module may import its own layer's modules and lower layers' only
LAYERS = [
    ("kernels", ["tinyhun.kernels"]),
    ("shared data and ops", ["tinyhun.errors", "tinyhun.structs", "tinyhun.config", "tinyhun.blocks"]),
    ("model families", ["tinyhun.families"]),
    ("formats and weights", ["tinyhun.checkpoint", "tinyhun.folders", "tinyhun.weights", "tinyhun.adapters",
                             "tinyhun.gguf_import", "tinyhun.quantize", "tinyhun.merge", "tinyhun.hub",
                             "tinyhun.tokenizer", "tinyhun.tiktoken_bpe"]),
    ("backends", ["tinyhun.backends"]),
    ("engine", ["tinyhun.model", "tinyhun.kv_cache", "tinyhun.prompt_cache", "tinyhun.generation",
                "tinyhun.sampling", "tinyhun.constrain", "tinyhun.thinking", "tinyhun.tool_calls", "tinyhun.styles",
                "tinyhun.content_filter", "tinyhun.moe_stats"]),
    ("faces", ["tinyhun", "tinyhun.cli", "tinyhun.cli_args", "tinyhun.cli_serve", "tinyhun.cli_kv",
               "tinyhun.chat", "tinyhun.evaluate", "tinyhun.bench",
               "tinyhun.server"]),
]

KNOWN_CYCLES = []


def modules():
    """{module name: (path, is a package)} of tinyhun/**/*.py and kernels/*.py."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = path.name == "__init__.py"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    for path in sorted(KERNELS.glob("*.py")):
        package = path.name == "__init__.py"
        found[".".join(["tinyhun", "kernels"] + ([] if package else [path.stem]))] = (path, package)
    return found


MODULES = modules()


def resolve(name):
    """The module a dotted import name lands in (`from .x import y`: module x.y, or x when y is a name in it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(name):
    """{module imported: line} of a module's imports anywhere in it (function bodies too)."""
    path, package = MODULES[name]
    here = name.split(".") if package else name.split(".")[:-1]
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module or ""
            targets = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "tinyhun" and resolve(t) != name:
                found.setdefault(resolve(t), node.lineno)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def layer_of(name):
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = name == p or p != "tinyhun" and name.startswith(p + ".")   # the package itself: the loader
            if inside and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{name}: in no layer of tests/test_import_layers.py (add it to LAYERS)"
    return best[0]


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    upward = [f"{MODULES[m][0].relative_to(PACKAGE.parent)}:{line} ({LAYERS[layer_of(m)][0]}) imports {t} "
              f"({LAYERS[layer_of(t)][0]})"
              for m, deps in GRAPH.items() for t, line in deps.items() if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def cycles():
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = set()
            while not part or v not in part:
                part.add(stack.pop())
            on.difference_update(part)
            if len(part) > 1:
                found.append(part)
    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert [c for c in cycles() if c not in KNOWN_CYCLES] == []


def test_a_cycle_is_found():
    """The scan sees function-level imports: the adapters -> model -> backends -> adapters cycle would show."""
    GRAPH["tinyhun.adapters"]["tinyhun.model"] = 0
    try:
        assert {"tinyhun.adapters", "tinyhun.model", "tinyhun.backends"} <= set().union(*cycles())
    finally:
        del GRAPH["tinyhun.adapters"]["tinyhun.model"]
    assert "tinyhun.kernels.cpu" in GRAPH["tinyhun.backends.host"]   # `from ..kernels import cpu` in a method


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("tinyhun.kernels.cuda")))
def test_every_module_imports(name):
    importlib.import_module(name)
