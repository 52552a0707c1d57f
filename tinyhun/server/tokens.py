"""Which tokens' text a streamed chunk holds, so that a chat stream with logprobs sends each token's logprob in the
chunk that carries its text (as OpenAI and llama.cpp do), not when the token is sampled.

Text is held back on its way out in three places: the detokenizer (half a character), the stop strings (Step.text
is what generation released), and the Output (the thinking splitter's tags and blanks, the content filter's
look-ahead). Token ends are counted in detokenized characters, from a detokenizer of our own fed the same ids as
generation's; the Output says how much of that text it has decided and released. A token goes out once all of its
text has: a token with no text of its own (half a character, a special token) goes with the text that follows it,
and what is left goes with the last chunk.
"""
from bisect import bisect_right


class TokenAligned:
    """An Output (same step/push/flush) that also collects, in `ready`, the Steps whose text it has released."""

    def __init__(self, tokenizer, out):
        self.out, self.stop_ids = out, tokenizer.stop_ids
        self.decoder = tokenizer.stream()
        self.text_end = 0     # characters the decoder has produced
        self.waiting = []     # steps whose text the decoder has not produced yet
        self.ends = []        # [(end of its text, step)] in order, not yet ready
        self.ready = []
        # after each push into the Output: how much it had decided, and produced in each part (reasoning, content)
        self.decided, self.produced = [0], ([0], [0])

    def step(self, step):
        # the decoder sees what generation's sees (tinyhun.generation.Sequence.advance): no stop token, flushed last
        piece = self.decoder.push(step.token) if step.token not in self.stop_ids else ""
        if step.finish_reason:
            piece += self.decoder.flush()
        self.waiting.append(step)
        if piece:
            self.text_end += len(piece)
            self.ends += [(self.text_end, s) for s in self.waiting]
            self.waiting = []
        # the step's text in pieces cut at token ends, so that what the Output holds is known token by token
        out, start, text = self.out, self.out.fed, step.text
        cuts = sorted({e - start for e, _ in self.ends if 0 < e - start < len(text)})
        parts = []
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            parts.append(out.push(text[a:b]))
            self.decided.append(out.fed - out.held)
            for k in (0, 1):
                self.produced[k].append(out.produced[k])
        self._release()
        return "".join(p[0] for p in parts), "".join(p[1] for p in parts)

    def flush(self):
        parts = self.out.flush()
        self.ready += [s for _, s in self.ends] + self.waiting
        self.ends, self.waiting = [], []
        return parts

    def take(self):
        """The Steps made ready since the last take()."""
        ready, self.ready = self.ready, []
        return ready

    def _release(self):
        out = self.out
        frontier = self.decided[-1]
        for k in (0, 1):
            if out.released[k] < out.produced[k]:
                # its first held character came out of the push after the last one that had produced no more than
                # was released: from text at or after what the Output had decided by then
                i = bisect_right(self.produced[k], out.released[k]) - 1
                frontier = min(frontier, self.decided[i])
        n = 0
        while n < len(self.ends) and self.ends[n][0] <= frontier:
            n += 1
        self.ready += [s for _, s in self.ends[:n]]
        del self.ends[:n]
