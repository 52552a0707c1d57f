"""Loading: every malformed checkpoint or config gives a clear TinyhunError naming the file/field; bf16/f16 load."""
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import tinyhun
from oracle import build_hunyuan
from tinyhun.checkpoint import SafetensorsFile
from tinyhun.errors import TinyhunError
from tinyhun.families import load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_hunyuan(path, seed=1)
    return path


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny, dst)
    return dst


def tensors(path):
    f = SafetensorsFile(path / "model.safetensors")
    return {n: np.array(f.get(n)) for n in f.names}


def write_raw(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_config(path, **kw):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(kw)
    (path / "config.json").write_text(json.dumps(cfg))


def expect(match, fn, *args):
    with pytest.raises(TinyhunError, match=match):
        fn(*args)


def test_truncated_file(copy):
    f = copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect(r"model\.safetensors: tensor '.*': .*run past the end", tinyhun.load, copy)
    f.write_bytes(b"\x01\x02")
    expect("truncated", tinyhun.load, copy)


def test_corrupt_and_oversized_header(copy):
    f = copy / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    expect("not valid JSON", tinyhun.load, copy)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    expect("corrupt header", tinyhun.load, copy)


def test_unknown_dtype_and_bad_offsets(tmp_path):
    f = tmp_path / "x.safetensors"
    write_raw(f, {"a": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    expect("tensor 'a': unknown dtype 'F8_E9'", SafetensorsFile, f)
    write_raw(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8)
    expect("tensor 'a': data_offsets .* do not match shape", SafetensorsFile, f)
    write_raw(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    expect("tensor 'a': data_offsets .* run past the end", SafetensorsFile, f)


def test_missing_unexpected_and_misshapen_tensors(copy):
    t = tensors(copy)
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in t.items() if k != name}, copy / "model.safetensors")
    expect(f"missing tensor '{name}'", tinyhun.load, copy)
    save_file({**t, "model.layers.7.extra.weight": np.zeros(3, np.float32)}, copy / "model.safetensors")
    expect("unexpected tensor 'model.layers.7.extra.weight'", tinyhun.load, copy)
    save_file({**t, name: t[name][:-1]}, copy / "model.safetensors")
    expect(rf"tensor '{name}' has shape \[95, 64\], expected \[96, 64\]", tinyhun.load, copy)
    save_file({**t, name: t[name].astype(np.int32)}, copy / "model.safetensors")
    expect(f"'{name}' has dtype I32, expected a float type", tinyhun.load, copy)


def test_quantize_refuses_an_incomplete_checkpoint(copy, tmp_path):
    from tinyhun.quantize import quantize_model
    t = tensors(copy)
    name = "model.layers.0.self_attn.k_proj.weight"
    save_file({k: v for k, v in t.items() if k != name}, copy / "model.safetensors")
    expect(f"missing tensor '{name}'", quantize_model, copy, tmp_path / "q", 32, True, "q8", False)
    assert not (tmp_path / "q").exists()


def test_sharded_index_and_escape(copy, tmp_path):
    t = tensors(copy)
    names = sorted(t)
    half = len(names) // 2
    (copy / "model.safetensors").unlink()
    save_file({n: t[n] for n in names[:half]}, copy / "a.safetensors")
    save_file({n: t[n] for n in names[half:]}, copy / "b.safetensors")
    index = {"weight_map": {n: ("a" if i < half else "b") + ".safetensors" for i, n in enumerate(names)}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = [3, 1, 4, 1, 5]
    ref_dir = tmp_path / "ref"
    build_hunyuan(ref_dir, seed=1)
    np.testing.assert_array_equal(tinyhun.load(copy).logits(ids), tinyhun.load(ref_dir).logits(ids))

    shutil.copy(copy / "a.safetensors", tmp_path / "outside.safetensors")
    index["weight_map"][names[0]] = "../outside.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    expect("points outside the model folder", tinyhun.load, copy)
    (copy / "model.safetensors.index.json").write_text("[1, 2]")
    expect("not a valid index", tinyhun.load, copy)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_checkpoints_convert_once(copy, dtype):
    t = tensors(copy)
    if dtype == "f16":
        half = {k: v.astype(np.float16) for k, v in t.items()}
        want = {k: v.astype(np.float32) for k, v in half.items()}
        save_file(half, copy / "model.safetensors")
    else:
        bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in t.items()}
        want = {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()}
        header, blobs, off = {}, [], 0
        for k, b in bits.items():
            header[k] = {"dtype": "BF16", "shape": list(b.shape), "data_offsets": [off, off + b.nbytes]}
            blobs.append(b.tobytes())
            off += b.nbytes
        write_raw(copy / "model.safetensors", header, b"".join(blobs))
    model = tinyhun.load(copy)
    np.testing.assert_array_equal(model.weights.embed.w, want["model.embed_tokens.weight"])
    np.testing.assert_array_equal(model.weights.layers[0].mlp.down.w, want["model.layers.0.mlp.down_proj.weight"])
    assert model.weights.embed.w.dtype == np.float32


@pytest.mark.parametrize("edit, match", [
    (dict(hidden_size=None), "missing required field 'hidden_size'"),
    (dict(use_cla=True), "'use_cla: true' is not supported"),
    (dict(attention_bias=True), "'attention_bias: true' is not supported"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(vocab_size="big"), "'vocab_size'='big': expected a positive integer"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope type 'yarn' is not supported"),
])
def test_config_errors_name_the_field(copy, edit, match):
    edit_config(copy, **edit)
    expect(match, tinyhun.load, copy)


def test_config_ignores_unknown_keys_and_reads_hub_style(copy):
    edit_config(copy, use_qk_norm=True, org_vocab_size=256, class_num=0, pool_type="last", rope_parameters=None,
                rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0, "beta_fast": 32})
    cfg = load_config(copy / "config.json")
    assert cfg.rope_base == pytest.approx(10000.0 * 1000.0 ** (16 / 14))
    assert cfg.qk_norm and cfg.tie_word_embeddings and cfg.head_dim == 16


def test_not_a_model_folder(tmp_path):
    expect("not a model folder", tinyhun.load, tmp_path / "nope")
    expect("config.json: not found", tinyhun.load, tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    expect("config.json: not a readable JSON", tinyhun.load, tmp_path)
