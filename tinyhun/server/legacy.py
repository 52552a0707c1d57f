"""The legacy /v1/completions logprobs object, {tokens, token_logprobs, top_logprobs, text_offset}: the shape
evaluation harnesses (lm-evaluation-harness's local-completions) read a prompt's scores in."""


class LegacyLogprobs:
    """Built token by token: the prompt's (add_prompt), then each generated one (add)."""

    def __init__(self, tok, offset=0):
        self.tok, self.offset = tok, offset
        self.obj = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token, logprob, top, text_len):
        o = self.obj
        o["tokens"].append(self.tok.decode([token], skip_special_tokens=False))
        o["token_logprobs"].append(logprob)
        o["top_logprobs"].append(None if top is None else
                                 {self.tok.decode([i], skip_special_tokens=False): lp for i, lp in top})
        o["text_offset"].append(self.offset)
        self.offset += text_len

    def add_prompt(self, ids, scores):
        stream = self.tok.stream()
        for i, token in enumerate(ids):
            piece = stream.push(token) + (stream.flush() if i == len(ids) - 1 else "")
            if i == 0:
                self.add(token, None, None, len(piece))
            else:
                self.add(token, scores.logprobs[i - 1], scores.top[i - 1], len(piece))
