"""Structured output: grammars compiled once per spec and cached by hash; per-row token masks.

A request's constraint is a `GrammarSpec` (a JSON schema, a regex or a Lark grammar) inside its
frozen `SamplingParams`. `GrammarCompiler.compile` turns a spec into an llguidance matcher once and
caches it by the spec's hash; the HTTP layer calls it on a worker thread before submitting, so a bad
grammar is a 400 before any work is queued and the engine thread only copies a compiled matcher.
Each constrained sequence owns its copy, advanced by every token it accepts.

Why llguidance and not xgrammar (both maintained, both CPU wheels; measured on this project's CPU,
benchmarks/results/grammar_backends.json): llguidance compiles a JSON schema lazily in about 1 ms
where xgrammar spends ~170 ms up front, and its per-token mask is several times cheaper; xgrammar
also pulls triton in.

A small model must also finish its JSON within max_tokens. JSON is compact (no free whitespace), so
it cannot stall in endless spaces or newlines; and in the last quarter of its token budget a JSON
row is *closing*: where the grammar allows a closing token, only those are allowed (inside a string:
a `"` possibly followed by `}`/`]`; outside: only `}`/`]`, or EOS); failing that, a token moving on to
the next member (`,` or `","`, as after an endless number while a required property is missing). So
open strings, numbers, arrays and objects end as soon as the schema lets them (still valid: this
only narrows the grammar's mask).

Untrusted grammars are bounded before llguidance reads them (grammar_check.py: size, rules, depth),
built first in a worker process where a crash or a runaway fails only that request
(grammar_workers.py), and cached only once built here as far as their first mask. A limit reached
later, at some token of one row, fails that row alone with a 400 naming the setting, and takes the
spec out of the cache: copies of one matcher share its lexer, which the failure leaves broken.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import llguidance
import torch
from pydantic import BaseModel, ConfigDict

from .config import EngineSettings
from .errors import RequestError
from .grammar_check import GrammarLimits, GrammarRefused, build, check_source, describe_error, worker_setup
from .grammar_workers import GrammarWorkers
from .torch_threads import TransientThreads

_BRACKETS = set("}]")
CLOSING_FRACTION, MIN_CLOSING_TOKENS = 0.25, 8  # a JSON row closes in the last quarter of its budget


class GrammarSpec(BaseModel):
    """What a request's output must match. Compiled specs are cached by `key` (its hash)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["json_schema", "regex", "lark"]
    source: str  # the schema as JSON text, the regex, or the Lark grammar
    field: str | None = None  # the request field it came from, named in errors

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()


