"""Bad input as a new user meets it, through the command line: one line naming the file or field and what was
expected, exit 2, no traceback. (Errors of a single loader function are tested beside it, in test_checkpoint.py
and test_gguf.py.)"""
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

import tinyhun
from test_cli import TINY, assert_user_error, run
from test_checkpoint import write_raw
from test_gguf import write_tiny_gguf
from tinyhun.checkpoint import SafetensorsFile, open_folder
from tinyhun.errors import TinyhunError


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(TINY, dst)
    return dst


def edit_header(path, edit):
    """Rewrite a safetensors header in place (the data region stays as it is)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


# --- safetensors byte ranges: they must tile the data region (no overlap, no gap, nothing after) -----------------

def test_overlapping_tensors_are_refused_by_every_command(copy, tmp_path):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    edit_header(copy / "model.safetensors", lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))
    needles = ["model.safetensors", "overlap tensor"]
    assert_user_error(run("info", str(copy)), *needles)
    assert_user_error(run("generate", "hi", "--model", str(copy), "--quiet", "--max-tokens", "2"), *needles)
    assert_user_error(run("quantize", str(copy), str(tmp_path / "q"), "--quiet"), *needles)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("header, data, match", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, r"tensor 'b': data_offsets \[8, 24\] overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, 24, r"leave bytes \[8, 16\) .* to no tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, r"leave bytes \[0, 8\)"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "cover 8 bytes of the 12-byte data region"),
    ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "tensor 'a': .* overlap tensor 'b'"),
])
def test_offsets_must_tile_the_data_region(tmp_path, header, data, match):
    f = tmp_path / "x.safetensors"
    write_raw(f, header, b"\0" * data)
    with pytest.raises(TinyhunError, match=match):
        SafetensorsFile(f)


def test_well_tiled_files_still_load(tmp_path):
    f = tmp_path / "x.safetensors"
    write_raw(f, {"z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                  "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, np.arange(4, dtype="<f4").tobytes())
    np.testing.assert_array_equal(SafetensorsFile(f).get("b"), [2, 3])


def test_a_tensor_listed_twice_is_refused(tmp_path):
    f = tmp_path / "x.safetensors"
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [0, 4]}}'
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    with pytest.raises(TinyhunError, match="x.safetensors: corrupt header, key 'a' appears twice"):
        SafetensorsFile(f)


# --- a HuggingFace hub cache snapshot: shards are symlinks into ../../blobs ------------------------------------

def hub_snapshot(tmp_path, files):
    """Lay `files` {name: bytes} out as huggingface_hub's cache does: blobs named by hash, and a snapshot folder
    of relative symlinks to them."""
    repo = tmp_path / "hub" / "models--tencent--tiny"
    snap = repo / "snapshots" / "0123456789abcdef"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(f"../../blobs/{digest}", snap / name)
    return snap


def test_a_sharded_hub_cache_snapshot_loads(tmp_path):
    from safetensors.numpy import save_file
    src = SafetensorsFile(TINY / "model.safetensors")
    names = sorted(src.names)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    files = {p.name: p.read_bytes() for p in TINY.iterdir() if p.name != "model.safetensors"}
    for shard, part in shards.items():
        save_file({n: np.array(src.get(n)) for n in part}, tmp_path / shard)
        files[shard] = (tmp_path / shard).read_bytes()
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, part in shards.items() for n in part}}).encode()
    snap = hub_snapshot(tmp_path, files)

    loaded = open_folder(snap)
    for n in names:
        np.testing.assert_array_equal(loaded[n].get(n), src.get(n), err_msg=n)
    r, ref = run("info", str(snap)), run("info", str(TINY))
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in json.loads(r.stdout).items() if k != "path"} == \
           {k: v for k, v in json.loads(ref.stdout).items() if k != "path"}
    ids = [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(tinyhun.load(snap).logits(ids), tinyhun.load(TINY).logits(ids))


@pytest.mark.parametrize("rel", ["../outside.safetensors", "sub/../../outside.safetensors", "/abs.safetensors",
                                 "..\\outside.safetensors", ""])
def test_index_names_must_stay_inside_the_folder(copy, rel):
    index = {"weight_map": {n: "model.safetensors" for n in SafetensorsFile(copy / "model.safetensors").names}}
    index["weight_map"]["model.norm.weight"] = rel
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_user_error(run("info", str(copy)), "model.safetensors.index.json", "model.norm.weight",
                      "outside the model folder" if rel else "expected a file name")


# --- the prompt ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["prompt", "--system", "--stop"])
def test_a_prompt_that_is_not_utf8_is_refused_by_name(where):
    bad = b"\xff\xfe"
    args = [bad] if where == "prompt" else ["hi", where, bad]
    r = run("generate", *args, "--model", str(TINY), "--quiet", "--max-tokens", "2")
    assert_user_error(r, "the prompt" if where == "prompt" else where, "not valid UTF-8", "0xff")


def test_utf8_bytes_escaped_by_an_ascii_locale_are_read_as_utf8():
    from tinyhun.cli_args import text_arg
    assert text_arg("h\udcc3\udca9llo", "the prompt") == "héllo"    # b"h\xc3\xa9llo" through surrogateescape
    assert text_arg("日本語", "the prompt") == "日本語"


# --- destinations: quantize and convert --------------------------------------------------------------------------

def test_quantize_into_a_file_or_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_user_error(run("quantize", str(TINY), str(tmp_path / "file"), "--quiet"), "file", "is not a folder")
    assert_user_error(run("quantize", str(TINY), str(tmp_path / "file" / "q"), "--quiet"), "cannot be created")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_overwrite_is_a_flag_and_the_error_names_it(tmp_path, command):
    src = tmp_path / "tiny.gguf"
    if command == "convert":
        write_tiny_gguf(src)
    else:
        src = shutil.copytree(TINY, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run(command, str(src), str(out), "--quiet"), "out", "not empty", "--overwrite")
    assert (out / "keep.txt").exists()
    r = run(command, str(src), str(out), "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    if command == "quantize":   # --overwrite never reaches the source
        assert_user_error(run("quantize", str(src), str(tmp_path), "--quiet", "--overwrite"), "holds the source")


# --- what a new user passes by mistake ------------------------------------------------------------------------

def test_not_a_model_folder_or_not_a_config(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["info", str(tmp_path / "empty")], ["quantize", str(tmp_path / "empty"), str(tmp_path / "q")],
                 ["generate", "hi", "--model", str(tmp_path / "empty"), "--quiet"]):
        assert_user_error(run(*args), "empty/config.json", "not found")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    for args in (["info", str(tmp_path / "list")], ["quantize", str(tmp_path / "list"), str(tmp_path / "q")]):
        assert_user_error(run(*args), "list/config.json", "expected a JSON object")
    (tmp_path / "dir.safetensors").mkdir()
    shutil.copy(TINY / "config.json", tmp_path / "dir.safetensors" / "config.json")
    (tmp_path / "dir.safetensors" / "model.safetensors").mkdir()
    assert_user_error(run("info", str(tmp_path / "dir.safetensors")), "model.safetensors", "is a folder")
    assert not (tmp_path / "q").exists()


def test_bad_gguf_sources(tmp_path):
    good = tmp_path / "tiny.gguf"
    write_tiny_gguf(good)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:5000])
    assert_user_error(run("convert", str(tmp_path / "cut.gguf"), str(tmp_path / "out")), "cut.gguf", "truncated")
    (tmp_path / "dir.gguf").mkdir()
    assert_user_error(run("convert", str(tmp_path / "dir.gguf"), str(tmp_path / "out")), "dir.gguf", "not a file")
    assert_user_error(run("convert", str(tmp_path / "none.gguf"), str(tmp_path / "out")), "none.gguf", "not found")
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "cut.gguf"), "--quiet",
                          env={"TINYHUN_HOME": str(tmp_path / "home")}), "cut.gguf", "truncated")
    (tmp_path / "file").write_text("x")
    assert_user_error(run("convert", str(good), str(tmp_path / "file" / "out")), "cannot be created")
    assert_user_error(run("convert", str(good), str(tmp_path)), "holds the source")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
