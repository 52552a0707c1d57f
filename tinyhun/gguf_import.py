"""Importing a GGUF file (llama.cpp's format) as an HF-format folder that tinyhun and transformers both load.

The `gguf` package parses the file; this module maps its Llama metadata to a LlamaConfig-style config.json, its
tensors to HF names (the family's GGUF_NAMES: tinyhun/families; dequantized to fp32, Q/K rows un-permuted), and
its vocabulary to a tokenizer.json.
`read_gguf` also hands out each tensor's raw blocks, row by row, so a later importer can keep Q4 weights packed.
"""
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .errors import TinyhunError
from .families import config_from_dict, family_of, gguf_family
from .folders import atomic_folder, check_destination, write_checkpoint, write_json
from .kernels import q4, q8

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE, as a `tokenizers` pre-tokenizer.
# transformers' GGUF converter ignores "smollm" (plain GPT-2 split); llama.cpp and SmolLM's own tokenizer.json
# split every digit off first. They differ only on whitespace runs before a digit ("a  1"); we follow the model.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _llama3_split():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {  # name -> (pre-tokenizer factory, BPE ignore_merges as llama.cpp sets it)
    "gpt2": (_gpt2_split, False),
    **{name: (_digits_then_gpt2, False) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (_llama3_split, True) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")},
}
CONTROL, USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")   # llama.cpp's per-layer names


@dataclass(frozen=True)
class GGUFTensor:
    name: str              # GGUF name, e.g. "blk.0.attn_q.weight"
    ggml_type: str         # e.g. "F32", "Q4_1"
    shape: tuple           # HF (row-major) order: (rows, cols) for a matrix, (n,) for a vector
    raw: np.ndarray        # uint8 [rows, row_bytes], a read-only view of the file: each row is whole blocks

    def dequantize(self) -> np.ndarray:
        """fp32 values, `shape`."""
        if not can_dequantize(self.ggml_type):
            raise TinyhunError(f"tensor {self.name}: ggml type {self.ggml_type} cannot be dequantized "
                               "(supported: F32, F16, BF16 and the Q*/IQ* block types)")
        return gguf.quants.dequantize(self.raw, gguf.GGMLQuantizationType[self.ggml_type]).reshape(self.shape)


@functools.cache
def can_dequantize(ggml_type: str) -> bool:
    """Whether the gguf package can dequantize this type (it has no list: try one block of zeros)."""
    qtype = gguf.GGMLQuantizationType[ggml_type]
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


@dataclass
class GGUFFile:
    path: Path
    metadata: dict         # key -> Python value (str, int, float, bool, list)
    tensors: dict          # GGUF name -> GGUFTensor, in file order

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture")

    def arch_key(self, key, default=None):
        """`<architecture>.<key>`, e.g. arch_key("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file: metadata eagerly, tensor data as memory-mapped views (nothing is read until used)."""
    path = Path(path)
    if not path.is_file():
        raise TinyhunError(f"{path}: {'not a file' if path.exists() else 'not found'} (expected a .gguf file)")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))   # GGUF lists dims fastest-first
            rows = int(np.prod(shape[:-1], dtype=np.int64))
            tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data.view(np.uint8).reshape(rows, -1))
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        # gguf reports a truncated file as a failed reshape or view, so the cause is named generically
        raise TinyhunError(f"{path}: not a valid GGUF file, or truncated "
                           f"(expected a complete GGUF v2/v3 file: {str(e).splitlines()[0]})") from None
    return GGUFFile(path, metadata, tensors)


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. Within each head GGUF interleaves the two RoPE halves (rows 0, d/2, 1,
    d/2+1, ...) because llama.cpp rotates adjacent pairs; HF rotates halves. Rows only move, so this applies
    bit-exactly to raw quantized rows [rows, row_bytes] as to fp32 [rows, cols]."""
    rows = a.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    half = rows // n_head // 2
    return np.ascontiguousarray(a.reshape(n_head, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


def _f32(x) -> float:
    # GGUF stores these as float32 (1e-5 reads back as 9.99999974e-06); write the shortest float32 spelling
    return float(str(np.float32(x)))


def llama_config(g: GGUFFile) -> dict:
    """config.json as transformers' LlamaConfig writes it (plus the legacy rope_theta/torch_dtype keys)."""
    family = gguf_family(g.architecture, f"{g.path}: general.architecture")

    def need(key):
        v = g.arch_key(key)
        if v is None:
            raise TinyhunError(f"{g.path}: missing metadata {g.architecture}.{key}")
        return v

    if g.arch_key("expert_count", 0):
        raise TinyhunError(f"{g.path}: {g.architecture}.expert_count > 0: mixture-of-experts is not supported")
    scaling = g.arch_key("rope.scaling.type", "none")
    if scaling != "none":
        raise TinyhunError(f"{g.path}: {g.architecture}.rope.scaling.type {scaling!r} is not supported")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = g.arch_key("attention.key_length", hidden // heads)
    for key in ("rope.dimension_count", "attention.value_length"):
        if g.arch_key(key, head_dim) != head_dim:
            raise TinyhunError(f"{g.path}: {g.architecture}.{key}={g.arch_key(key)} != head_dim {head_dim}: "
                               "not supported")
    if "token_embd.weight" not in g.tensors:
        raise TinyhunError(f"{g.path}: no tensor token_embd.weight")
    theta = _f32(g.arch_key("rope.freq_base", 10000.0))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": family.MODEL_TYPE,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "hidden_act": "silu",
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "hidden_size": hidden, "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": g.arch_key("attention.head_count_kv", heads), "head_dim": head_dim,
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta, "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "max_position_embeddings": g.arch_key("context_length", 2048),
        # the vocabulary size is the embedding's row count (llama.vocab_size is optional metadata)
        "vocab_size": g.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "dtype": "float32", "torch_dtype": "float32",
    }
    for field in ("bos", "eos", "padding"):
        token_id = g.metadata.get(f"tokenizer.ggml.{field}_token_id")
        if token_id is not None:
            cfg[f"{'pad' if field == 'padding' else field}_token_id"] = token_id
    return cfg


