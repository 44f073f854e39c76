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
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import llguidance
import llguidance.hf
import torch
from pydantic import BaseModel, ConfigDict

from .errors import RequestError

# JSON without optional whitespace: `{"a":1}`; a small model cannot loop on spaces or newlines.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
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

    def grammar(self) -> str:
        """llguidance's grammar text for the spec."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_DEFAULTS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


class GrammarCompiler:
    """Compiles specs against one tokenizer and keeps the newest `max_cached` by key.

    Thread-safe: HTTP worker threads compile, the engine thread copies. The tokenizer's token
    table (~0.5 s to build) is made on first use, so an engine that never constrains pays nothing."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], max_cached: int = 256):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self.max_cached = max_cached
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
        matcher = self._build(spec)
        with self._lock:
            self._compiled[spec.key] = matcher
            self.num_compiled += 1
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (a copy of the compiled one)."""
        return self.compile(spec).deep_copy()

    def _build(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        try:
            grammar = spec.grammar()
        except (ValueError, TypeError) as exc:
            raise RequestError(f"invalid {spec.kind}: {exc}", field=spec.field) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error or messages:  # llguidance warns on what it would ignore: refuse rather than ignore
            raise RequestError(f"invalid {spec.kind}: {'; '.join(m.strip() for m in messages)}", field=spec.field)
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar)
        if matcher.is_error():
            raise RequestError(f"invalid {spec.kind}: {matcher.get_error().strip()}", field=spec.field)
        return matcher

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

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
            return self._ll_tokenizer


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
        self._executor: ThreadPoolExecutor | None = None

    def start(self, rows: dict[int, RowGrammar]) -> Future | None:
        """Begin filling masks for {seq_id: row}; None when no row is constrained."""
        if not rows:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="loraserve-masks")
        return self._executor.submit(self._fill, rows)

    def _fill(self, rows: dict[int, RowGrammar]) -> TokenMasks:
        bitmask = torch.zeros((len(rows), self.num_words), dtype=torch.int32)
        row_bytes = self.num_words * 4
        for row, grammar in enumerate(rows.values()):
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
