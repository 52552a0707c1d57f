class TinyhunError(ValueError):
    """A user error (bad file, bad argument): the CLI prints its one-line message and exits 2, no traceback."""
