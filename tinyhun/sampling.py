"""Next-token sampling with the semantics of HF transformers' logits processors.

Order (as in `GenerationMixin._get_logits_processor`): repetition penalty, then OpenAI's presence and
frequency penalties (logit -= presence * [count > 0] + frequency * count, counting the ids of the history given,
as llama.cpp does), then either greedy argmax (temperature 0) or temperature -> top-k -> top-p -> min-p ->
softmax -> draw. Every filter keeps at
least the most likely token, so a draw always has something to pick.

Vocabularies are ~120k and this runs once per generated token, so the expensive steps are avoided:
top-k uses a partition (O(V)) instead of a sort, top-p without top-k first narrows the vocabulary to the
smallest probability band that holds the nucleus and sorts only that, and the draw never builds a
full-vocabulary cumulative sum. Full-vocabulary work goes into scratch buffers allocated once.
"""

import numbers
from dataclasses import dataclass, fields

import numpy as np

from tinyhun.errors import TinyhunError

_DRAW_BLOCK = 4096  # tokens per block of the two-level inverse-CDF draw
# Relative-probability cut-offs tried (largest first) to find a band of tokens holding the top-p nucleus.
_TOP_P_BANDS = (1e-2, 1e-4, 1e-6, 1e-9, 1e-13)


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    # NaN fails every comparison, so it is rejected here too.
    ok = ok and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise TinyhunError(f"{name}={_show(value)}: expected a number in {span}")
    return float(value)


def _integer(name: str, value, lo: int, hi: int | None, span: str) -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (ok and lo <= value and (hi is None or value < hi)):
        raise TinyhunError(f"{name}={_show(value)}: expected an integer {span}")
    return int(value)


def _draw(rng: np.random.Generator, w: np.ndarray) -> int:
    """Index i drawn with probability w[i] / sum(w); w >= 0 with at least one positive entry."""
    # Sum per block, pick a block, then cumsum inside that block only: O(n) with cheap reductions
    # instead of a full float64 cumsum (~1 ms at 120k).
    starts = np.arange(0, w.size, _DRAW_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))
    total = block_cdf[-1]
    # Keeping r strictly below the total makes side="right" land on a block/token of positive weight.
    r = min(rng.random() * total, np.nextafter(total, 0.0))
    b = int(np.searchsorted(block_cdf, r, side="right"))
    r -= block_cdf[b - 1] if b else 0.0
    cdf = np.cumsum(w[starts[b] : starts[b] + _DRAW_BLOCK], dtype=np.float64)
    r = min(max(r, 0.0), np.nextafter(cdf[-1], 0.0))  # block sums and this cumsum round differently
    return int(starts[b] + np.searchsorted(cdf, r, side="right"))


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked: what the library, chat, the command line and the server all pass down.
    Validated here, once; temperature 0 is greedy, top_k 0 / top_p 1 / min_p 0 / penalties 1, 0, 0 are off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        put = object.__setattr__   # frozen: the checked values replace the given ones (ints -> floats)
        put(self, "temperature", _real("temperature", self.temperature, 0.0, 100.0, False, False))
        put(self, "top_k", _integer("top_k", self.top_k, 0, None, ">= 0 (0 = off)"))
        put(self, "top_p", _real("top_p", self.top_p, 0.0, 1.0, True, False))
        put(self, "min_p", _real("min_p", self.min_p, 0.0, 1.0, False, True))
        put(self, "repetition_penalty",
            _real("repetition_penalty", self.repetition_penalty, 0.0, 10.0, True, False))
        put(self, "presence_penalty", _real("presence_penalty", self.presence_penalty, -2.0, 2.0, False, False))
        put(self, "frequency_penalty", _real("frequency_penalty", self.frequency_penalty, -2.0, 2.0, False, False))
        if self.seed is not None:
            put(self, "seed", _integer("seed", self.seed, 0, 2**63, "in [0, 2**63)"))


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


