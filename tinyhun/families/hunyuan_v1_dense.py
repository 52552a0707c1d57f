"""Hunyuan dense V1 (Hunyuan-0.5B/1.8B/4B/7B, `hunyuan_v1_dense` in transformers): Llama's blocks in Llama's order,
plus a per-head RMSNorm of q and k applied after RoPE (query_layernorm / key_layernorm, the reverse of Qwen3's
order: blocks.attention applies them when the layer's weights carry them), and RoPE's NTK-alpha base."""
from dataclasses import dataclass
from typing import ClassVar

from . import llama

MODEL_TYPE = "hunyuan_v1_dense"

# Hunyuan's two vocabularies, recognised by their tokens (tinyhun.tokenizer and tinyhun.thinking ask the families):
# the "hy_" one of Hunyuan-0.5B/1.8B/4B (tokenizer.json) and the tiktoken one of Hunyuan-7B/A13B (hy.tiktoken).
# Built-in chat templates for folders whose tokenizer_config.json has none, in transformers' jinja dialect.
# The hy_ format: system text first, then <｜hy_User｜>/<｜hy_Assistant｜> turns, each answer closed by
# placeholder 2, the end of turn; enable_thinking=false pre-fills an empty think block, as Tencent's template does.
HY_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for m in messages if m['role'] == 'system' -%}
    {%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}
{%- endfor -%}
{{- '<｜hy_begin▁of▁sentence｜>' + ns.system + ('<｜hy_place▁holder▁no▁3｜>' if ns.system else '') -}}
{%- for m in messages if m['role'] != 'system' -%}
    {%- if m['role'] == 'user' -%}{{- '<｜hy_User｜>' + m['content'] -}}
    {%- elif m['role'] == 'assistant' -%}{{- '<｜hy_Assistant｜>' + m['content'] + '<｜hy_place▁holder▁no▁2｜>' -}}
    {%- else -%}{{- raise_exception('unsupported role: ' + m['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<｜hy_Assistant｜>' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n' -}}{%- endif -%}
{%- else -%}{{- '<｜hy_place▁holder▁no▁8｜>' -}}
{%- endif -%}
"""
# The tiktoken format (Hunyuan-A13B's own template without its tools part): a system prompt opens the first
# turn, every other user turn opens with <|startoftext|>; the model answers right after <|extra_0|>.
OLD_TEMPLATE = """\
{%- for m in messages -%}
    {%- if m['role'] == 'system' and loop.first -%}{{- '<|startoftext|>' + m['content'] + '<|extra_4|>' -}}
    {%- elif m['role'] == 'user' -%}
        {{- ('' if loop.index0 == 1 and messages[0]['role'] == 'system' else '<|startoftext|>') -}}
        {{- m['content'] + '<|extra_0|>' -}}
    {%- elif m['role'] == 'assistant' -%}{{- m['content'] + '<|eos|>' -}}
    {%- else -%}{{- raise_exception('unsupported role: ' + m['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n' -}}{%- endif -%}
"""
CHAT_TEMPLATES = (  # (tokens the vocabulary must have, template)
    (("<｜hy_User｜>", "<｜hy_Assistant｜>", "<｜hy_place▁holder▁no▁2｜>"), HY_TEMPLATE),
    (("<|startoftext|>", "<|extra_4|>", "<|extra_0|>", "<|eos|>"), OLD_TEMPLATE),
)
# The end of turn of each format, and the hy_ end of sentence a model may emit instead
END_TOKENS = ("<｜hy_place▁holder▁no▁2｜>", "<｜hy_end▁of▁sentence｜>", "<|eos|>")
# A control token of each vocabulary: a model that has one was trained on THINK_SWITCH
VOCAB_MARKERS = ("<｜hy_User｜>", "<|extra_0|>")
# Prefixes of a user message that switch thinking on and off (Tencent's model cards), for templates that do not
# read enable_thinking
THINK_SWITCH = ("/think", "/no_think")


@dataclass(frozen=True)
class Config(llama.Config):
    qk_norm: ClassVar[bool] = True

    # Tencent's model cards give 256K of context to the NTK-alpha RoPE (alpha 1000) that config.json's 32K
    # max_position_embeddings understates; without alpha the checkpoint's own figure holds
    ALPHA_CONTEXT: ClassVar[int] = 262144

    @property
    def context_limit(self):
        return max(self.max_position_embeddings, self.ALPHA_CONTEXT if self.rope_alpha else 0)

    @staticmethod
    def check(f):
        # cross-layer attention (Hunyuan-Large's use_cla) is not in transformers 5 and not here
        f.reject("use_cla")
        if f.d.get("use_qk_norm") is False:
            raise f.error("'use_qk_norm: false' is not supported for hunyuan_v1_dense")

    @staticmethod
    def rope_base_of(f, head_dim):
        """Hunyuan's "dynamic" type with `alpha` is a static NTK-alpha rescale of the base, theta * alpha^(d/(d-2)),
        independent of sequence length (Tencent's code and transformers 5 both do this)."""
        kind, p = f.rope()
        if kind == "default":
            return float(p["rope_theta"])
        if kind == "dynamic" and p.get("alpha"):
            alpha = p["alpha"]
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                raise f.error(f"rope alpha={alpha!r}: expected a positive number")
            return float(p["rope_theta"]) * float(alpha) ** (head_dim / (head_dim - 2))
        raise f.error(f"rope type {kind!r} is not supported (supported: default, dynamic with alpha)")


decoder_layer = llama.decoder_layer   # the same block order


def checkpoint_shapes(cfg):
    d = cfg.head_dim
    return llama.checkpoint_shapes(cfg, {"self_attn.query_layernorm": (d,), "self_attn.key_layernorm": (d,)})


def sanitize(cfg, read, make_mlp=llama.read_dense_mlp):
    return llama.sanitize(cfg, read, make_mlp=make_mlp, norms=lambda a: (read(a + "query_layernorm.weight"),
                                                                         read(a + "key_layernorm.weight")))
