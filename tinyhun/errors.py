"""tinyhun's user error (defined beside the kernels, which raise it too, and re-exported here)."""
from .kernels.errors import TinyhunError

__all__ = ["TinyhunError"]
