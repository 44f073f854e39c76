"""A request's state inside the engine, and what the engine hands back for it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from adapters import AdapterLease, SlotMix

from .adapter_ref import AdapterRef, BoundTerm
from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams

_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None only for a prompt's first token: nothing precedes it
    top: list[tuple[int, float]]  # the N most likely (token id, logprob), best first


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, where its KV lives, its adapters' versions and slots, and its timings."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef
    detokenizer: IncrementalDetokenizer
    max_tokens: int  # params.max_tokens, or what is left of the context when the request set none
    bound: tuple[BoundTerm, ...] = ()  # each term's version, bound at admission and kept until it finishes
    leases: list[AdapterLease] = field(default_factory=list)  # their device slots, while it holds them
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per prompt token scored so far
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # names of its prompt's full blocks (prefix_cache.py)
    num_indexed_blocks: int = 0  # of those, blocks computed or loaded into its extent so far
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, over its admissions
    prefix_cache_hits: int = 0  # of those, tokens found there (not computed)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    error: Exception | None = None  # why the engine failed it, if it did
    matcher: Any = None  # llguidance matcher of params.grammar, advanced by each accepted token
    num_preemptions: int = 0
    num_bypassed: int = 0  # steps other requests were admitted ahead of it
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_emitted_tokens: int = 0
    num_emitted_logprobs: int = 0
    num_emitted_prompt_logprobs: int = 0

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
    def label(self) -> str | None:
        """What metrics and logs call its adapter (None: the base)."""
        return self.adapter.label

    @property
    def slot_mix(self) -> SlotMix:
        """Where its rows' deltas come from, while it holds its slots: a (slot, scale) per bound
        term; BASE_MIX (no terms) for the base."""
        return tuple((lease.slot, scale) for lease, (_, scale) in zip(self.leases, self.bound))


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
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # new since the last output
    error: Exception | None = None  # set when the engine failed the request (finish_reason "abort")


@dataclass
class Completion:
    """A whole finished request, as `LLMEngine.generate` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    num_prompt_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # when asked for (SamplingParams.prompt_logprobs)
