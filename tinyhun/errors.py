"""tinyhun's user error (defined beside the kernels, which raise it too, and re-exported here)."""
import os
import pwd

from .kernels.errors import TinyhunError

__all__ = ["TinyhunError", "unreadable"]


def unreadable(path, e: OSError) -> TinyhunError:
    """The error for a file that cannot be read: with its owner and mode when permissions are why (a model folder
    prepared by one user and served by another, e.g. a container's own user over a read-only mount)."""
    if not isinstance(e, PermissionError):
        return TinyhunError(f"{path}: cannot be read ({e.strerror or e})")
    try:
        st = os.stat(path)
    except OSError:   # the folder itself is closed to us: say which
        return TinyhunError(f"{path}: cannot be read (permission denied on its folder; this process runs as uid "
                            f"{os.geteuid()})")
    return TinyhunError(f"{path}: cannot be read (permission denied: owner {_user(st.st_uid)}, mode "
                        f"{st.st_mode & 0o7777:04o}; this process runs as uid {os.geteuid()}: make it readable, "
                        "e.g. chmod a+r, or run as its owner)")


def _user(uid):
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
