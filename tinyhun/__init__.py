"""tinyhun: a from-scratch NumPy/Numba inference engine for Tencent's Hunyuan small language models."""
import os
import warnings

# Before numpy loads OpenBLAS, which reads it only then (a process that imported numpy first keeps OpenBLAS's
# default): after a BLAS call OpenBLAS's threads spin for a long while by default, taking the cores from the Numba
# kernels that run next; a short spin keeps back-to-back BLAS calls warm and gives the cores back soon after.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

from pathlib import Path  # noqa: E402

from .errors import TinyhunError  # noqa: E402
from .kv_cache import KVCache  # noqa: E402
from .model import Model  # noqa: E402

DEVICES = ("cpu", "cuda")

__all__ = ["KVCache", "Model", "TinyhunError", "load", "generate", "stream_generate"]


def load(path, device=None, max_context=None, progress=False, kernels=None, adapter=None, adapter_mode=None,
         kv_dtype=None, kv_memory=None):
    """Load a model folder (config.json + safetensors [+ tokenizer]) -> Model. kernels: the backend that runs it,
    "numba" (the default), "numpy" (the references) or "cuda" (an NVIDIA GPU through numba-cuda, the `cuda`
    extra); also TINYHUN_KERNELS. device: a deprecated spelling of the same choice ("cuda" is kernels="cuda",
    "cpu" a CPU backend); given with kernels, the two must agree. adapter: a peft LoRA adapter folder, merged into
    the weights (adapter_mode="merge", the default for a float base) or run as a side path beside them ("side",
    the default for a quantized base: tinyhun.adapters). max_context: the most tokens a cache holds (default the
    checkpoint's max_position_embeddings); kv_dtype: the KV cache's storage, "fp16" (default), "int8" or "fp32"
    (also TINYHUN_KV_DTYPE); kv_memory: bytes its pool may hold (default half the memory available), used as
    tokens arrive."""
    from .backends import select
    from .families import load_config
    from .weights import load_weights

    kernels = backend_name(device, kernels)
    path = Path(path)
    if not path.is_dir():
        raise TinyhunError(f"{path}: not a model folder")
    if not (path / "config.json").exists():
        raise TinyhunError(f"{path / 'config.json'}: not found (a model folder needs a config.json)")
    config = load_config(path / "config.json")
    backend = select(kernels)   # before the weights: a missing GPU fails fast
    weights = load_weights(path, config, progress=progress)
    if adapter is not None:
        from . import adapters
        from .config import read_json
        a = adapters.read_adapter(adapter)
        weights = adapters.attach(weights, config, a, adapter_mode)
        adapters.check_base(a, path.resolve(), read_json(path / "config.json").get("_name_or_path"))
    elif adapter_mode is not None:
        raise TinyhunError(f"adapter_mode={adapter_mode!r} given without an adapter")
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "hy.tiktoken").exists():
        from .tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(path)
    return Model(config, weights, tokenizer=tokenizer, backend=backend, max_context=max_context, kv_dtype=kv_dtype,
                 kv_memory=kv_memory)


def backend_name(device, kernels):
    """The backend load's arguments name: kernels, or what the deprecated `device` says (None: the default, or
    TINYHUN_KERNELS); a device that contradicts kernels is a TinyhunError."""
    if device is None:
        return kernels
    warnings.warn("tinyhun.load(device=...) is deprecated: name the backend with kernels= (\"cuda\" for the GPU)",
                  DeprecationWarning, stacklevel=3)
    if device not in DEVICES:
        raise TinyhunError(f"device {device!r} is not supported (expected one of {', '.join(DEVICES)})")
    if kernels is None:
        return "cuda" if device == "cuda" else None
    if (device == "cuda") != (kernels == "cuda"):
        raise TinyhunError(f"device={device!r} contradicts kernels={kernels!r}: give kernels alone (\"numba\", "
                           "\"numpy\" or \"cuda\")")
    return kernels


def generate(model, prompt, **kwargs):
    """Stream the text of a completion (see tinyhun.generation.generate)."""
    from .generation import generate as _generate
    return _generate(model, prompt, **kwargs)


def stream_generate(model, prompt, **kwargs):
    """Per-token results of a completion (see tinyhun.generation.stream_generate)."""
    from .generation import stream_generate as _stream
    return _stream(model, prompt, **kwargs)
