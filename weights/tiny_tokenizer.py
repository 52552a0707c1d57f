"""Write a tiny Hunyuan-style ("hy_" vocabulary) tokenizer folder, bit for bit the same on every run.

    python weights/tiny_tokenizer.py OUT_DIR

Byte-level BPE (256 byte symbols + merges trained on the built-in English/Chinese text below) with a
DeepSeek-V3-style pre-tokenizer like the real Hunyuan-0.5B one, the hy_ control tokens appended after the
BPE vocabulary (as in the real 120818-token vocabulary, where they start at 120000), a BOS post-processor
and a jinja chat template in the Hunyuan-0.5B format. transformers' AutoTokenizer loads the folder, so
tests use it as the oracle for tinyhun.tokenizer.
"""
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜hy_begin▁of▁sentence｜>"
EOS = "<｜hy_end▁of▁sentence｜>"
PAD = "<｜hy_pad｜>"
USER = "<｜hy_User｜>"
ASSISTANT = "<｜hy_Assistant｜>"
END_OF_TURN = "<｜hy_place▁holder▁no▁2｜>"
END_OF_SYSTEM = "<｜hy_place▁holder▁no▁3｜>"
NO_GENERATION_PROMPT = "<｜hy_place▁holder▁no▁8｜>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, END_OF_TURN, END_OF_SYSTEM, NO_GENERATION_PROMPT]
BPE_VOCAB = 448  # 256 byte symbols + 192 merges; with the specials the vocabulary has 456 entries

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the woods.
Once upon a time there was a little model that wanted to talk. It read books, it wrote answers, and it
learned that the answer to most questions starts with a good question. What is the capital of France?
The capital of France is Paris. How many legs does a spider have? A spider has eight legs.
Numbers: 1, 2, 3, 10, 42, 100, 2024, 3.14159. Code: def add(a, b): return a + b
你好，世界！今天天气很好，我们一起去公园散步吧。人工智能正在改变我们的生活和工作方式。
我是一个小小的语言模型，我喜欢回答问题。中国的首都是北京。一年有十二个月，一周有七天。
请问你叫什么名字？我的名字叫混元。谢谢你的帮助！不客气，很高兴为你服务。
"""

# The hy_ pre-tokenizer splits in three passes (digit runs of up to 3, CJK/kana runs, then a GPT-4o-like
# pattern) before the byte-level mapping; the real tokenizer.json has the same shape.
DIGITS = r"\p{N}{1,3}"
CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
GENERAL = (r"""[!-/:-@\[-`{-~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Hunyuan-0.5B format (spec 4.2): BOS, system text closed by no_3, user turns, assistant turns closed by the
# end-of-turn token, then either the assistant header (plus an empty think block when thinking is off) or no_8.
CHAT_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for message in messages if message['role'] == 'system' -%}
    {%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- if ns.system -%}
    {{- '<｜hy_place▁holder▁no▁3｜>' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<｜hy_User｜>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<｜hy_Assistant｜>' + message['content'] + eos_token -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('unsupported role: ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<｜hy_Assistant｜>' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}
        {{- '<think>\\n\\n</think>\\n' -}}
    {%- endif -%}
{%- else -%}
    {{- '<｜hy_place▁holder▁no▁8｜>' -}}
{%- endif -%}
"""


def build(out_dir) -> int:
    """Write tokenizer.json and tokenizer_config.json into out_dir; return the vocabulary size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(GENERAL), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # added after training so they get the ids after the BPE vocabulary, as in the real vocabulary
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": END_OF_TURN,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python weights/tiny_tokenizer.py OUT_DIR")
    print(f"wrote {sys.argv[1]} (vocab {build(sys.argv[1])})")
