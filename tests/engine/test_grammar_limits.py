"""Grammars cannot crash or poison the engine: every limit is a RequestError naming its setting and
field; a grammar that crashes llguidance (a 3,000-link chain, or one hidden where no limit looks) or
runs past the timeout costs only its request, and its worker is replaced; a row whose grammar hits a
limit mid-generation fails alone, and its spec is never served from the cache; tool_choice
"required" works with $defs; GBNF compiles."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from server.engine.config import EngineSettings
from server.engine.errors import EngineStoppedError, RequestError
from server.engine.grammar import GrammarCompiler, GrammarSpec
from server.engine.sampling_params import SamplingParams
from server.http.api_models import ChatCompletionRequest, CompletionRequest
from server.http.structured import chat_plan, completion_plan
from server.http.tool_calls import tool_calls
from support.engine import EOS, PROMPTS, make_engine
from support.tool_models import Trip

REGEX_BOMB = "(a{1000}){1000}"  # lexes a million states: past any lexer fuel after the first token
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}


def ref_chain(links: int) -> dict:
    """d0 -> d1 -> ... -> d{links} = string: llguidance segfaults validating ~2,500 links."""
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(links)}
    defs[f"d{links}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def lark_chain(rules: int) -> str:
    return "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(rules)) + f'r{rules}: "x"\n'


def spec(kind: str, source, field: str = "structured_outputs.grammar") -> GrammarSpec:
    return GrammarSpec(kind=kind, source=source if isinstance(source, str) else json.dumps(source), field=field)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    """Default limits, shared by the tests that leave its workers as they found them."""
    grammars = GrammarCompiler(tokenizer, len(tokenizer), {EOS})
    yield grammars
    grammars.close()


def refused(grammars: GrammarCompiler, grammar: GrammarSpec) -> RequestError:
    with pytest.raises(RequestError) as caught:
        grammars.compile(grammar)
    assert caught.value.field == grammar.field
    return caught.value


@pytest.mark.parametrize(
    "grammar, words",
    [
        (spec("json_schema", ref_chain(3000)), "6004 rules, more than the limit of 1000 (setting max_grammar_rules)"),
        (spec("lark", "start: " + " | ".join(['"x"'] * 50000)), "(setting max_grammar_bytes)"),
        (spec("regex", "a" * 9000), "9000 characters, more than the limit of 8192 (setting max_regex_length)"),
        (spec("json_schema", {"type": "string", "pattern": "b" * 9000}), "(setting max_regex_length)"),
        (spec("json_schema", '{"items":' * 100 + "{}" + "}" * 100), "more than 64 levels deep"),
        (spec("json_schema", "[" * 5000 + "]" * 5000), "(setting max_json_depth)"),
    ],
    ids=["ref-chain", "bytes", "regex", "pattern", "depth", "python-recursion"],
)
def test_each_limit_is_a_request_error_naming_its_setting(compiler, grammar, words):
    assert words in str(refused(compiler, grammar))


def test_the_rule_limit_refuses_a_chain_that_crashed_and_passes_one_at_the_limit(compiler):
    """3,000 chained rules segfaulted llguidance; 1,000 need ~3 MiB of an 8 MiB stack and compile."""
    error = refused(compiler, spec("lark", lark_chain(3000)))
    assert "3002 rules, more than the limit of 1000 (setting max_grammar_rules)" in str(error)
    compiler.compile(spec("lark", lark_chain(998)))
    nested = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(240)}
    compiler.compile(spec("json_schema", {"$ref": "#/$defs/d0", "$defs": {**nested, "d240": {"type": "null"}}}))


@pytest.mark.parametrize(
    "grammar",
    [
        spec("json_schema", ref_chain(3000)),
        spec("lark", lark_chain(3000)),
    ],
    ids=["ref-chain", "lark-chain"],
)
def test_a_grammar_that_crashes_the_compiler_fails_alone(tokenizer, grammar):
    """With the rule limit lifted, the chains reach llguidance, which segfaults: in a worker."""
    grammars = GrammarCompiler(tokenizer, len(tokenizer), {EOS}, EngineSettings(max_grammar_rules=100_000))
    try:
        assert "the compiler crashed on it" in str(refused(grammars, grammar))
        assert grammars.num_compiled == 0
        grammars.compile(spec("json_schema", PERSON))  # a fresh worker serves the next one
        assert grammars.workers.num_started == 2
    finally:
        grammars.close()


def test_a_crash_hidden_from_every_limit_is_caught_by_the_worker(compiler):
    """%json embeds a schema in one Lark line: no rule is counted, the bytes fit, llguidance crashes."""
    compiler.compile(spec("regex", "[0-9]{2}"))
    started, pids = compiler.workers.num_started, compiler.workers.pids()
    error = refused(compiler, spec("lark", "start: %json " + json.dumps(ref_chain(3000))))
    assert str(error).endswith(": the grammar could not be compiled: the compiler crashed on it")
    compiler.compile(spec("regex", "[0-9]{3}"))
    assert compiler.workers.num_started == started + 1 and all(gone(pid) for pid in pids)


def test_a_grammar_past_the_timeout_fails_and_its_worker_is_replaced(tokenizer):
    settings = EngineSettings(grammar_compile_timeout=0.5, max_grammar_compile_fuel=50_000_000)
    grammars = GrammarCompiler(tokenizer, len(tokenizer), {EOS}, settings)
    try:
        error = refused(grammars, spec("regex", REGEX_BOMB, "structured_outputs.regex"))
        assert "within 0.5 s (setting grammar_compile_timeout)" in str(error)
        grammars.compile(spec("json_schema", PERSON))
        assert grammars.workers.num_started == 2
    finally:
        grammars.close()


def gone(pid: int) -> bool:
    """The process has exited and been reaped (a zombie still has its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def test_closed_workers_refuse_and_leave_no_process(tokenizer):
    grammars = GrammarCompiler(tokenizer, len(tokenizer), {EOS})
    grammars.compile(spec("json_schema", PERSON))
    pids = grammars.workers.pids()
    grammars.close()
    assert len(pids) == 1 and all(gone(pid) for pid in pids)
    with pytest.raises(EngineStoppedError):
        grammars.compile(spec("regex", "x+"))


def greedy(grammar: GrammarSpec | None = None, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, grammar=grammar)


def finals(engine) -> dict:
    """Step until idle: {request_id: its last output}."""
    out = {}
    while engine.has_unfinished():
        out.update({o.request_id: o for o in engine.step() if o.finished})
    return out


def test_a_limit_reached_mid_generation_fails_that_row_alone_and_is_not_cached():
    """The regex's first mask fits the compile fuel; its first token needs more lexer work than a
    step may do. That row fails with a 400 naming the setting; a free row and a JSON row in the same
    steps finish; the same regex again fails the same way (never a cached, silent "stop")."""
    engine = make_engine()
    bomb = spec("regex", REGEX_BOMB, "structured_outputs.regex")
    requests = [
        engine.add_request(PROMPTS[0], greedy(bomb)),
        engine.add_request(PROMPTS[1], greedy()),
        engine.add_request(PROMPTS[2], greedy(spec("json_schema", PERSON), max_tokens=40)),
    ]
    outputs = finals(engine)
    failed, free, constrained = (outputs[seq.request_id] for seq in requests)
    assert failed.finish_reason == "abort" and isinstance(failed.error, RequestError)
    assert "lexer work for one token" in str(failed.error) and "(setting max_grammar_step_fuel)" in str(failed.error)
    assert "<non-verbose/>" not in str(failed.error) and failed.error.field == "structured_outputs.regex"
    assert free.finish_reason == "length" and constrained.finish_reason in {"stop", "length"}
    again = engine.add_request(PROMPTS[0], greedy(bomb))
    retried = finals(engine)[again.request_id]
    assert retried.finish_reason == "abort" and "max_grammar_step_fuel" in str(retried.error)
    assert engine.grammars.num_compiled == 3  # the regex compiled twice: its failure left the cache
    engine.grammars.close()


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def accepts(grammars: GrammarCompiler, grammar: GrammarSpec, tokenizer, text: str) -> bool:
    matcher = grammars.matcher(grammar)
    return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()


def test_required_tool_calls_keep_each_tools_defs_and_refs(compiler, tokenizer):
    """Pydantic's nested models are $defs + $refs; a recursive tool refers to its own root ("#")."""
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}}}
    plan = chat_plan(
        chat(tools=[tool("plan_trip", Trip.model_json_schema()), tool("tree", tree)], tool_choice="required"),
        compiler,
    )
    trip = {"origin": {"name": "Oslo", "country": "NO"}, "destination": {"name": "Rome", "country": "IT"}}
    answer = json.dumps([{"name": "plan_trip", "arguments": trip}, {"name": "tree", "arguments": {"kids": [{}]}}])
    assert accepts(compiler, plan.grammar, tokenizer, answer.replace(" ", ""))
    bad = json.dumps([{"name": "plan_trip", "arguments": {"origin": {"name": 1}}}])
    assert not accepts(compiler, plan.grammar, tokenizer, bad.replace(" ", ""))
    calls = tool_calls(plan.tools, answer)
    jsonschema.validate(json.loads(calls[0].function.arguments), Trip.model_json_schema())


