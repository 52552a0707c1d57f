"""Request bodies of the OpenAI-compatible API as pydantic models, and the API's error (OpenAI's JSON shape).

Unknown fields are refused (a misspelt parameter would otherwise be silently ignored), except the few that
clients send routinely and that change nothing here (`user`, `metadata`, `store`, `service_tier`).
"""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..sampling import SamplingParams

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16   # choices per request (each a sequence of its own in the engine)


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status, message, param=None, code=None, type_=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Number = StrictFloat | StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr   # a JSON object, as text (OpenAI's shape)


class ToolCall(_Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    reasoning_content: StrictStr | None = None   # a previous answer's thinking, sent back: not put in the prompt
    tool_calls: list[ToolCall] | None = None     # an assistant's calls, sent back for the next turn
    tool_call_id: StrictStr | None = None        # a tool message: the call it answers

    def text(self):
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """The parameters both endpoints share. Ranges are OpenAI's where it has one."""
    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=0)] = 0
    min_p: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    metadata: dict | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    # constrained decoding, llama.cpp's / vLLM's extensions (tinyhun.constrain): at most one of them
    grammar: StrictStr | None = None           # Lark, or GBNF
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    json_schema: dict | None = None

    def stops(self):
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def sampling(self, default_temperature, index=0):
        """The SamplingParams of the request's choice `index` (its seed is the request's + index); a
        TinyhunError for values the sampler refuses."""
        return SamplingParams(temperature=default_temperature if self.temperature is None else self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty,
                              seed=None if self.seed is None else (self.seed + index) % 2**63,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)


class JsonSchemaFormat(_Strict):
    name: StrictStr
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None             # checked by tinyhun.tool_calls.check_tools
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: StrictBool = True
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    style: StrictStr | None = None      # extension: a reply-style preset (tinyhun chat --list-styles)
    think: StrictBool | None = None     # extension: thinking on/off for thinking models (default: the model's)

    def limit(self):
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Ids = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None   # 0: with echo, score the prompt only
    prompt: (StrictStr | Ids | Annotated[list[StrictStr], Field(min_length=1)]
             | Annotated[list[Ids], Field(min_length=1)])
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None   # legacy API: the top n (0 = the token's own)
    echo: StrictBool = False

    def limit(self):
        return self.max_tokens

    def prompts(self):
        """The prompts as a list, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


def parse(cls, data):
    """data (decoded JSON) as a `cls`, or a 400 ApiError naming the first bad field and what was expected."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not _is_union_branch(p)) or "body"
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"{where}: unknown field (not supported by this server)", param=where) from None
        if err["type"] == "missing":
            raise ApiError(400, f"{where}: required field missing", param=where) from None
        raise ApiError(400, f"{where}: {err['msg']} (got {_short(err.get('input'))})", param=where) from None


def _is_union_branch(part):
    # pydantic names the union member it tried in the location ('str', 'list[int]', 'function-after[...]')
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