def hf_name(family, gguf_name: str):
    """The checkpoint (HF) name of a GGUF tensor in the family's naming (its GGUF_NAMES, GGUF_LAYER_NAMES), or
    None when it has none (e.g. rope_freqs.weight)."""
    if gguf_name in family.GGUF_NAMES:
        return family.GGUF_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m[2] in family.GGUF_LAYER_NAMES:
        return f"model.layers.{m[1]}.{family.GGUF_LAYER_NAMES[m[2]]}.weight"
    return None


def tensor_plan(g: GGUFFile, cfg: dict) -> list:
    """[(hf_name, GGUFTensor, heads)] for every tensor, checked against the family's shape table for the config;
    `heads` is the head count to un-permute rows with (q_proj, k_proj), else None."""
    config = config_from_dict(cfg, str(g.path))
    family = family_of(config)
    expected, plan = family.checkpoint_shapes(config), []
    for t in g.tensors.values():
        name = hf_name(family, t.name)
        if name not in expected:
            raise TinyhunError(f"{g.path}: tensor {t.name} has no place in a {family.MODEL_TYPE} model with this "
                               "config")
        if t.shape != expected[name]:
            raise TinyhunError(f"{g.path}: tensor {t.name} has shape {list(t.shape)}, "
                               f"expected {list(expected[name])}")
        if not can_dequantize(t.ggml_type):   # fail before writing anything, not halfway through
            raise TinyhunError(f"{g.path}: tensor {t.name} has ggml type {t.ggml_type}, which cannot be "
                               "dequantized (expected F32, F16, BF16 or a Q*/IQ* block type)")
        heads = (config.num_heads if name.endswith("q_proj.weight")
                 else config.num_kv_heads if name.endswith("k_proj.weight") else None)
        plan.append((name, t, heads))
    missing = expected.keys() - {name for name, _, _ in plan}
    if missing:
        raise TinyhunError(f"{g.path}: missing tensor {sorted(missing)[0]} ({len(missing)} missing in all)")
    return plan