def test_gbnf_is_converted_and_choices_are_one_terminal(compiler, tokenizer):
    gbnf = completion_plan(
        CompletionRequest(model="m", prompt="p", structured_outputs={"grammar": 'root ::= "yes" | "no"'}), compiler
    )
    assert accepts(compiler, gbnf.grammar, tokenizer, "yes") and not accepts(compiler, gbnf.grammar, tokenizer, "maybe")
    choices = [f"option {i}" for i in range(2000)]
    plan = completion_plan(CompletionRequest(model="m", prompt="p", structured_outputs={"choice": choices}), compiler)
    assert accepts(compiler, plan.grammar, tokenizer, "option 1999")


@pytest.mark.parametrize(
    "request_fields, field, words",
    [
        ({"structured_outputs": {"choice": ["x"] * 2001}}, "structured_outputs.choice", "2001 choices"),
        ({"structured_outputs": {"json": "[" * 3000 + "]" * 3000}}, "structured_outputs.json", "max_json_depth"),
    ],
    ids=["choices", "json-string-depth"],
)
def test_http_side_limits_name_their_field(compiler, request_fields, field, words):
    body = CompletionRequest(model="m", prompt="p", **request_fields)
    with pytest.raises(RequestError, match=words) as caught:
        completion_plan(body, compiler)
    assert caught.value.field == field


def test_deep_tool_call_arguments_and_schemas_are_refused_before_recursing(compiler):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    body = ChatCompletionRequest(model="m", messages=messages)
    with pytest.raises(RequestError, match="max_json_depth") as caught:
        chat_plan(body, compiler)
    assert caught.value.field == "messages[1].tool_calls[0].function.arguments"
    deep = {"type": "object"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    with pytest.raises(RequestError, match="max_json_depth") as caught:
        chat_plan(chat(tools=[tool("f", deep)], tool_choice="required"), compiler)
    assert caught.value.field == "tools[0].function.parameters"
