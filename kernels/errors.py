"""The one error type of tinyhun: a user error (bad file, bad argument, bad shape) whose message names what was
expected. It lives here, below the engine, so that the kernels and formats raise it without importing the engine;
`tinyhun.errors` re-exports it, and the CLI prints its one-line message and exits 2, no traceback."""


class TinyhunError(ValueError):
    """A user error: the CLI prints its one-line message and exits 2, no traceback."""