class Sampler:
    """Picks the next token from float32[V] logits; holds its RNG and per-vocabulary scratch buffers."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params = params if params is not None else SamplingParams()
        for name in SAMPLING_FIELDS:
            setattr(self, name, getattr(params, name))
        self.rng = np.random.default_rng(self.seed)
        self._x = np.empty(0, np.float32)  # [V] processed logits
        self._y = np.empty(0, np.float32)  # [V] partition copy / exp(x - max)
        self._mask = np.empty(0, np.bool_)  # [V]

    @property
    def greedy(self) -> bool:
        """Picks the argmax of the raw logits: the model can pick it where the logits are (Model.forward argmax)."""
        penalised = self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        return self.temperature == 0.0 and not penalised

    def __call__(self, logits: np.ndarray, history) -> int:
        ids, w = self._survivors(logits, history)
        if w is None:
            return int(ids[0])
        i = _draw(self.rng, w)
        return i if ids is None else int(ids[i])

    def probs(self, logits: np.ndarray, history) -> np.ndarray:
        """float32[V]: the distribution __call__ draws from (zero for filtered tokens)."""
        ids, w = self._survivors(logits, history)
        out = np.zeros(logits.shape[-1], np.float32)
        if w is None:
            out[ids[0]] = 1.0
        else:
            out[slice(None) if ids is None else ids] = w / w.sum(dtype=np.float64)
        return out

    def _survivors(self, logits: np.ndarray, history):
        """(ids int64[n] or None for all V, unnormalised weights [n]); weights None means greedy ids[0]."""
        vocab = logits.shape[-1]
        if self.greedy:
            return np.array([np.argmax(logits)]), None  # argmax ties -> lowest id; no copy needed
        if self._x.size != vocab:
            self._x = np.empty(vocab, np.float32)
            self._y = np.empty(vocab, np.float32)
            self._mask = np.empty(vocab, np.bool_)
        x = self._x
        np.copyto(x, logits)
        if self.repetition_penalty != 1.0:
            self._penalise(x, logits, history)
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            self._count_penalties(x, history)
        if self.temperature == 0.0:
            return np.array([np.argmax(x)]), None
        np.divide(x, self.temperature, out=x)
        top = float(x.max())
        ids = None
        if 0 < self.top_k < vocab:
            ids = self._top_k(x)
        if self.top_p < 1.0:
            ids = self._top_p(x, top, ids)
        if self.min_p > 0.0:
            # p_i < min_p * p_max  <=>  x_i - max < log(min_p); the max token always survives.
            cut = top + np.log(self.min_p)
            ids = np.flatnonzero(x >= cut) if ids is None else ids[x[ids] >= cut]
        if ids is None:
            w = self._y
            np.subtract(x, top, out=w)
            return None, np.exp(w, out=w)
        return ids, np.exp(x[ids].astype(np.float64) - top)

    def _penalise(self, x, logits, history) -> None:
        ids = np.asarray(history, dtype=np.int64).reshape(-1)
        # Ids past the logits (embedding vocab larger than lm_head) cannot be generated: skip them, as HF does.
        ids = ids[(ids >= 0) & (ids < x.size)]
        # Reading the caller's logits (not x) makes repeated ids harmless: each write stores the same value.
        s = logits[ids].astype(np.float32)
        x[ids] = np.where(s > 0, s / np.float32(self.repetition_penalty), s * np.float32(self.repetition_penalty))

    def _count_penalties(self, x, history) -> None:
        ids = np.asarray(history, dtype=np.int64).reshape(-1)
        ids, counts = np.unique(ids[(ids >= 0) & (ids < x.size)], return_counts=True)
        x[ids] -= np.float32(self.presence_penalty) + np.float32(self.frequency_penalty) * counts.astype(np.float32)

    def _top_k(self, x) -> np.ndarray:
        y = self._y
        np.copyto(y, x)
        y.partition(x.size - self.top_k)
        # Like HF, every token tied with the k-th largest survives.
        np.greater_equal(x, y[x.size - self.top_k], out=self._mask)
        return np.flatnonzero(self._mask)

    def _top_p(self, x, top: float, ids):
        """Keep the most likely prefix until its mass reaches top_p (HF: drop ascending cumsum <= 1 - top_p)."""
        if ids is None:
            e = self._y
            np.subtract(x, top, out=e)
            np.exp(e, out=e)
            total = float(e.sum(dtype=np.float64))
            ids = np.arange(x.size)
            # Tokens outside a band {e >= c} holding at least top_p of the mass have that much mass above
            # them, so they are cut: only the band needs sorting. Slack covers the two summation orders.
            for c in _TOP_P_BANDS:
                np.greater_equal(e, c, out=self._mask)
                if float(np.dot(e, self._mask)) >= self.top_p * total * (1 + 1e-6):
                    ids = np.flatnonzero(self._mask)
                    break
            w = e[ids].astype(np.float64)
        else:
            w = np.exp(x[ids].astype(np.float64) - top)
            total = float(w.sum())
        order = np.argsort(-w, kind="stable")  # ids ascend, so ties keep the lower id first
        ranked = w[order]
        mass_before = np.cumsum(ranked) - ranked
        keep = order[mass_before < self.top_p * total]  # never empty: the first token has 0 mass before it
        return np.sort(ids[keep])


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0) -> Sampler:
    """Validated sampler (SamplingParams' fields as keywords)."""
    return Sampler(SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed, presence_penalty,
                                  frequency_penalty))