class GrammarCompiler:
    """Compiles specs against one tokenizer and keeps the newest `max_cached` by key.

    Thread-safe: HTTP worker threads compile, the engine thread copies. The tokenizer's token
    table (~0.5 s to build) and the first grammar worker are made on first use, so an engine that
    never constrains pays nothing. `close` stops the workers."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: set[int],
        settings: EngineSettings | None = None,
        max_cached: int = 256,
    ):
        settings = settings or EngineSettings()
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self.limits = GrammarLimits.of(settings)
        self.max_cached = max_cached
        self.workers = GrammarWorkers(self._worker_setup, settings)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._closing_bits: dict[bool, list[torch.Tensor]] = {}
        self.num_compiled = 0

    def compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The spec's pristine matcher (compiled now unless cached); a bad spec is a RequestError."""
        with self._lock:
            if spec.key in self._compiled:
                self._compiled.move_to_end(spec.key)
                return self._compiled[spec.key]
        try:
            check_source(spec.kind, spec.source, self.limits)
            self.workers.warm()  # boots while this thread builds the token table
            tokenizer = self._tokenizer()
            error = self.workers.check(spec.kind, spec.source)
            if error is not None:
                raise GrammarRefused(error)
            matcher = build(spec.kind, spec.source, tokenizer, self.limits)
        except GrammarRefused as exc:
            raise RequestError(str(exc), field=spec.field) from None
        with self._lock:
            self._compiled[spec.key] = matcher
            self.num_compiled += 1
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (a copy of the compiled one)."""
        return self.compile(spec).deep_copy()

    def evict_failed(self, spec: GrammarSpec, matcher: llguidance.LLMatcher, num_tokens: int) -> RequestError:
        """Why a row's matcher failed at output token `num_tokens`, in plain words. The spec leaves the
        cache: copies share the compiled matcher's lexer, which a limit reached leaves broken."""
        with self._lock:
            self._compiled.pop(spec.key, None)
        message = describe_error(spec.kind, matcher.get_error(), self.limits, at_step=True)
        return RequestError(f"{message} (at output token {num_tokens})", field=spec.field)

    def close(self) -> None:
        self.workers.close()

    def closing_bits(self, in_string: bool) -> list[torch.Tensor]:
        """[ceil(V / 32)] int32 bitmasks of the closing tokens, best first: inside a string, `"`
        then only `}`/`]`, else `",` or `","`; outside, only `}`/`]` (and EOS), else `,` or `,"`."""
        with self._lock:
            if not self._closing_bits:
                texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
                eos = [i for i in self.eos_token_ids if i < self.vocab_size]
                self._closing_bits[True] = [
                    self._bits([i for i, t in enumerate(texts) if t[:1] == '"' and set(t[1:]) <= _BRACKETS]),
                    self._bits([i for i, t in enumerate(texts) if t in ('",', '","')]),
                ]
                self._closing_bits[False] = [
                    self._bits([i for i, t in enumerate(texts) if t and set(t) <= _BRACKETS] + eos),
                    self._bits([i for i, t in enumerate(texts) if t in (",", ',"')]),
                ]
            return self._closing_bits[in_string]

    def _bits(self, ids: list[int]) -> torch.Tensor:
        allowed = torch.zeros(((self.vocab_size + 31) // 32) * 32, dtype=torch.bool)
        allowed[ids] = True
        weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
        words = (allowed.view(-1, 32).long() * weights).sum(-1)  # [W], as unsigned 32-bit values
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:  # from the JSON the workers get: both build the same table
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
            return self._ll_tokenizer

    def _tokenizer_json(self) -> str:
        """The fast tokenizer as JSON text, without padding or truncation (as llguidance.hf reads it)."""
        backend = copy.copy(self.tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()

    def _worker_setup(self) -> bytes:
        setup = worker_setup(
            self._tokenizer_json(), self.vocab_size, self.eos_token_ids, self.limits, self.workers.memory
        )
        return json.dumps(setup).encode() + b"\n"


@dataclass
class RowGrammar:
    """One constrained row of a step: its matcher, and whether it must close now."""

    matcher: llguidance.LLMatcher
    is_closing: bool = False
    in_string: bool = False  # (closing rows only) the JSON text so far ends inside a string


def constrained_rows(scheduled) -> dict[int, RowGrammar]:
    """{seq_id: RowGrammar} of the scheduled sequences that sample under a grammar this step."""
    rows = {}
    for seq, num_new in scheduled:
        if seq.matcher is None or seq.num_computed + num_new != seq.num_tokens:
            continue
        left = seq.max_tokens - len(seq.output_token_ids)
        is_closing = seq.params.grammar.kind == "json_schema" and left <= max(
            MIN_CLOSING_TOKENS, CLOSING_FRACTION * seq.max_tokens
        )
        rows[seq.seq_id] = RowGrammar(seq.matcher, is_closing, is_closing and _in_string(seq.detokenizer.text))
    return rows


def consume(matcher: llguidance.LLMatcher, token: int, eos_token_ids) -> bool:
    """Advance a row's matcher by its sampled token; False if the matcher is, or now is, in an error
    state (a limit reached while filling its mask or consuming the token). EOS is not consumed: the
    mask allowed it, and it ends the row. An errored matcher's mask allows only EOS, so without this
    check its row would end as a silent, successful "stop"."""
    if matcher.is_error():
        return False
    return token in eos_token_ids or matcher.consume_token(token)


def _in_string(json_text: str) -> bool:
    """Whether JSON text ends inside a string: an odd number of unescaped quotes."""
    inside, escaped = False, False
    for char in json_text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = inside
        elif char == '"':
            inside = not inside
    return inside


@dataclass
class TokenMasks:
    """Allowed next tokens of the constrained rows of one step."""

    rows: dict[int, int]  # seq_id -> row of `bitmask`
    bitmask: torch.Tensor  # [K, ceil(V / 32)] int32, bit j of word w allows token 32 * w + j


class MaskFiller:
    """Fills a step's token masks on its own thread, so the work overlaps the forward pass
    (llguidance releases the GIL while it computes a mask)."""

    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self.num_words = (compiler.vocab_size + 31) // 32
        self._executor: Executor | None = None

    def start(self, rows: dict[int, RowGrammar]) -> Future | None:
        """Begin filling masks for {seq_id: row}; None when no row is constrained."""
        if not rows:
            return None
        if self._executor is None:
            self._executor = TransientThreads(1, "loraserve-masks")  # a thread a step: see torch_threads.py
        # Zeroed here, on the engine thread: many rows are zeroed in parallel (torch_threads.py).
        bitmask = torch.zeros((len(rows), self.num_words), dtype=torch.int32)
        return self._executor.submit(self._fill, rows, bitmask)

    def _fill(self, rows: dict[int, RowGrammar], bitmask: torch.Tensor) -> TokenMasks:
        row_bytes = self.num_words * 4
        for row, grammar in enumerate(rows.values()):
            # A limit reached here leaves this matcher in an error state with an EOS-only mask (never
            # an exception, never an empty row): its row fails when it appends, the others go on.
            grammar.matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
            if grammar.is_closing:
                for tier in self.compiler.closing_bits(grammar.in_string):
                    closing = bitmask[row] & tier
                    if closing.any():
                        bitmask[row] = closing
                        break
        return TokenMasks({seq_id: row for row, seq_id in enumerate(rows)}, bitmask)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[K, W] int32 bitmask -> [K, vocab_size] bool, True where a token is allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
