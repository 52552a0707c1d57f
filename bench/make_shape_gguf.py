"""A GGUF of the Hunyuan-0.5B shape as a Llama model, random weights in Q4_0: the same file for llama.cpp's
`llama-bench` and tinyhun (`tinyhun convert FILE DIR` keeps the Q4_0 bits), so a peer comparison runs both engines
on identical bytes.

    python bench/make_shape_gguf.py --out /tmp/hunyuan-0.5b-shape.gguf [--layers 24] [--seed 0] [--embd q8_0]

Shape (Hunyuan-0.5B's config): hidden 1024, 24 layers, 16 query / 8 KV heads of 128, MLP 3584, vocabulary
120818, tied embeddings, context 32768, RoPE base 10000 * alpha^(d / (d - 2)) with NTK alpha 1000 (Hunyuan's
dynamic NTK at its trained alpha, as a fixed base). Matrices are Q4_0; the tied embedding / lm_head is Q8_0 by
default, as tinyhun's own INT4 quantization keeps it (llama.cpp's quantizer would pick Q6_K, which tinyhun would
dequantize to fp32: not the comparison wanted). The tokenizer is a byte-level BPE (tokenizer.ggml.model "gpt2",
the one kind both engines read, with the "llama-bpe" pre-tokenizer: llama.cpp refuses tinyhun's plain "gpt2" and
tinyhun has no "hunyuan-dense"): the 256 byte tokens, then merged pairs and triples up to id 120000, then control
tokens as in Hunyuan's hy_ vocabulary (BOS 120000, pad 120002, EOS 120020). Weights are random: the file is for
speed, not text.
"""
import argparse
import itertools
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

SHAPE = dict(hidden=1024, layers=24, heads=16, kv_heads=8, head_dim=128, ffn=3584, vocab=120818, context=32768,
             rms_eps=1e-5, ntk_alpha=1000.0)
FIRST_CONTROL, BOS, PAD, EOS = 120000, 120000, 120002, 120020   # Hunyuan's hy_ vocabulary's ids
ARCH = "llama"


def byte_alphabet():
    """GPT-2's byte -> printable character table: byte-level BPE spells every token with these."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) if b in keep else chr(256 + extra.index(b)) for b in range(256)]


def vocabulary(size):
    """(tokens, merges): the 256 byte tokens, then pairs of them ("a b" merges), then pair + byte triples
    ("ab c") up to FIRST_CONTROL, then control tokens up to `size`. Every merge's parts are earlier tokens, so
    both engines' BPE reads it as a real one."""
    chars = byte_alphabet()
    tokens, merges = list(chars), []
    pairs = ((a, b) for a, b in itertools.product(chars, repeat=2))
    triples = ((a + b, c) for a, b in itertools.product(chars, repeat=2) for c in chars)
    for left, right in itertools.chain(pairs, triples):
        if len(tokens) == FIRST_CONTROL:
            break
        tokens.append(left + right)
        merges.append(f"{left} {right}")
    names = {BOS: "<｜hy_begin▁of▁sentence｜>", PAD: "<｜hy_pad｜>", EOS: "<｜hy_end▁of▁sentence｜>"}
    tokens += [names.get(i, f"<｜hy_place▁holder▁no▁{i - FIRST_CONTROL}｜>")
               for i in range(FIRST_CONTROL, size)]
    return tokens, merges


def add_metadata(w, s, layers):
    rope_base = 10000.0 * s["ntk_alpha"] ** (s["head_dim"] / (s["head_dim"] - 2))
    w.add_name("Hunyuan-0.5B shape (random weights)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for key, value in (("block_count", layers), ("context_length", s["context"]), ("embedding_length", s["hidden"]),
                       ("feed_forward_length", s["ffn"]), ("attention.head_count", s["heads"]),
                       ("attention.head_count_kv", s["kv_heads"]), ("attention.key_length", s["head_dim"]),
                       ("attention.value_length", s["head_dim"]), ("rope.dimension_count", s["head_dim"]),
                       ("vocab_size", s["vocab"])):
        w.add_uint32(f"{ARCH}.{key}", value)
    w.add_float32(f"{ARCH}.rope.freq_base", rope_base)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", s["rms_eps"])
    tokens, merges = vocabulary(s["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    controls = len(tokens) - FIRST_CONTROL
    w.add_token_types([gguf.TokenType.NORMAL] * FIRST_CONTROL + [gguf.TokenType.CONTROL] * controls)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return rope_base


def add_tensors(w, s, layers, rng, embd_type):
    h, f, d = s["hidden"], s["ffn"], s["head_dim"]
    q, kv = s["heads"] * d, s["kv_heads"] * d

    def matrix(name, rows, cols, qtype=T.Q4_0):
        # std 0.02 as HF initialises: activations stay finite through 24 layers
        values = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    def norm(name):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(h, dtype=np.float32)).astype(np.float32))

    matrix("token_embd.weight", s["vocab"], h, embd_type)   # tied: no output.weight
    norm("output_norm.weight")
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", q, h)
        matrix(f"blk.{i}.attn_k.weight", kv, h)
        matrix(f"blk.{i}.attn_v.weight", kv, h)
        matrix(f"blk.{i}.attn_output.weight", h, q)
        matrix(f"blk.{i}.ffn_gate.weight", f, h)
        matrix(f"blk.{i}.ffn_up.weight", f, h)
        matrix(f"blk.{i}.ffn_down.weight", h, f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    p.add_argument("--layers", type=int, default=SHAPE["layers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embd", choices=["q8_0", "q4_0"], default="q8_0",
                   help="the tied embedding / lm_head's type (default q8_0, as tinyhun's INT4 keeps it)")
    args = p.parse_args()
    if args.layers < 1:
        p.error(f"--layers must be at least 1, got {args.layers}")
    t0 = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".partial")   # no half-written file under the asked name
    w = gguf.GGUFWriter(str(tmp), ARCH)
    rope_base = add_metadata(w, SHAPE, args.layers)
    add_tensors(w, SHAPE, args.layers, np.random.default_rng(args.seed), T[args.embd.upper()])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(args.out)
    print(f"{args.out}: {args.layers} layers, rope base {rope_base:.6g}, {args.out.stat().st_size / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
