"""The batching engine: one thread that owns the model's forwards, up to `slots` sequences at once over the
model's paged KV pool, and a bounded queue of jobs waiting for a slot or for KV memory.

Decode is bound by streaming the weights, so every step runs the next token of all active slots through one
Model.forward_batch (each row at its own cache's position); a new job joins between steps (its prompt is
prefilled, then it decodes with the others) and a finished or cancelled one leaves between steps, so a cancel
costs at most the token in flight. Prompts are prefilled in pieces (chunked prefill): each turn of the loop runs
pieces of the joining jobs' prompts, first come first served, until PREFILL_BUDGET tokens have run, then one decode
step of the active ones, so a long prompt delays the others' next token by a piece, not by its whole prefill. A
piece is one of Model.forward's own chunks (CHUNK tokens, the last one shorter), so a prompt's logits are those of
one forward. A joiner's first token is sampled right after its prompt's last piece. Each job's tokens go through
a generation.Sequence, the same per-sequence state the single-stream loop uses: a job's Steps do not depend on
what else is running (greedy outputs equal).

Each job gets a fresh cache of the pool; the pool's prefix sharing (tinyhun.kv_cache) finds the full blocks of
its prompt that any earlier or running job computed (a system prompt, the previous turns of a conversation,
including the reply generated for them), so only what is new is computed. Memory: a job starts when the pool has
the blocks its prompt needs beyond those shared; when a decode step finds the pool exhausted, the newest job is
preempted (its blocks go back, its full blocks stay as cached prefixes) and waits at the head of the queue, to be
prefilled again (mostly from those cached blocks) and go on with the same Sequence: its stream continues as if
nothing happened.

A job may name its own Model: an adapter over the engine's (model.with_adapter: the same base arrays and KV
pool, its prefixes hashed apart). A step runs one forward_batch per distinct model among the active slots.

A group whose every job samples greedily and asks for no logprobs has its tokens picked where the logits are
(forward_batch argmax=True), as has such a job's first token after its prompt (forward argmax=True): on a GPU only
the ids come down, not a logits row of the vocabulary per slot.
"""
import threading
from collections import deque

import numpy as np

from ..errors import TinyhunError
from ..generation import LogProb, Sequence, reuse_prompt
from ..kernels.kv import BLOCK
from ..kv_cache import KVMemoryFull, common_prefix
from ..model import CHUNK
from .jobs import Prefill, PromptLogprobs, QueueFull, Running

PREFILL_BUDGET = CHUNK   # prompt tokens prefilled per turn of the loop (in whole pieces), between decode steps


