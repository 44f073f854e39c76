"""Grammar checks, and the worker process that runs them where a crash costs one request.

llguidance builds a grammar in native code, and some grammars inside every size limit still crash it
(a segfault no Python code can catch: a 2,500-deep chain of rules overflows an 8 MiB stack) or run
away. So `GrammarCompiler` (grammar.py) has each new spec built here first, as far as its first
token mask, in a worker process (grammar_workers.py), and builds it in the server only once a worker
has: the build is deterministic, and the worker checks on a smaller stack than the server's threads
have, so what a worker survived the server survives.

This module imports only the standard library and llguidance (never torch, transformers or
`server`), so `python -I grammar_check.py` starts a worker in about a second. The server imports it
for the same limits and the same build.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import threading
from dataclasses import asdict, dataclass, fields

import llguidance

# JSON without optional whitespace: `{"a":1}`; a small model cannot loop on spaces or newlines.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# A Lark rule or terminal definition: `name:`, `?name:`, `!name:`, `NAME.2:` at the start of a line.
_LARK_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z_0-9]*(?:\.-?[0-9]+)?[ \t]*:", re.MULTILINE)
_MiB = 1 << 20


class GrammarRefused(Exception):
    """A spec past a limit, or one llguidance cannot build; the message says why in plain words."""


@dataclass(frozen=True)
class GrammarLimits:
    """What one grammar may cost (EngineSettings' fields of the same names; docs/structured-output.md)."""

    max_grammar_bytes: int
    max_grammar_rules: int
    max_json_depth: int
    max_regex_length: int
    max_choices: int
    max_grammar_compile_fuel: int
    max_grammar_step_fuel: int
    max_grammar_step_items: int

    @classmethod
    def of(cls, settings) -> GrammarLimits:
        """The limits an EngineSettings sets (its fields of the same names)."""
        return cls(**{field.name: getattr(settings, field.name) for field in fields(cls)})

    def parser_limits(self) -> llguidance.LLParserLimits:
        """llguidance's limits; verbose_errors=False keeps parser state and grammar text out of errors."""
        return llguidance.LLParserLimits(
            initial_lexer_fuel=self.max_grammar_compile_fuel,
            step_lexer_fuel=self.max_grammar_step_fuel,
            step_max_items=self.max_grammar_step_items,
            verbose_errors=False,
        )


def check_source(kind: str, source: str, limits: GrammarLimits) -> None:
    """Refuse a spec past a size limit before any native code reads it (cheap, and never recursive)."""
    check_size(source, limits)
    if kind == "regex":
        _check(len(source), limits.max_regex_length, "max_regex_length", "the regex has {} characters")
        return
    if kind == "json_schema":
        num_rules, longest_pattern = _measure_schema(load_json(source, limits.max_json_depth))
        _check(longest_pattern, limits.max_regex_length, "max_regex_length", "a pattern has {} characters")
    else:
        num_rules = len(_LARK_RULE.findall(source))
    _check(num_rules, limits.max_grammar_rules, "max_grammar_rules", "the grammar has {} rules")


def check_size(source: str, limits: GrammarLimits) -> None:
    _check(len(source.encode()), limits.max_grammar_bytes, "max_grammar_bytes", "the grammar has {} bytes")


def load_json(text: str, max_depth: int):
    """JSON text parsed, if it nests at most `max_depth` levels (ValueError if it is not JSON)."""
    try:
        value = json.loads(text)
    except RecursionError:  # Python parses JSON recursively; past ~1,000 levels it gives up
        raise GrammarRefused(_too_deep(max_depth)) from None
    check_depth(value, max_depth)
    return value


def check_depth(value, max_depth: int) -> None:
    """Refuse parsed JSON nested deeper than `max_depth` levels (`[[1]]` is 2), without recursing."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise GrammarRefused(_too_deep(max_depth))
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def _too_deep(max_depth: int) -> str:
    return f"the JSON nests more than {max_depth} levels deep, the limit (setting max_json_depth)"


def _measure_schema(schema) -> tuple[int, int]:
    """(objects + $refs, the longest pattern) of a parsed schema. Each object and each $ref becomes
    at least one grammar rule; llguidance's stack grows with the chain of them (~3 KiB a link)."""
    num_rules, longest_pattern, stack = 0, 0, [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            num_rules += 1 + ("$ref" in value)
            if isinstance(value.get("pattern"), str):
                longest_pattern = max(longest_pattern, len(value["pattern"]))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return num_rules, longest_pattern


def _check(value: int, limit: int, setting: str, what: str) -> None:
    if value > limit:
        raise GrammarRefused(f"{what.format(value)}, more than the limit of {limit} (setting {setting})")


def build(kind: str, source: str, tokenizer: llguidance.LLTokenizer, limits: GrammarLimits) -> llguidance.LLMatcher:
    """The spec's pristine matcher, built and run as far as its first mask (on a copy)."""
    try:
        grammar = grammar_text(kind, source)
    except (ValueError, TypeError) as exc:
        raise GrammarRefused(f"invalid {kind}: {exc}") from None
    parser_limits = limits.parser_limits()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, limits=parser_limits)
    if is_error or messages:  # llguidance warns on what it would ignore: refuse rather than ignore
        raise GrammarRefused(f"invalid {kind}: {'; '.join(_plain(m) for m in messages)}")
    matcher = llguidance.LLMatcher(tokenizer, grammar, limits=parser_limits)
    probe = matcher.deep_copy()
    probe.compute_bitmask()  # a lexer limit shows here first; on a copy, so `matcher` stays pristine
    if probe.is_error():
        raise GrammarRefused(describe_error(kind, probe.get_error(), limits, at_step=False))
    return matcher


def grammar_text(kind: str, source: str) -> str:
    """llguidance's grammar text for a spec."""
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(source, defaults=JSON_DEFAULTS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(source)
    return llguidance.LLMatcher.grammar_from_lark(source)


def describe_error(kind: str, message: str, limits: GrammarLimits, at_step: bool) -> str:
    """llguidance's error in plain words: a limit names its setting; any other error is the grammar's
    own (it describes the request's grammar; verbose_errors=False keeps the parser's state out)."""
    if "too many expressions" in message:
        setting = "max_grammar_step_fuel" if at_step else "max_grammar_compile_fuel"
        return (
            f"the grammar needs more lexer work for one token than the limit of "
            f"{getattr(limits, setting)} (setting {setting})"
        )
    if "Too many items" in message:
        return (
            f"the grammar needs more than {limits.max_grammar_step_items} parser items for one token, "
            "the limit (setting max_grammar_step_items)"
        )
    if "; max is" in message:  # llguidance's max_items_in_row, 2,000 by default
        return "a rule of the grammar has more than 2000 alternatives at one point, llguidance's limit"
    if "too many states" in message:
        return "the grammar's lexer needs more states than llguidance's limit"
    return f"{'the grammar failed' if at_step else f'invalid {kind}'}: {_plain(message)}"


def _plain(message: str) -> str:
    """llguidance's message without its `<non-verbose/>` marker, capped (it may quote the grammar)."""
    text = message.replace("<non-verbose/>", "").strip()
    return (text[:1000] + " ...") if len(text) > 1000 else text or "unknown error"


# The worker process
def worker_setup(tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], limits, memory: int) -> dict:
    """The first line a worker reads: its tokenizer (as JSON text), its limits and its memory."""
    return {
        "tokenizer": tokenizer_json,
        "n_vocab": vocab_size,
        "eos": eos_token_ids,
        "limits": asdict(limits),
        "memory": memory,
    }


def main() -> None:
    """The worker: a setup line, then one JSON line per spec, answered by one line {"error": None | str}.
    It exits when its input closes (the server closed it, or died)."""
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what native code prints goes to stderr, never into the answers
    setup = json.loads(stdin.readline())
    resource.setrlimit(resource.RLIMIT_AS, (setup["memory"], setup["memory"]))
    tokenizer = llguidance.LLTokenizer(setup["tokenizer"], n_vocab=setup["n_vocab"], eos_token=setup["eos"])
    limits = GrammarLimits(**setup["limits"])
    threading.stack_size(_check_stack_bytes())
    _answer(stdout, {"ready": True})
    for line in stdin:
        spec, answer = json.loads(line), {}
        checker = threading.Thread(target=_check_into, args=(spec, tokenizer, limits, setup["memory"], answer))
        checker.start()
        checker.join()
        _answer(stdout, answer)


def _check_into(spec: dict, tokenizer, limits: GrammarLimits, memory: int, answer: dict) -> None:
    try:
        build(spec["kind"], spec["source"], tokenizer, limits)
        answer["error"] = None
    except GrammarRefused as exc:
        answer["error"] = str(exc)
    except MemoryError:
        answer["error"] = f"the grammar needs more than {memory} bytes to compile (setting grammar_compile_memory)"


def _answer(stdout, message: dict) -> None:
    stdout.write(json.dumps(message).encode() + b"\n")
    stdout.flush()


def _check_stack_bytes() -> int:
    """The stack a check runs on: 512 KiB less than the server's threads get (glibc gives threads
    RLIMIT_STACK, or 2 MiB when it is unlimited), so a spec deep enough to overflow the server's
    stack overflows the worker's first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    server_stack = min(soft, 64 * _MiB) if 0 < soft != resource.RLIM_INFINITY else 2 * _MiB
    return max(server_stack - _MiB // 2, _MiB // 2) // 4096 * 4096


if __name__ == "__main__":
    main()
