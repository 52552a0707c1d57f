"""Writing a model folder atomically: the one writer behind `tinyhun quantize`, `tinyhun convert` and the default
model cache (which also fetches its GGUF into one of these temp folders).

Files go into a temp folder beside the destination, `.<name>.<host>-<pid>.<8 hex>.partial`; they and the folder are
fsync'ed, then one rename puts the folder in place, so a reader sees the old destination or the whole new one, never
half of one. Replacing a non-empty destination is done only when asked: the old folder is renamed aside
(`….old`), the new one renamed in, and the old one restored if that fails, deleted once it succeeded.

A writer stopped by an exception, Ctrl-C or (through the CLI) SIGTERM/SIGHUP removes its temp folder on the way
out; one killed outright (SIGKILL, power loss) leaves it behind. So every write first sweeps the parent it writes
into: a temp folder of ours is removed when its owner is gone (same host, and no process with its pid), or when
nothing in it has changed for STALE_AFTER_S (an owner on another host sharing the folder, a pid reused since, or
an older tinyhun's temp folder, recognised by its name and by holding only model files); a stale `.old` whose
destination is missing (killed between the two renames) is renamed back instead. Temp names start with a dot and
model listings skip hidden folders, so a leftover is never taken for a model, even before it is swept.

Every file of the finished folder gets the mode an ordinary new file gets (0666 less the umask): safetensors'
writer creates model.safetensors 0600 and a copy keeps its source's mode, and a folder prepared by one user is
read by another (a container's own user over a read-only mount).
"""
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import save_file

from .errors import TinyhunError

STALE_AFTER_S = 24 * 3600
_OURS = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>partial|old)")
# what tinyhun before this writer left: .<name>.partial, .<name>.<8 chars>.partial / .staging, holding only these
_LEGACY = re.compile(r"\..+\.(partial|staging)")
_LEGACY_FILES = re.compile(r"config\.json|model\.safetensors|tokenizer(_config)?\.json|generation_config\.json|"
                           r"special_tokens_map\.json|chat_template\.jinja|hy\.tiktoken|\.tinyhun-complete|\.tmp\w+")


def _host():
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def check_destination(dst, overwrite=False, sources=()):
    """Refuse, before any work is done, a destination that cannot or must not become the new folder: a file, a
    non-empty folder (unless overwrite), a folder holding one of `sources`, or one whose parent is not writable."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise TinyhunError(f"{dst}: exists and is not a folder (the output must be a new or empty folder)")
    for src in map(Path, sources):
        if src.exists() and (src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents):
            raise TinyhunError(f"{dst}: holds the source {src}; choose a new output folder (the source is never "
                               "overwritten)")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise TinyhunError(f"{dst}: folder exists and is not empty (choose another, delete it, or pass "
                           "--overwrite to replace it)")
    ancestor = dst.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise TinyhunError(f"{dst}: cannot be created ({ancestor} is not a writable folder)")


@contextmanager
def temp_folder(parent, name):
    """Yield a new, empty `.<name>.<host>-<pid>.<8 hex>.partial` folder in `parent` (created if missing, swept
    first), and remove it when the block ends, whatever happens."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep(parent)
        tmp = parent / f".{name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}.partial"
        tmp.mkdir()
    except OSError as e:
        raise TinyhunError(f"{parent / name}: could not create the folder ({e.strerror or e})") from None
    try:
        yield tmp
    finally:
        _remove(tmp)


@contextmanager
def atomic_folder(dst, overwrite=False):
    """Yield an empty temp folder beside `dst`; when the block finishes, it becomes `dst` (see the module doc).
    On any exception, KeyboardInterrupt included, the temp folder is removed and `dst` is left as it was."""
    dst = Path(dst)
    with temp_folder(dst.parent, dst.name) as tmp:
        try:
            yield tmp
            mode = 0o666 & ~umask()
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    os.chmod(f, mode)
                    _fsync(f)
            _fsync(tmp)
            _move_into_place(tmp, dst, overwrite)
            _fsync(dst.parent)
        except OSError as e:
            raise TinyhunError(f"{dst}: could not write the model folder ({e.strerror or e})") from None


def umask():
    """The process's umask, read without changing it where Linux says it (os.umask can only set it, and setting it
    even briefly would change the mode of what another thread creates meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_checkpoint(folder, tensors, config):
    """model.safetensors and config.json into `folder`; the config's quantization block is repeated in the file's
    own metadata, so the file names its format."""
    path = Path(folder) / "model.safetensors"
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "quantization": json.dumps(config.get("quantization"))})
    except SafetensorError as e:   # the Rust writer reports I/O errors (disk full, ...) as its own type
        raise OSError(f"{path}: {e}") from None
    write_json(Path(folder) / "config.json", config)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sweep(parent):
    """Remove (or restore, for a `.old`) what killed writers left in `parent`; see the module doc."""
    for p in Path(parent).iterdir():
        ours = _OURS.fullmatch(p.name)
        if not (ours or _legacy(p)) or not p.is_dir() or p.is_symlink() or not _stale(p, ours):
            continue
        target = p.with_name(ours["name"]) if ours and ours["kind"] == "old" else None
        try:
            if target is not None and not target.exists():
                os.rename(p, target)
            else:
                _remove(p)
        except OSError:
            pass   # another sweeper got there first, or it is not ours to delete: leave it


def _legacy(p):
    try:
        return bool(_LEGACY.fullmatch(p.name)) and p.is_dir() and all(
            f.is_file() and _LEGACY_FILES.fullmatch(f.name) for f in p.iterdir())
    except OSError:
        return False


def _stale(p, ours):
    if ours and ours["host"] == _host() and not _alive(int(ours["pid"])):
        return True
    try:
        newest = max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()])
    except OSError:
        return False
    return time.time() - newest > STALE_AFTER_S


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def _move_into_place(tmp, dst, overwrite):
    try:
        os.rename(tmp, dst)   # dst absent, or an empty folder (rename replaces one)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:   # filled since check_destination looked
            raise TinyhunError(f"{dst}: folder exists and is not empty (pass --overwrite to replace it)") from None
    old = tmp.with_name(tmp.name[:-len("partial")] + "old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _remove(old)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
