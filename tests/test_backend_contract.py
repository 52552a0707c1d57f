"""tinyhun.backends.contract is the whole contract: every backend (NumPy, Numba, CUDA) implements each of its
members with the contract's arguments, every scratch each Scratch member, and the engine calls nothing on a
backend or a scratch that the contract does not list. The CUDA backend is checked as a class (no GPU needed: its
module imports numba.cuda only when a CudaBackend is created)."""
import ast
import inspect
from pathlib import Path

import pytest

import tinyhun
from tinyhun.backends import NumbaBackend, NumpyBackend, contract, select
from tinyhun.backends.cuda import CudaBackend
from tinyhun.backends.cuda_memory import DeviceScratch
from tinyhun.backends.host import HostScratch
from tinyhun.families import load_config

PACKAGE = Path(tinyhun.__file__).parent
TINY = PACKAGE.parent / "weights" / "tiny-hunyuan"
BACKENDS = [NumpyBackend, NumbaBackend, CudaBackend]


def params(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()]


def test_contract_members_are_what_its_docstrings_describe():
    """The contract lists the members written in it (a guard on `members` itself)."""
    assert {"prepare", "attach", "kv_memory", "zeros", "copy_block", "read_blocks", "write_blocks", "scratch",
            "rope_tables", "embed", "layer", "logits", "run", "first_run", "name"} == contract.members(contract.Backend)
    assert {"bufs", "slots", "positions", "tables", "rows", "logits_out", "to_host", "pick",
            "picked"} == contract.members(contract.Scratch)
    for protocol in (contract.Backend, contract.Scratch):
        for name, fn in vars(protocol).items():
            if callable(fn) and not name.startswith("_"):
                assert fn.__doc__, f"{protocol.__name__}.{name} says what it must do"


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_every_backend_implements_the_contract(cls):
    for name in contract.members(contract.Backend):
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        want = getattr(contract.Backend, name, None)
        if callable(want):
            assert params(getattr(cls, name)) == params(want), f"{cls.__name__}.{name}'s arguments"
    assert isinstance(cls.name, str)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_host_backends_and_their_scratch_follow_the_protocols(name):
    backend = select(name)
    assert backend.name == name and isinstance(backend, contract.Backend)
    scratch = backend.scratch(load_config(TINY / "config.json"), 4, 2)
    assert isinstance(scratch, HostScratch) and isinstance(scratch, contract.Scratch)


def self_attributes(cls):
    """Methods of cls and the attributes its __init__ sets (for a class that needs a GPU to be created)."""
    init = ast.parse(inspect.getsource(cls)).body[0]
    names = {n.name for n in init.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(init):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return names


@pytest.mark.parametrize("cls", [HostScratch, DeviceScratch], ids=lambda c: c.__name__)
def test_every_scratch_implements_the_contract(cls):
    missing = contract.members(contract.Scratch) - self_attributes(cls)
    assert not missing, f"{cls.__name__} lacks {sorted(missing)}"
    for name in contract.members(contract.Scratch):
        want = getattr(contract.Scratch, name, None)
        if callable(want):
            assert params(getattr(cls, name)) == params(want), f"{cls.__name__}.{name}'s arguments"


def engine_modules():
    """The engine's modules (not the backends themselves); tokenizer.py's `backend` is the tokenizers library's."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if "backends" not in path.relative_to(PACKAGE).parts and path.name != "tokenizer.py":
            yield path


def is_backend(node):
    """`backend`, `x.backend` or `self.backend`: the engine's names for the backend it was given."""
    return isinstance(node, ast.Name) and node.id == "backend" or \
        isinstance(node, ast.Attribute) and node.attr == "backend"


def scratch_names(fn):
    """Names a function assigns a backend scratch (from Model._scratch(), or from a backend's `scratch`)."""
    names = set()
    for node in ast.walk(fn):
        if not isinstance(node, ast.Assign):
            continue
        pairs = [(t, node.value) for t in node.targets]
        for t, v in list(pairs):
            if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple):
                pairs += list(zip(t.elts, v.elts))
        for t, v in pairs:
            if isinstance(t, ast.Name) and isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and \
                    v.func.attr in ("_scratch", "scratch"):
                names.add(t.id)
    return names


def functions(tree):
    """The module's functions and methods, each with the functions nested in it."""
    for node in tree.body:
        for f in node.body if isinstance(node, ast.ClassDef) else [node]:
            if isinstance(f, ast.FunctionDef):
                yield f


def engine_uses():
    """(members used on a backend, members used on a scratch), each with where, over the engine's modules."""
    on_backend, on_scratch = {}, {}
    for path in engine_modules():
        for fn in functions(ast.parse(path.read_text())):
            scratches = scratch_names(fn)
            for node in ast.walk(fn):
                if not isinstance(node, ast.Attribute):
                    continue
                where = f"{path.name}:{node.lineno}"
                if is_backend(node.value):
                    on_backend.setdefault(node.attr, where)
                elif isinstance(node.value, ast.Name) and node.value.id in scratches or \
                        isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) and \
                        node.value.func.attr == "_scratch":
                    on_scratch.setdefault(node.attr, where)
    return on_backend, on_scratch


def test_the_contract_lists_everything_the_engine_uses():
    on_backend, on_scratch = engine_uses()
    # the scan finds what the engine does use (Model, the KV pool, prompt caches, adapters over a model)
    assert {"prepare", "run", "layer", "zeros", "copy_block", "read_blocks", "attach"} <= set(on_backend)
    assert {"rows", "slots", "tables", "picked", "bufs"} <= set(on_scratch)
    unlisted = {n: w for n, w in on_backend.items() if n not in contract.members(contract.Backend)}
    assert not unlisted, f"backend members used but not in tinyhun/backends/contract.py: {unlisted}"
    unlisted = {n: w for n, w in on_scratch.items() if n not in contract.members(contract.Scratch)}
    assert not unlisted, f"scratch members used but not in tinyhun/backends/contract.py: {unlisted}"


def test_load_names_the_backend_once():
    """kernels= names the backend; device=, its deprecated spelling, must agree with it (one line when not)."""
    from tinyhun.errors import TinyhunError
    assert tinyhun.load(TINY, kernels="numpy").backend.name == "numpy"
    with pytest.warns(DeprecationWarning, match="kernels="):
        assert tinyhun.load(TINY, device="cpu", kernels="numpy").backend.name == "numpy"
    for device, kernels in (("cuda", "numpy"), ("cpu", "cuda"), ("cuda", "numba")):
        with pytest.warns(DeprecationWarning), pytest.raises(TinyhunError, match="contradicts") as e:
            tinyhun.load(TINY, device=device, kernels=kernels)
        assert "\n" not in str(e.value)
