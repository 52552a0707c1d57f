"""tinyhun: a from-scratch NumPy/Numba inference engine for Tencent's Hunyuan small language models."""
from pathlib import Path

from .config import Config
from .errors import TinyhunError
from .model import Model, State

__all__ = ["Config", "Model", "State", "TinyhunError", "load", "generate"]


def load(path, device="cpu", max_context=None, progress=False):
    """Load a model folder (config.json + safetensors [+ tokenizer]) -> Model."""
    from .weights import load_weights

    if device != "cpu":
        raise TinyhunError(f"device {device!r} is not supported (expected 'cpu')")
    path = Path(path)
    if not path.is_dir():
        raise TinyhunError(f"{path}: not a model folder")
    config = Config.from_file(path / "config.json")
    weights = load_weights(path, config, progress=progress)
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "hy.tiktoken").exists():
        from .tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(path)
    return Model(config, weights, tokenizer=tokenizer, max_context=max_context)


def generate(model, prompt, **kwargs):
    """Stream the text of a completion (see tinyhun.generation.generate)."""
    from .generation import generate as _generate
    return _generate(model, prompt, **kwargs)
