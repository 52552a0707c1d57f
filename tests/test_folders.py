"""The one atomic folder writer (tinyhun/folders.py): all or nothing, replace only when asked, leftovers of killed
writers swept and never taken for a model."""
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from oracle import ROOT
from tinyhun import folders, hub
from tinyhun.errors import TinyhunError
from tinyhun.folders import atomic_folder

TINY = ROOT / "weights" / "tiny-hunyuan"


def write(dst, files, overwrite=False, fail=False):
    with atomic_folder(dst, overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
        if fail:
            raise RuntimeError("mid-write")


def contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def leftover(parent, name, pid, host=None, kind="partial", files=("config.json",)):
    p = parent / f".{name}.{host or folders._host()}-{pid}.0123abcd.{kind}"
    p.mkdir()
    for f in files:
        (p / f).write_text("{}")
    return p


def age(path, seconds):
    t = time.time() - seconds
    for p in [path, *path.iterdir()]:
        os.utime(p, (t, t))


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_finished_write_appears_whole_with_ordinary_permissions(tmp_path):
    dst = tmp_path / "sub" / "m"
    write(dst, {"config.json": "{}", "model.safetensors": "x"})
    assert contents(dst) == {"config.json": "{}", "model.safetensors": "x"}
    assert hidden(dst.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_every_file_gets_an_ordinary_files_mode(tmp_path, mask):
    """safetensors' writer creates its file 0600 and a copy keeps its source's mode: the finished folder's files
    have 0666 less the umask, whoever wrote them (a container's user reads what the host's wrote)."""
    src = tmp_path / "private.json"
    src.write_text("{}")
    src.chmod(0o600)
    old = os.umask(mask)
    try:
        assert folders.umask() == mask
        with atomic_folder(tmp_path / "m") as tmp:
            folders.write_checkpoint(tmp, {"w": np.zeros(4, np.float32)}, {"model_type": "llama"})
            shutil.copy2(src, tmp / "tokenizer.json")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x.txt").write_text("x")
            assert (tmp / "model.safetensors").stat().st_mode & 0o777 == 0o600   # what the writer itself does
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "sub/x.txt"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_quantize_writes_a_folder_others_can_read(tmp_path):
    from tinyhun.quantize import quantize_model
    old = os.umask(0o022)
    try:
        quantize_model(TINY, tmp_path / "q4", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q4").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_an_exception_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        write(tmp_path / "m", {"config.json": "{}"}, fail=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        write(tmp_path / "m", {"config.json": "new"}, overwrite=True, fail=True)
    assert contents(tmp_path / "m") == {"config.json": "old"} and hidden(tmp_path) == []


def test_replace_only_when_asked(tmp_path):
    dst = tmp_path / "m"
    dst.mkdir()
    write(dst, {"a": "1"})                          # an empty folder is filled
    assert contents(dst) == {"a": "1"}
    with pytest.raises(TinyhunError, match="m: folder exists and is not empty .*--overwrite"):
        write(dst, {"b": "2"})
    assert contents(dst) == {"a": "1"}
    write(dst, {"b": "2"}, overwrite=True)
    assert contents(dst) == {"b": "2"} and hidden(tmp_path) == []


def test_a_failed_swap_restores_the_old_folder(tmp_path, monkeypatch):
    dst = tmp_path / "m"
    write(dst, {"a": "old"})
    rename = os.rename

    def flaky(src, target):
        if str(src).endswith(".partial") and target == dst and any(p.suffix == ".old" for p in tmp_path.iterdir()):
            raise OSError(errno.EIO, "injected")
        rename(src, target)
    monkeypatch.setattr(folders.os, "rename", flaky)
    with pytest.raises(TinyhunError, match="m: could not write the model folder"):
        write(dst, {"a": "new"}, overwrite=True)
    assert contents(dst) == {"a": "old"} and hidden(tmp_path) == []


def test_check_destination_refuses_files_sources_and_unwritable_parents(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TinyhunError, match="file: exists and is not a folder"):
        folders.check_destination(tmp_path / "file", overwrite=True)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "src.gguf").write_text("x")
    with pytest.raises(TinyhunError, match="holds the source"):
        folders.check_destination(tmp_path / "m", overwrite=True, sources=[tmp_path / "m" / "src.gguf"])
    with pytest.raises(TinyhunError, match="cannot be created"):
        folders.check_destination(tmp_path / "file" / "out")


def test_stale_leftovers_are_swept_live_ones_kept(tmp_path):
    mine = folders._host()
    dead = leftover(tmp_path, "m", dead_pid())                                  # killed here: removed
    live = leftover(tmp_path, "m", os.getppid())                                # its owner still runs: kept
    remote = leftover(tmp_path, "m", 1, host="other-host")                      # another host, recent: kept
    remote_old = leftover(tmp_path, "n", 1, host="other-host")                  # another host, idle: removed
    age(remote_old, folders.STALE_AFTER_S + 60)
    old_of_missing = leftover(tmp_path, "gone", dead_pid(), kind="old", files=("keep.txt",))   # restored
    legacy = tmp_path / ".m.partial"                                            # an older tinyhun's, idle
    legacy.mkdir()
    (legacy / "model.safetensors").write_text("x")
    age(legacy, folders.STALE_AFTER_S + 60)
    foreign = tmp_path / ".photos.partial"                                      # not a model folder: kept
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    age(foreign, folders.STALE_AFTER_S + 60)
    assert mine != "other-host"

    write(tmp_path / "x", {"config.json": "{}"})
    assert not dead.exists() and not remote_old.exists() and not legacy.exists() and not old_of_missing.exists()
    assert live.exists() and remote.exists() and foreign.exists()
    assert contents(tmp_path / "gone") == {"keep.txt": "{}"}


def test_leftovers_are_never_listed_as_models(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    leftover(models, hub.DEFAULT_NAME, os.getppid())
    write(models / "real", {"config.json": "{}"})
    assert [name for name, _, _ in hub.list_models(tmp_path)] == ["real"]
    assert len(hidden(models)) == 1   # its owner (our parent process) is alive: kept, and still not listed


KILLED_WRITER = """
    import os, signal, sys
    from tinyhun.folders import atomic_folder
    from tinyhun.cli import exit_cleanly_on_signals
    if sys.argv[2] == "TERM":
        exit_cleanly_on_signals()
    with atomic_folder(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), getattr(signal, "SIG" + sys.argv[2]))
"""


@pytest.mark.parametrize("sig, code", [("KILL", -9), ("TERM", 143)])
def test_a_killed_writer_leaves_nothing_a_model_lookup_sees(tmp_path, sig, code):
    """SIGTERM (as the CLI sets it up) cleans up on the way out; SIGKILL leaves the temp folder, and the next
    write into the same parent removes it because its owner is gone."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(tmp_path / "m"), sig])
    assert r.returncode == code
    assert not (tmp_path / "m").exists()
    assert len(hidden(tmp_path)) == (1 if sig == "KILL" else 0)
    write(tmp_path / "other", {"config.json": "{}"})
    assert hidden(tmp_path) == []