class Engine:
    def __init__(self, model, slots, queue_size, max_context=None, thread=True):
        """thread=False: the caller runs the loop itself (run()), e.g. on the main thread, where the Numba
        kernels run fastest (bench/bench_server.py measures a forward from another thread 2-4x slower)."""
        if model.tokenizer is None:
            raise TinyhunError("this model folder has no tokenizer (tokenizer.json or hy.tiktoken)")
        if not 1 <= slots <= CHUNK:
            raise TinyhunError(f"slots={slots}: expected 1..{CHUNK} (one forward decodes at most {CHUNK} rows)")
        self.model, self.slots, self.queue_size = model, slots, queue_size
        self.max_context = model.new_cache(max_context).max_context
        self.pool = model.kv_pool
        self._free = list(range(slots))         # engine thread only: rows of _next no job holds
        self._active = []                       # engine thread only, oldest first
        self.preempted = 0                      # jobs preempted for KV memory so far
        self._kept = deque()                    # engine thread only: finished jobs' caches, newest last
        self._joining = deque()                 # engine thread only: Prefills, first come first served
        self._next = np.zeros((slots, model.config.vocab_size), np.float32)   # each slot's next-token logits
        self._waiting = deque()
        self._load = 0                          # jobs waiting or running
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self._loop, name="tinyhun-engine", daemon=True)
            self._thread.start()

    def run(self):
        """The engine loop in the calling thread, until close()."""
        self._loop()

    # ---- any thread ----

    def capacity(self):
        """The most tokens one sequence can hold: the context, and the whole pool."""
        return min(self.max_context, self.pool.blocks * BLOCK)

    def submit(self, job):
        """Queue a job; QueueFull when every slot is busy and the queue holds queue_size jobs already; a
        TinyhunError when its prompt and max_tokens could never fit in the KV pool."""
        need = len(job.ids) + job.max_tokens
        if need > self.pool.blocks * BLOCK:
            raise TinyhunError(f"prompt ({len(job.ids)} tokens) + max_tokens ({job.max_tokens}) = {need} tokens "
                               f"exceed this server's KV memory of {self.pool.blocks * BLOCK} tokens "
                               f"({self.pool.blocks} blocks of {BLOCK}; --kv-memory)")
        with self._cond:
            if self._load >= self.slots + self.queue_size:
                raise QueueFull()
            self._load += 1
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job):
        """Stop a job: dropped from the queue now, or from its slot before the next step."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._load -= 1

    def queue_depth(self):
        return len(self._waiting)

    def busy_slots(self):
        with self._cond:
            return self._load - len(self._waiting)

    def state(self):
        """The engine's gauges for /metrics."""
        pool = self.pool
        return {"queue_depth": self.queue_depth(), "busy_slots": self.busy_slots(), "slots": self.slots,
                "kv_blocks": pool.blocks, "kv_blocks_used": pool.used, "kv_blocks_cached": pool.cached,
                "kv_blocks_free": pool.available(), "kv_block_tokens": BLOCK, "prefix_hit_rate": pool.hit_rate,
                "preempted": self.preempted}

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the engine thread ----

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._joining and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                joining = []
                while self._waiting and len(joining) < len(self._free) and self._fits(self._waiting[0]):
                    joining.append(self._waiting.popleft())
            for job in joining:
                self._start(job)
            self._prefill()
            self._step()

    def _done(self, job):
        with self._cond:
            self._load -= 1

    def _fits(self, job):
        """Whether the pool has the blocks a waiting job's prompt needs now (a preempted job's: what it held),
        beyond those it will find shared, finished jobs' caches let go first; with nothing running it must start
        (it fits the empty pool: submit)."""
        if not self._active and not self._joining:
            return True
        ids = job.resumed.ids() if job.resumed is not None else job.ids
        salt = (job.model or self.model).kv_salt
        return self._make_room(-(-len(ids) // BLOCK) + 1 - self.pool.shared_blocks(ids, salt))

    def _make_room(self, blocks):
        """Let finished jobs' kept caches go, oldest first, until the pool has `blocks` free; whether it has."""
        while self.pool.available() < blocks and self._kept:
            self._kept.popleft()
        return self.pool.available() >= blocks

    def _cache_for(self, job):
        """A finished job's kept cache sharing more of this prompt than the pool's shared blocks would (the last
        turn of this conversation, its partial last block and all), else a fresh one."""
        salt = job.model.kv_salt
        best, shared = None, self.pool.shared_blocks(job.ids, salt) * BLOCK
        for c in self._kept:
            n = common_prefix(c.tokens, job.ids)
            if c.salt == salt and n > shared:
                best, shared = c, n
        if best is None:
            return job.model.new_cache(self.max_context)
        self._kept.remove(best)
        return best

    def _start(self, job):
        """Give a job a slot and a fresh cache (it finds its prompt's shared blocks when its prefill begins)."""
        if job.cancelled:
            return self._done(job)
        job.model = job.model or self.model
        resume, job.resumed = job.resumed, None
        self._joining.append(Prefill(job, self._cache_for(job), self._free.pop(), resume=resume))

    def _prefill(self):
        """Pieces of the joining jobs' prompts until PREFILL_BUDGET tokens have run; a job whose prompt is all in
        samples its first token and decodes from the next step. Scored prompts (prompt_logprobs) run whole."""
        budget = PREFILL_BUDGET
        while self._joining and budget > 0:
            p = self._joining[0]
            job, cache = p.job, p.cache
            ids = p.resume.ids() if p.resume is not None else job.ids
            if job.cancelled:
                self._joining.popleft()
                self._free_slot(p.slot, job)
                continue
            picked = None   # the first token, when the last piece picks it
            try:
                if job.prompt_logprobs is not None and p.resume is None:
                    logits = self._prefill_scored(cache, job)
                    p.reused, p.done = 0, len(ids)
                    budget -= p.done
                else:
                    if p.reused < 0:
                        p.reused = p.done = reuse_prompt(cache, ids)
                    n = min(CHUNK, len(ids) - p.done)
                    pick = p.done + n == len(ids) and _picks_there(job)
                    out = job.model.forward(cache, ids[p.done:p.done + n], argmax=pick)
                    picked, logits = (out, None) if pick else (None, out[0])
                    p.done += n
                    budget -= n
            except KVMemoryFull:   # others hold the blocks: wait at the head of the queue for them
                if self._make_room(self.pool.available() + 1):
                    continue
                self._joining.popleft()
                self._requeue(job, p.slot, p.resume)
                continue
            except Exception as e:   # noqa: BLE001 - the job gets the error; the engine serves the others
                self._joining.popleft()
                job.emit(e)
                self._free_slot(p.slot, job)
                continue
            if p.done < len(ids):
                continue
            self._joining.popleft()
            if p.resume is not None:   # a preempted job: its next token is the one it had sampled
                r = p.resume
                r.cache, r.slot = cache, p.slot
                self._active.append(r)
                continue
            seq = Sequence(self.model.tokenizer, job.ids, job.sampler, job.max_tokens, job.stop, job.logprobs,
                           job.top_logprobs, p.reused, self.model.config.vocab_size)
            r = Running(job, cache, seq, p.slot, picked=picked)
            if picked is None:
                self._next[r.slot] = logits
            if self._sample(r):   # its first token goes out now, not after the other joiners' prefills
                self._active.append(r)

    def _requeue(self, job, slot, resume):
        """Back to the head of the queue, its slot and blocks freed (a preempted job keeps its Sequence)."""
        job.resumed = resume
        self._free.append(slot)
        with self._cond:
            self._waiting.appendleft(job)

    def _reserve(self, running):
        """A block for each running sequence's next token, preempting the newest jobs while the pool is short."""
        while running:
            try:
                for r in running:
                    r.cache.reserve(1)
                return running
            except KVMemoryFull:
                if self._make_room(self.pool.available() + 1):
                    continue
                victim = running.pop()
                self.preempted += 1
                self._requeue(victim.job, victim.slot, victim)
                victim.cache = None   # its blocks go back now; its full ones stay as cached prefixes
        return running

    def _prefill_scored(self, cache, job):
        """Prefill from scratch, scoring every prompt token against the logits before it; return the last
        position's logits. Chunk by chunk: all positions' logits at once would be [T, V]."""
        cache.reset()
        ids, V = np.asarray(job.ids, np.int64), self.model.config.vocab_size
        out, lp = np.empty((CHUNK, V), np.float32), LogProb(V)
        n_top = max(job.prompt_logprobs, 1)
        logprobs, top = [], []
        for c in range(0, len(ids), CHUNK):
            part = ids[c:c + CHUNK]
            rows = job.model.forward(cache, part, out=out[:len(part)])
            for j in range(len(part)):
                p = c + j + 1          # the position row j predicts
                if p < len(ids):
                    best = lp.top(rows[j], n_top)
                    logprobs.append(lp(rows[j], ids[p]))
                    top.append(best[:job.prompt_logprobs])
        job.emit(PromptLogprobs(logprobs, top))
        return rows[len(part) - 1]

    def _sample(self, r):
        """Sample r's next token from its slot's logits and hand its Step out; False when r is done."""
        logits = None if r.picked is not None else self._next[r.slot]
        try:
            r.token = r.seq.sample(logits) if logits is not None else r.picked
            step = r.seq.advance(r.token, logits)
            r.job.emit(step)
        except Exception as e:   # noqa: BLE001 - this job ends with the error; the others go on
            r.job.emit(e)
            self._release(r)
            return False
        if step.finish_reason:
            self._release(r)
            return False
        return True

    def _step(self):
        """One forward per model among the active slots for their last tokens, then each slot's next token."""
        running = []
        for r in self._active:
            if r.job.cancelled:
                self._release(r)
            else:
                running.append(r)
        running = self._reserve(running)
        if not running:
            self._active = []
            return
        groups = {}
        for r in running:
            groups.setdefault(id(r.job.model), []).append(r)
        ok = []
        for group in groups.values():
            pick = all(_picks_there(r.job) for r in group)
            try:
                out = group[0].job.model.forward_batch([r.cache for r in group], [r.token for r in group],
                                                       argmax=pick)
            except Exception as e:   # noqa: BLE001
                for r in group:
                    r.job.emit(e)
                    self._release(r)
                continue
            for r, row in zip(group, out):   # copied out before the next group's forward reuses the scratch
                if pick:
                    r.picked = int(row)
                else:
                    r.picked = None
                    self._next[r.slot] = row
            ok.extend(group)
        self._active = [r for r in ok if self._sample(r)]

    def _release(self, r):
        """The job is done: its cache is kept (the next turn of its conversation finds all of it, not only its
        full blocks) until the pool needs its blocks or `slots` newer ones are kept."""
        if r.cache is not None and len(r.cache):
            self._kept.append(r.cache)
            if len(self._kept) > self.slots:
                self._kept.popleft()
        r.cache = None
        self._free_slot(r.slot, r.job)

    def _free_slot(self, slot, job):
        self._free.append(slot)
        self._done(job)


def _picks_there(job):
    """A job whose tokens the forward can pick: greedy on the raw logits, and no logprobs wanted."""
    return not job.logprobs and not job.top_logprobs and getattr(job.sampler, "greedy", False)
