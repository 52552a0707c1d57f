"""What the batching engine (scheduler.py) takes and keeps per request: a Job as submitted, the PromptLogprobs
it may emit, QueueFull when no slot or queue place is left, and the engine's own state of a job while its prompt is
prefilled (Prefill) and while it decodes (Running)."""
from dataclasses import dataclass, field

from ..generation import Sequence


class QueueFull(Exception):
    pass


@dataclass
class Job:
    ids: list               # prompt token ids
    sampler: object
    max_tokens: int
    emit: object            # called from the engine thread with each Step, a PromptLogprobs, or an Exception
    stop: list = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None   # the top n for every prompt position (legacy echo); None = off
    model: object = None    # the Model to run (an adapter over the engine's); None: the engine's
    cancelled: bool = False
    resumed: object = None  # while a preempted job waits: its Running, to go on with


@dataclass
class PromptLogprobs:
    """For prompt positions 1..T-1: each token's logprob given the ones before it, and the n most likely there."""
    logprobs: list
    top: list


@dataclass
class Prefill:
    job: Job
    cache: object
    slot: int
    reused: int = -1        # prompt tokens the cache already held (-1: not looked at yet)
    done: int = 0           # prompt tokens in the cache so far
    resume: object = None   # a preempted job's Running: its prompt is job.ids + what it generated before


@dataclass
class Running:
    job: Job
    cache: object
    seq: Sequence
    slot: int               # its row of the engine's logits
    token: int = 0
    picked: int | None = None   # its next token when the forward picked it (greedy, no logprobs)

    def ids(self):
        """What its cache holds before `token` runs: the prompt and every token generated but the last."""
        return self.seq.history[:-1]