def build_tokenizer(g: GGUFFile) -> Tokenizer:
    """The byte-level BPE tokenizer the metadata describes, with control tokens as special added tokens."""
    meta = g.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TinyhunError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2', "
                           "a byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")   # files older than the key used the GPT-2 split
    if pre not in PRE_TOKENIZERS:
        raise TinyhunError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not supported "
                           f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TinyhunError(f"{g.path}: missing tokenizer.ggml.tokens or tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise TinyhunError(f"{g.path}: tokenizer.ggml.merges entry {bad!r} is not two tokens separated by a space")
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    ends = {e: _token_id(g, e) for e in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{e}_token")}
    ends = {e: i for e, i in ends.items() if i is not None}
    if ends:   # e.g. a leading BOS, added by encode(add_special_tokens=True) as transformers does
        bos, eos = ([tokens[ends[e]]] if e in ends else [] for e in ("bos", "eos"))
        tok.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B"] + eos,
            special_tokens=[(tokens[i], i) for i in set(ends.values())])
    return tok


def _token_id(g: GGUFFile, name: str):
    """tokenizer.ggml.<name>_token_id, checked against the vocabulary; None when absent."""
    token_id = g.metadata.get(f"tokenizer.ggml.{name}_token_id")
    if token_id is not None and not 0 <= token_id < len(g.metadata["tokenizer.ggml.tokens"]):
        raise TinyhunError(f"{g.path}: tokenizer.ggml.{name}_token_id {token_id} is outside the vocabulary")
    return token_id


def tokenizer_files(g: GGUFFile, cfg: dict) -> tuple:
    """(tokenizer_config.json, generation_config.json) contents."""
    meta, tokens = g.metadata, g.metadata["tokenizer.ggml.tokens"]
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "model_max_length": cfg["max_position_embeddings"],
               "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _token_id(g, key)
        if token_id is not None:
            tok_cfg[f"{name}_token"] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    # stop on the end-of-turn token as well as EOS, when the file names a different one (llama.cpp does)
    stops = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "pad_token_id") if k in cfg}
    if stops:
        gen_cfg["eos_token_id"] = stops[0] if len(set(stops)) == 1 else list(dict.fromkeys(stops))
    return tok_cfg, gen_cfg


IMPORTERS = {"Q4_0": q4.from_gguf_q4_0, "Q4_1": q4.from_gguf_q4_1, "Q8_0": q8.from_gguf_q8_0}


def convert_gguf(path, out_dir, progress=True, overwrite=False, keep_quantized=True, extra_files=None) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json, and extra_files {name: text}) from a Llama GGUF. Everything is checked before
    writing, and the folder is written atomically (tinyhun/folders.py): a failure leaves nothing behind, and a
    non-empty `out_dir` is replaced only when overwrite.

    keep_quantized: Q4_0/Q4_1 matrices are repacked bit for bit into tinyhun's INT4 format and Q8_0 ones into its
    INT8 one (no requantization), and the config gets a quantization block; every
    other tensor (and every tensor when keep_quantized is False) is dequantized to fp32."""
    out = Path(out_dir)
    check_destination(out, overwrite, sources=[path])
    g = read_gguf(path)
    cfg = llama_config(g)
    plan = tensor_plan(g, cfg)
    tokenizer = build_tokenizer(g)
    tok_cfg, gen_cfg = tokenizer_files(g, cfg)
    tensors, cfg = convert_tensors(g, plan, cfg, keep_quantized, progress)
    with atomic_folder(out, overwrite) as tmp:
        write_checkpoint(tmp, tensors, cfg)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        write_json(tmp / "generation_config.json", gen_cfg)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def convert_tensors(g: GGUFFile, plan: list, cfg: dict, keep_quantized: bool, progress: bool) -> tuple:
    """({checkpoint name: array}, config with the quantization block when blocks were kept) for a tensor_plan."""
    tensors, kept = {}, set()
    for name, t, heads in tqdm(plan, desc=f"converting {g.path.name}", unit="tensor", disable=not progress):
        importer = IMPORTERS.get(t.ggml_type) if keep_quantized and len(t.shape) == 2 else None
        if importer:
            raw = unpermute_rows(t.raw, heads) if heads else t.raw
            for part, a in importer(raw, *t.shape).to_arrays().items():
                tensors[name[:-len("weight")] + part] = a
            kept.add(t.ggml_type)
            continue
        values = t.dequantize()
        tensors[name] = unpermute_rows(values, heads) if heads else np.ascontiguousarray(values)
    if kept:
        cfg = {**cfg, "quantization": {"format": q4.FORMAT, "version": q4.LAYOUT_VERSION, "group": 32,
                                       "sym": "Q4_1" not in kept, "source": "gguf " + "+".join(sorted(kept))}}
    return tensors, cfg
