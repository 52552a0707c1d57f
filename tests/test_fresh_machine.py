"""What a new user's machine sees: the public CLI and library in new processes, from an empty Numba cache.

Each run here is a separate process with its own NUMBA_CACHE_DIR, so the cache state is exactly what the runs
before it in the same test left, whatever this session compiled in-process.
"""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import ROOT

TINY = ROOT / "weights" / "tiny-hunyuan"
BENCH = ["--json", "--quiet", "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1"]


def cli(*args, cache):
    """`tinyhun ARGS` in a new process whose Numba cache is `cache`; asserts it exits 0 and returns its stdout."""
    r = subprocess.run([sys.executable, "-m", "tinyhun.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, timeout=600)
    died = f" (killed by {signal.Signals(-r.returncode).name})" if r.returncode < 0 else ""
    assert r.returncode == 0, f"tinyhun {' '.join(map(str, args))}: exit {r.returncode}{died}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """An INT4 copy of weights/tiny-hunyuan, written by `tinyhun quantize` (with a Numba cache of its own)."""
    tmp = tmp_path_factory.mktemp("tiny-q4")
    cli("quantize", TINY, tmp / "model", "--quiet", cache=tmp / "numba")
    return tmp / "model"


# a first generate in a new process: prints its text, then the module, qualified name and argument types of every
# function Numba compiled meanwhile
GENERATE = """
import sys
from numba.core import event
import tinyhun
seen = []
class Seen(event.Listener):
    def on_start(self, ev):
        seen.append((getattr(ev.data["dispatcher"], "py_func", None), ev.data["args"]))
    def on_end(self, ev):
        pass
event.register("numba:compile", Seen())
model = tinyhun.load(sys.argv[1])
print(repr("".join(tinyhun.generate(model, "Hello world", max_tokens=4))))
for f, args in seen:
    print(getattr(f, "__module__", ""), getattr(f, "__qualname__", f), "|", args)
"""
OPS = {"_rmsnorm.in_layer", "_add_rmsnorm.in_layer", "_rope.in_layer", "store_kv_kernel.in_layer",
       "attention_kernel.in_layer", "_silu_mul.in_layer", "_add.in_layer"}   # kernels.cpu_math.compiles_to's


def first_generate(model, cache):
    """(text, [(module, qualified name, argument types as text)] of each function compiled) of a first generate on
    `model` in a new process with the Numba cache `cache`."""
    r = subprocess.run([sys.executable, "-c", GENERATE, str(model)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NUMBA_CACHE_DIR": str(cache)})
    died = f" (killed by {signal.Signals(-r.returncode).name})" if r.returncode < 0 else ""
    assert r.returncode == 0, f"generate on {model}: exit {r.returncode}{died}\n{r.stderr[-3000:]}"
    text, *lines = r.stdout.splitlines()
    return text, [(*line.split(" | ", 1)[0].split(" ", 1), line.split(" | ", 1)[1]) for line in lines]


@pytest.mark.slow
def test_compile_then_cached_runs_match_and_do_not_crash(tmp_path, smollm2_q4_dir, tiny_q4):
    """fp32 and INT4 runs from one cache, each compiling first and then loading what it cached: the same output.
    The order is the one that made later runs die with SIGSEGV: a fused layer compiled while all its parallel
    callees were cache hits was cached without the hook that starts Numba's thread pool. SmolLM2 INT4 (`tinyhun
    bench`) caches the INT4 kernels and the ops, so the tiny-hunyuan fp32 run compiles its layer over cached ops,
    and the INT4 tiny-hunyuan, whose layer has SmolLM2's types, compiles nothing; the second round loads them all.
    And the ops a layer compiles are cached on their own (the fp32 layer compiles its layer and GEMMs, not them
    again), and no tinyhun function is compiled for a literal argument (a bare 0 types as Literal[int](0): a second
    copy of the kernel)."""
    cache = tmp_path / "numba"
    cli("bench", "--model", smollm2_q4_dir, *BENCH, cache=cache)
    runs = [[first_generate(model, cache) for model in (TINY, tiny_q4)] for _ in ("compile", "cached")]
    assert [text for text, _ in runs[0]] == [text for text, _ in runs[1]]
    assert not any(compiled for _, compiled in runs[1]), runs[1]
    fp32 = {name for _, name, _ in runs[0][0][1]}
    assert "decoder_layer" in fp32 and not OPS & fp32, sorted(fp32)
    literal = [(name, args) for _, compiled in runs[0] for module, name, args in compiled
               if module.startswith("tinyhun") and "Literal[" in args]
    assert not literal, literal
    cli("bench", "--model", tiny_q4, *BENCH, cache=cache)


# each kernel module imported first in a process of its own: the cache folder and the thread pool are set up
# before any kernel is defined, whichever module a caller imports first
CHECK = """
import importlib, os, sys
from pathlib import Path
import numba
mod = importlib.import_module(sys.argv[1])
from tinyhun.kernels import numba_env
where = numba_env.cache_dir()
want = (Path(os.environ["NUMBA_CACHE_DIR"]) if os.environ.get("NUMBA_CACHE_DIR")
        else Path(os.environ["TINYHUN_HOME"]) / "numba")
assert where.parent == want and len(where.name.removeprefix("tinyhun-")) == 16, (where, want)
numba.threading_layer()   # raises unless the thread pool has started
kernels = [(m.__name__, name, f) for m in list(sys.modules.values()) if m and m.__name__.startswith("tinyhun")
           for name, f in vars(m).items() if isinstance(f, numba.core.registry.CPUDispatcher)]
assert kernels, "no kernels"
for m, name, f in kernels:
    assert f._cache.cache_path and Path(f._cache.cache_path).is_relative_to(where), (m, name, f._cache.cache_path)
"""


@pytest.mark.slow
def test_every_kernel_module_caches_in_the_versioned_folder(tmp_path):
    names = sorted(p.stem for p in (ROOT / "kernels").glob("*.py")
                   if re.search(r"^@njit", p.read_text(encoding="utf-8"), re.MULTILINE))
    assert names
    envs = [{"NUMBA_CACHE_DIR": str(tmp_path / "numba")}, {"NUMBA_CACHE_DIR": "", "TINYHUN_HOME": str(tmp_path)}]
    procs = [(name, subprocess.Popen([sys.executable, "-c", CHECK, f"tinyhun.kernels.{name}"],
                                     env={**os.environ, **envs[i % 2]}, stderr=subprocess.PIPE, text=True))
             for i, name in enumerate(names)]
    for name, p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"importing tinyhun.kernels.{name} first:\n{err[-3000:]}"


def test_source_key_changes_with_any_source_file(tmp_path):
    from tinyhun.kernels import numba_env
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    before = numba_env.source_key([tmp_path / "pkg"])
    assert numba_env.source_key([tmp_path / "pkg"]) == before
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 3\n")
    assert numba_env.source_key([tmp_path / "pkg"]) != before


def test_a_top_level_kernels_import_keeps_the_cache_folder(tmp_path):
    """transformers probes for Hugging Face's `kernels` package by importing it, which from a checkout's root finds
    tinyhun's kernels/ folder and runs its setup a second time: the folder must stay the one other processes use."""
    code = ("import kernels, tinyhun.kernels\nfrom numba.core import config\nfrom tinyhun.kernels import numba_env\n"
            "print(config.CACHE_DIR)\nprint(numba_env.cache_dir())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}   # the root on sys.path, as a user has it
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**env, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    used, reported = r.stdout.split()
    assert Path(used) == Path(reported) and Path(used).parent == tmp_path, (used, reported)


def test_openblas_threads_stop_spinning_soon_unless_told_otherwise():
    """tinyhun sets OPENBLAS_THREAD_TIMEOUT before numpy first loads OpenBLAS (which reads it then), and a value the
    user set is kept."""
    code = ("import sys; assert 'numpy' not in sys.modules; import tinyhun, os; "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    for given, want in ((None, "16"), ("8", "8")):
        run_env = env if given is None else {**env, "OPENBLAS_THREAD_TIMEOUT": given}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == want, r.stderr[-2000:]
