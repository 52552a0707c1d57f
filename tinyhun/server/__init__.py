"""`tinyhun serve`: an OpenAI-compatible HTTP server (starlette on uvicorn) over one shared model, with
continuous batching across a bounded set of sequence slots (scheduler.py)."""
import threading

from ..errors import TinyhunError
from .options import Settings

__all__ = ["Settings", "create_app", "serve"]


def __getattr__(name):
    # the app (starlette, the scheduler, the engine) only when asked for: the command line imports this package for
    # serve's options on every command
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(load, settings, host="127.0.0.1", port=8080, log_level="info"):
    """Run until interrupted. The HTTP server runs in a thread; this (main) thread loads the model (load() ->
    (Model, name); /health says 503 meanwhile) and then runs the engine, whose Numba kernels are fastest here."""
    import uvicorn

    from .app import create_app
    app = create_app(load, settings, background=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="tinyhun-http", daemon=True)
    http.start()
    state = app.state.server
    try:
        while not server.started and http.is_alive():
            http.join(0.05)
        if not http.is_alive():   # uvicorn has logged why (e.g. the port is taken)
            raise TinyhunError(f"the HTTP server could not start on {host}:{port}")
        state.load(engine_thread=False)
        if state.engine is not None:
            state.engine.run()   # until the lifespan's shutdown closes it
        else:
            http.join()          # a failed load: /health says why until the process is stopped
    finally:
        server.should_exit = True
        http.join(timeout=10)
