"""POST /v1/completions, the legacy endpoint: plain prompts (text or token ids, one or a list, n each), echo and
logprobs in the shape lm-evaluation-harness reads, a prompt scored without generating (echo, max_tokens 0)."""
import time
import uuid

from . import output, structured
from .legacy import LegacyLogprobs
from .openai_api import Run, Streamed, _max_tokens, _sse, _submit
from .schemas import ApiError, CompletionRequest


def _prompt_ids(tok, prompt, vocab):
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: empty", param="prompt")
        return tok.encode(prompt)
    if max(prompt) >= vocab:
        raise ApiError(400, f"prompt: token id {max(prompt)} out of range [0, {vocab})", param="prompt")
    return list(prompt)


async def completions(server, req: CompletionRequest):
    model = server.model_named(req.model)
    tok, vocab = server.model.tokenizer, server.model.config.vocab_size
    prompts = req.prompts()
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "prompt: streaming takes one prompt (send one request per prompt)", param="prompt")
    score_only = req.max_tokens == 0   # OpenAI's and vLLM's way to score a prompt (evaluation harnesses)
    if score_only and not req.echo:
        raise ApiError(400, "max_tokens=0: nothing to generate; it takes echo: true (the prompt scored with "
                       "logprobs, nothing generated)", param="max_tokens")
    if req.stream and req.n > 1:
        raise ApiError(400, f"n={req.n}: streamed completions take n=1 (the chat endpoint streams n choices)",
                       param="n")
    wrap = await structured.sampler_wrap(server, req, None, False)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": req.model}
    runs = []
    for p in prompts:
        ids = _prompt_ids(tok, p, vocab)
        # score only: one token is sampled from the prompt's last logits (no forward step more) and left out
        max_tokens = _max_tokens(server, 1 if score_only else req.max_tokens, len(ids), "max_tokens")
        n_top = req.logprobs
        for i in range(req.n):
            run = Run(server, model, ids, req, max_tokens, output.plain(server), n_top is not None, n_top or 0,
                      n_top if req.echo and n_top is not None else None, index=i, wrap=wrap)
            run.score_only = score_only
            runs.append((p, run))
    _submit([run for _, run in runs])
    if req.stream:
        return Streamed(_completion_stream(server, runs[0][1], req, head, runs[0][0]), runs[0][1])
    choices = []
    try:
        for i, (p, run) in enumerate(runs):
            choices.append(await _completion_choice(server, run, req, i, p))
    finally:
        for _, run in runs:
            run.cancel()
    usage = {k: sum(r.usage()[k] for _, r in runs) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if req.n > 1:   # each prompt counted once, as OpenAI counts it
        prompt = sum(len(r.ids) for _, r in runs[::req.n])
        usage = {"prompt_tokens": prompt, "completion_tokens": usage["completion_tokens"],
                 "total_tokens": prompt + usage["completion_tokens"]}
    return {**head, "object": "text_completion", "choices": choices, "usage": usage}


def _echo_text(tok, prompt, ids):
    return prompt if isinstance(prompt, str) else tok.decode(ids)


async def _completion_choice(server, run, req, index, prompt):
    tok = server.model.tokenizer
    echo = _echo_text(tok, prompt, run.ids) if req.echo else ""
    legacy = LegacyLogprobs(tok, len(echo)) if req.logprobs is not None else None
    pieces = [echo]
    async for step, _, c in run.deltas():
        if legacy is not None and step is not None:
            if req.echo and not legacy.obj["tokens"]:
                legacy.offset = 0
                legacy.add_prompt(run.ids, run.prompt_scores)
                legacy.offset = len(echo)
            if not run.score_only:
                legacy.add(step.token, step.logprob, step.top_logprobs if req.logprobs else None, len(step.text))
        if not run.score_only:
            pieces.append(c)
    return {"index": index, "text": "".join(pieces), "logprobs": None if legacy is None else legacy.obj,
            "finish_reason": run.finish_reason}


async def _completion_stream(server, run, req, head, prompt):
    tok = server.model.tokenizer
    usage = req.stream_options is not None and req.stream_options.include_usage
    chunk = {**head, "object": "text_completion"}

    def choice(text, logprobs=None, finish=None):
        return _sse({**chunk, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    try:
        try:
            echo = _echo_text(tok, prompt, run.ids) if req.echo else ""
            offset, echoed = len(echo), not req.echo
            async for step, _, c in run.deltas():
                lp = None
                if req.logprobs is not None and step is not None:
                    legacy = LegacyLogprobs(tok, offset)
                    if not echoed:
                        legacy.offset = 0
                        legacy.add_prompt(run.ids, run.prompt_scores)
                        legacy.offset = len(echo)
                    if not run.score_only:
                        legacy.add(step.token, step.logprob, step.top_logprobs, len(step.text))
                    offset, lp = legacy.offset, legacy.obj
                if run.score_only:
                    c = ""
                if not echoed:
                    c, echoed = echo + c, True
                if c or lp is not None:
                    yield choice(c, lp)
        except ApiError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
            return
        yield choice("", finish=run.finish_reason)
        if usage:
            yield _sse({**chunk, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()
