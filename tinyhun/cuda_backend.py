"""Only for tinyhun/cli.py's GPU check (`from .cuda_backend import require_cuda`) until it imports
tinyhun.backends.cuda itself: the CUDA backend lives in tinyhun/backends/. Delete this file then."""
from .backends.cuda import require_cuda

__all__ = ["require_cuda"]
