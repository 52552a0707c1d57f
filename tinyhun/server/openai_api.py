"""POST /v1/chat/completions, and the pieces POST /v1/completions shares (completions_api.py): a checked request
becomes engine Jobs, whose events become OpenAI's response objects, whole or as server-sent-event chunks.

Both answers come from the same events, so a streamed and a non-streamed request with the same seed say the same
thing. Text goes through one Output per choice on its way out (thinking split from the answer, the content
filter's masking), which holds back only what it must.
"""
import asyncio
import json
import time
import uuid
from dataclasses import asdict

from ..errors import TinyhunError
from ..generation import Step
from ..sampling import make_sampler
from ..tool_calls import format_for, prompt_messages
from . import output, structured
from .jobs import Job, PromptLogprobs, QueueFull
from .schemas import ApiError, ChatRequest
from .tokens import TokenAligned

DEFAULT_TEMPERATURE = output.DEFAULT_TEMPERATURE
RETRY_AFTER_S = 1


class Events:
    """The engine thread's events for one job, handed to the event loop."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:   # the loop is closed: the server is shutting down
            pass

    async def next(self):
        event = await self.queue.get()
        if isinstance(event, TinyhunError):
            raise ApiError(400, str(event))
        if isinstance(event, Exception):
            raise ApiError(500, f"generation failed: {type(event).__name__}: {event}")
        return event


class Run:
    """One job: its events, its Output, the counts the usage and the metrics need."""

    def __init__(self, server, model, ids, req, max_tokens, text_out, logprobs, top_logprobs, prompt_logprobs=None,
                 index=0, wrap=None):
        """index: the choice's number among the request's n (its seed is the request's + index); wrap: the
        request's constraint and bias around its sampler (structured.sampler_wrap), or None."""
        self.server, self.ids, self.out = server, ids, text_out
        self.started = time.monotonic()
        self.first_token_at = None
        self.events = Events(asyncio.get_running_loop())
        try:
            sampler = make_sampler(**asdict(req.sampling(DEFAULT_TEMPERATURE, index)))
        except TinyhunError as e:
            raise ApiError(400, str(e)) from None
        if wrap is not None:
            sampler = wrap(sampler)
        self.job = Job(ids, sampler, max_tokens, self.events, req.stops(), logprobs, top_logprobs, prompt_logprobs,
                       model)
        self.steps, self.prompt_scores = [], None
        self.finish_reason, self.closed = None, False
        self.score_only = False   # echo with max_tokens=0: the one token sampled is not part of the answer

    def submit(self):
        try:
            self.server.engine.submit(self.job)
        except QueueFull:
            self.server.metrics.rejected.inc()
            raise ApiError(429, "the server is busy: every slot is generating and the queue is full; retry shortly",
                           code="server_busy", type_="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except TinyhunError as e:   # it could never fit in the KV memory
            raise ApiError(400, str(e), param="max_tokens", code="exceed_kv_memory") from None

    async def deltas(self):
        """Yield (step, reasoning text, content text) per token, then the flush at the end as (None, r, c)."""
        while True:
            event = await self.events.next()
            if isinstance(event, PromptLogprobs):
                self.prompt_scores = event
                continue
            step: Step = event
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.server.metrics.ttft.observe(self.first_token_at - self.started)
            self.steps.append(step)
            reasoning, content = self.out.step(step)
            yield step, reasoning, content
            if step.finish_reason:
                self.finish_reason = step.finish_reason
                reasoning, content = self.out.flush()
                yield None, reasoning, content
                return

    def cancel(self):
        """Called in every case when the run ends (more than once is one call): a no-op for a finished job, frees
        the slot for one still going (the client went away)."""
        if self.closed:
            return
        self.closed = True
        if self.finish_reason is None:
            self.server.metrics.cancelled.inc()
        self.server.engine.cancel(self.job)
        m = self.server.metrics
        m.latency.observe(time.monotonic() - self.started)
        if self.steps:
            m.prompt_tokens.inc(self.steps[-1].prompt_tokens)
            m.cached_tokens.inc(self.steps[-1].cached_tokens)
            m.completion_tokens.inc(len(self.steps))

    def usage(self):
        s = self.steps[-1] if self.steps else None
        prompt = len(self.ids)
        done = s.completion_tokens if s and not self.score_only else 0
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": s.cached_tokens if s else 0}}


def _max_tokens(server, requested, n_prompt, param):
    ctx = server.engine.max_context
    if requested is not None and requested > server.max_tokens:
        raise ApiError(400, f"{param}={requested}: above this server's limit of {server.max_tokens} (MAX_TOKENS)",
                       param=param)
    if n_prompt >= ctx:
        raise ApiError(400, f"the prompt is {n_prompt} tokens, the context is {ctx}: no room to generate; "
                       "shorten the prompt", param="messages", code="exceed_context_size")
    if requested is None:
        return min(server.max_tokens, ctx - n_prompt)
    if n_prompt + requested > ctx:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + {param} ({requested}) = {n_prompt + requested} exceeds "
                       f"the context of {ctx} tokens; shorten the prompt or lower {param}", param=param,
                       code="exceed_context_size")
    return requested


def _submit(runs):
    """Submit every run, or none: a full queue cancels those already in."""
    submitted = []
    try:
        for run in runs:
            run.submit()
            submitted.append(run)
    except ApiError:
        for run in submitted:
            run.finish_reason = "cancelled"
            run.cancel()
        raise


def _usage(runs):
    """The prompt counted once (the n choices of a request share it, as OpenAI counts), the completions summed."""
    u = [r.usage() for r in runs]
    prompt, done = u[0]["prompt_tokens"], sum(x["completion_tokens"] for x in u)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": u[0]["prompt_tokens_details"]}


class Streamed:
    """A streamed answer: its chunks, and the runs they come from, which the response cancels however it ends.
    The chunks' own `finally` is not enough: a client gone while the response starts (before the chunks are
    first iterated) would leave a never-started generator, and its job running to max_tokens."""

    def __init__(self, chunks, runs=()):
        self.chunks, self.runs = chunks, runs if isinstance(runs, (list, tuple)) else [runs]

    def close(self):
        for run in self.runs:
            run.cancel()


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- chat ----

def _token_entry(tok, token, logprob, top):
    text = tok.decode([token], skip_special_tokens=False)
    entry = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    entry["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for t, lp in ((tok.decode([i], skip_special_tokens=False), lp) for i, lp in top or ())]
    return entry


def _message(m):
    d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


async def chat(server, req: ChatRequest):
    model = server.model_named(req.model)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tok = server.model.tokenizer
    if not tok.has_chat_template:
        raise ApiError(400, f"model {server.model_name!r} has no chat template: use /v1/completions", param="messages")
    tools = structured.tools_of(server, req)
    try:
        messages, variables = prompt_messages(tok, tools.fmt if tools else format_for(tok),
                                              [_message(m) for m in req.messages],
                                              tools.tools if tools and tools.offered else None)
    except TinyhunError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    prompt = output.chat_prompt(server, messages, req.style, req.think, variables)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": req.model}
    if prompt.refusal is not None:
        return _refusal(req, head, prompt.refusal, 0)
    ids = tok.encode(prompt.text, add_special_tokens=False)
    max_tokens = _max_tokens(server, req.limit(), len(ids), "max_completion_tokens" if req.max_completion_tokens
                             is not None else "max_tokens")
    wrap = await structured.sampler_wrap(server, req, prompt.text, True, tools)

    def text_out():   # streamed with logprobs: each token's logprob goes out with its text, held back as long as it is
        out = prompt.output()
        return TokenAligned(tok, out) if req.stream and req.logprobs else out
    runs = [Run(server, model, ids, req, max_tokens, text_out(), req.logprobs, req.top_logprobs or 0, index=i,
                wrap=wrap) for i in range(req.n)]
    _submit(runs)
    if req.stream:
        return Streamed(_chat_stream(server, runs, req, head, tools), runs)
    return await _chat_whole(server, runs, req, head, tools)


def _tool_call(index, call):
    call_id, name, arguments = call
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _finish(run, n_calls):
    return "tool_calls" if n_calls and run.finish_reason == "stop" else run.finish_reason


def _refusal(req, head, text, n_prompt):
    usage = {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt,
             "prompt_tokens_details": {"cached_tokens": 0}}
    if not req.stream:
        return {**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": "content_filter"}]}

    async def chunks():
        chunk = {**head, "object": "chat.completion.chunk"}
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": "content_filter"}]})
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**chunk, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    return Streamed(chunks())


async def _chat_whole(server, runs, req, head, tools):
    choices = []
    try:
        for i, run in enumerate(runs):
            choices.append(await _chat_choice(server, run, req, i, tools))
    finally:
        for run in runs:
            run.cancel()
    return {**head, "object": "chat.completion", "usage": _usage(runs), "choices": choices}


async def _chat_choice(server, run, req, index, tools):
    reasoning, content, entries = [], [], []
    tok = server.model.tokenizer
    async for step, r, c in run.deltas():
        reasoning.append(r)
        content.append(c)
        if step is not None and req.logprobs:
            entries.append(_token_entry(tok, step.token, step.logprob, step.top_logprobs))
    message = {"role": "assistant", "content": "".join(content)}
    parser = tools.parser() if tools else None
    calls = []
    if parser is not None:
        text, calls = parser.push(message["content"])
        rest, more = parser.flush()
        text, calls = text + rest, calls + more
        if calls:
            message = {"role": "assistant", "content": text.strip() or None,
                       "tool_calls": [{k: v for k, v in _tool_call(i, c).items() if k != "index"}
                                      for i, c in enumerate(calls)]}
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return {"index": index, "message": message, "logprobs": {"content": entries} if req.logprobs else None,
            "finish_reason": _finish(run, len(calls))}


async def _chat_stream(server, runs, req, head, tools):
    tok = server.model.tokenizer
    usage = req.stream_options is not None and req.stream_options.include_usage
    chunk = {**head, "object": "chat.completion.chunk"}
    if usage:
        chunk["usage"] = None

    def choice(index, delta, steps=None, finish=None):
        lp = None if steps is None else {"content": [_token_entry(tok, s.token, s.logprob, s.top_logprobs)
                                                     for s in steps]}
        return _sse({**chunk, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    try:
        for index, run in enumerate(runs):   # one choice after the other: the engine runs them all meanwhile
            parser, n_calls = tools.parser() if tools else None, 0
            yield choice(index, {"role": "assistant", "content": ""})
            ready = []   # steps whose text has gone out (logprobs): sent with the chunk that has the last of it
            try:
                async for step, r, c in run.deltas():
                    calls = []
                    if parser is not None:
                        c, calls = parser.push(c)
                        if step is None:
                            rest, more = parser.flush()
                            c, calls = c + rest, calls + more
                    delta = {}
                    if r:
                        delta["reasoning_content"] = r
                    if c:
                        delta["content"] = c
                    if req.logprobs:
                        ready += run.out.take()
                    if delta:
                        yield choice(index, delta, ready if req.logprobs else None)
                        ready = []
                    for call in calls:   # OpenAI's shape: the id and name first, then the arguments
                        first = _tool_call(n_calls, call)
                        first["function"] = {"name": call[1], "arguments": ""}
                        yield choice(index, {"tool_calls": [first]})
                        yield choice(index, {"tool_calls": [{"index": n_calls, "function": {"arguments": call[2]}}]})
                        n_calls += 1
            except ApiError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            yield choice(index, {}, ready or None, finish=_finish(run, n_calls))
        if usage:
            yield _sse({**chunk, "choices": [], "usage": _usage(runs)})
        yield "data: [DONE]\n\n"
    finally:
        for run in runs:
            run.cancel()
