"""`tinyhun serve`: an OpenAI-compatible HTTP server (starlette on uvicorn) over one shared model, with
continuous batching across a bounded set of sequence slots (scheduler.py)."""
from .app import Settings, create_app

__all__ = ["Settings", "create_app", "serve"]


def serve(load, settings, host="127.0.0.1", port=8080, log_level="info"):
    """Run until interrupted. load() -> (Model, name) runs in the background: /health says 503 until it returns."""
    import uvicorn
    uvicorn.run(create_app(load, settings), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
