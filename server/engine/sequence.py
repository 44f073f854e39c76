"""A request's state inside the engine, and what the engine hands back for it."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from adapters import AdapterLease

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely (token id, logprob), best first


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, where its KV lives, its adapter lease, and its timings."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    detokenizer: IncrementalDetokenizer
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    error: Exception | None = None  # why it was aborted by the engine, if it was
    lease: AdapterLease | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    num_bypassed: int = 0  # steps other requests were admitted ahead of it
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_emitted_tokens: int = 0
    num_emitted_logprobs: int = 0

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def slot(self) -> int:
        """Device slot of its adapter, -1 for the base model."""
        return -1 if self.lease is None else self.lease.slot


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta, plus totals once finished."""

    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new tokens since the last output
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class Completion:
    """A whole finished request, as `LLMEngine.generate` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    num_prompt_tokens: int
