"""Text <-> token ids for Hunyuan checkpoints, behaving like transformers' tokenizer on the same folder.

A folder has either tokenizer.json (the "hy_" vocabulary of Hunyuan-0.5B/1.8B/4B, read by the `tokenizers`
library) or hy.tiktoken (the older Hunyuan-7B/A13B vocabulary, converted to the same library by
tinyhun.tiktoken_bpe). The chat template is rendered with jinja2 exactly as apply_chat_template does; a folder
without one gets its vocabulary's built-in template from the model families (tinyhun/families).
"""
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from tinyhun.errors import TinyhunError, unreadable
from tinyhun.families import chat_templates, end_tokens
from tinyhun.tiktoken_bpe import tokenizer_from_tiktoken

# The named special tokens transformers passes to chat templates as variables (its special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end an answer whichever config names them, besides the families' own (families.end_tokens): the
# end-of-text token and ChatML's end of turn, which many vocabularies share and a model may emit instead.
END_TOKENS = ("<|endoftext|>", "<|im_end|>")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict:
    """The object in a JSON file, {} when the file does not exist."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as e:
        raise unreadable(path, e) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyhunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TinyhunError(f"{path}: expected a JSON object")
    return data


def _token_text(value, path, field):
    # tokenizer_config.json writes a token as a string or as an AddedToken dict {"content": ...}
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TinyhunError(f"{path}: {field} must be a string or {{\"content\": string}}")
    return value


def _id_list(value, path, field) -> list[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TinyhunError(f"{path}: {field} must be a token id or a list of token ids, got {value!r}")
    return values


def _load_backend(folder: Path) -> Backend:
    path = folder / "tokenizer.json"
    if path.exists():
        try:   # opened here first: the library's own error would not say why it cannot read the file
            path.open("rb").close()
        except PermissionError as e:
            raise unreadable(path, e) from None
        try:
            return Backend.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for every kind of bad file
            raise TinyhunError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    if (folder / "hy.tiktoken").exists():
        return tokenizer_from_tiktoken(folder / "hy.tiktoken")
    raise TinyhunError(f"{folder}: no tokenizer.json or hy.tiktoken")


def _file_template(folder: Path, config: dict):
    """(template text, file it came from) from chat_template.jinja or tokenizer_config.json, or (None, None)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():  # transformers gives this file priority over the config entry
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    path = folder / "tokenizer_config.json"
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TinyhunError(f"{path}: chat_template must be a string or a list with a 'default' entry")
    return template, path


class Tokenizer:
    def __init__(self, backend: Backend, template=None, template_tokens=None, stop_ids=(), bos_id=None,
                 name="tokenizer"):
        self._backend = backend
        self._template = template          # compiled jinja template, or None
        self._template_tokens = dict(template_tokens or {})
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = bos_id
        self.stop_ids: frozenset[int] = frozenset(stop_ids)
        self.name = name

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        folder = Path(path)
        if not folder.is_dir():
            raise TinyhunError(f"{folder}: not a folder")
        backend = _load_backend(folder)
        tok_cfg_path, gen_path, cfg_path = (folder / f for f in
                                            ("tokenizer_config.json", "generation_config.json", "config.json"))
        tok_cfg, gen_cfg, model_cfg = _read_json(tok_cfg_path), _read_json(gen_path), _read_json(cfg_path)

        tokens = {k: _token_text(tok_cfg.get(k), tok_cfg_path, k) for k in TEMPLATE_TOKENS}
        tokens = {k: v for k, v in tokens.items() if v is not None}
        bos_id = backend.token_to_id(tokens["bos_token"]) if "bos_token" in tokens else None
        if bos_id is None:
            bos_id = next(iter(_id_list(model_cfg.get("bos_token_id"), cfg_path, "bos_token_id")
                               + _id_list(gen_cfg.get("bos_token_id"), gen_path, "bos_token_id")), None)

        stops = set(_id_list(gen_cfg.get("eos_token_id"), gen_path, "eos_token_id"))
        for field in ("eos_token_id", "eod_token_id"):
            stops.update(_id_list(model_cfg.get(field), cfg_path, field))
        for text in (tokens.get("eos_token"),) + end_tokens() + END_TOKENS:
            if text is not None and backend.token_to_id(text) is not None:
                stops.add(backend.token_to_id(text))

        text, source = _file_template(folder, tok_cfg)
        if text is None:
            text = next((tmpl for needed, tmpl in chat_templates()
                         if all(backend.token_to_id(t) is not None for t in needed)), None)
            source = "built-in template"
        try:
            template = None if text is None else _jinja_env().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TinyhunError(f"{source}: chat template does not parse (line {e.lineno}: {e.message})") from None
        return cls(backend, template, tokens, stops, bos_id, name=str(folder))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Like transformers' tokenizer(text).input_ids: special-token strings in the text become their ids,
        and add_special_tokens applies tokenizer.json's post-processor (e.g. a leading BOS). Encode a rendered
        chat with add_special_tokens=False: the template already wrote its BOS."""
        if not isinstance(text, str):
            raise TinyhunError(f"encode expects a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt string apply_chat_template(messages, tokenize=False, ...) renders; extra kwargs
        (enable_thinking, tools, ...) are template variables."""
        if self._template is None:
            raise TinyhunError(f"{self.name} has no chat template; use --raw")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TinyhunError("chat messages must be a list of dicts with 'role' and 'content'")
        # transformers drops None-valued keys first (content=None breaks many templates)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self._template_tokens, **kwargs,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(variables)
        except (jinja2.TemplateError, TypeError) as e:
            raise TinyhunError(f"chat template of {self.name}: {e}") from None

    def backend_json(self) -> str:
        """The tokenizer as `tokenizers` JSON (what llguidance builds its own from: tinyhun.constrain)."""
        return self._backend.to_str()

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, without ever emitting half a character.

    Decodes a short window of recent ids and emits only what is new: in byte-level BPE one character
    (Chinese, emoji) may span several tokens, and a window whose text ends in U+FFFD is still waiting for the
    rest of its bytes. The window starts one emitted chunk back so that decoders which treat the first token
    specially (e.g. strip a leading space) see the same context as a full decode.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0   # window start: first id of the last emitted chunk
        self._read = 0     # ids before this index have been emitted

    def _new_text(self):
        done = self._tok.decode(self._ids[self._prefix:self._read])
        return done, self._tok.decode(self._ids[self._prefix:])

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done, text = self._new_text()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as decode() does)."""
        done, text = self._new_text()
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


def held_back(text, stops):
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
