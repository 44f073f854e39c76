"""LoRA on MoE experts and routers (PEFT's target_parameters, adapters/experts.py) equal to PEFT.

Each MoE family's tiny model (tests/support/families.py: 4 experts, top-2) gets two adapters with
non-zero B on every linear layer and on its experts' stacked projections and its router (PEFT's
all-linear puts those in target_parameters). Requests run alone (gathered, then merged after a few
steps) and then in one mixed batch with base rows; PEFT cannot mix these adapters in a batch
("ParamWrapper does not support mixed adapter batches"), so each answer is checked against PEFT
with that one adapter active, teacher-forced on the engine's own tokens.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from adapters import UnsupportedAdapterError, load_adapter, wrap_model
from adapters.peft_format import read_factors
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel
from support.engine import MERGE_SOON, greedy, load_tokenizer
from support.families import MOE, VOCAB, model, pristine

# fp32 |Δ logprob|, the suite's bound (test_model_families.py). Measured here at most ~2e-5 on the
# logits: the experts' per-expert matmuls and the merged W0 + s·B·A against PEFT's grouped_mm over
# W0 + s·B·A, summed in another order.
TOL = 1e-4
EXPERTS = ["gate_up_proj", "down_proj", "gate.weight"]  # what PEFT's all-linear adds on Mixtral and Qwen3-MoE
NEW_TOKENS = 6
# PEFT's v5 conversion writes rank and alpha patterns for the fused gate_up_proj, then warns that no
# *module* matches them; they apply to the parameter (the weights' shapes show it).
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 40, 9)]


PROMPTS = _prompts()
REQUESTS = [(PROMPTS[i % 3], adapter) for i, adapter in enumerate([None, "a", "b", "a", "b", None])]


def adapter_kwargs(family: str) -> dict[str, dict]:
    """All-linear plus the experts and router; named explicitly where PEFT's all-linear leaves them
    out (Qwen2-MoE, OLMoE), and checked below to be in the saved config either way."""
    targets = dict(target_modules="all-linear", target_parameters=EXPERTS)
    return {
        "a": dict(r=8, lora_alpha=16, **targets),
        "b": dict(r=4, lora_alpha=8, use_rslora=True, **targets),
    }


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("moe-adapters")

    @functools.cache
    def write(family: str) -> dict[str, Path]:
        paths = {
            name: make_peft_adapter(pristine(family), root / family / name, **kwargs)
            for name, kwargs in adapter_kwargs(family).items()
        }
        for path in paths.values():
            saved = json.loads((path / "adapter_config.json").read_text())
            assert {"gate_up_proj", "down_proj", "gate.weight"} <= set(saved["target_parameters"])
        return paths

    return write


def make_engine(family: str, paths: dict[str, Path] | None = None, **config) -> LLMEngine:
    base = BaseModel(model(family), load_tokenizer(), family, Path(family))
    engine = LLMEngine(base, EngineConfig(**{"max_num_batched_tokens": 32, **MERGE_SOON, **config}))
    for name, path in (paths or {}).items():
        engine.registry.add(name, path)
    return engine


@torch.no_grad()
def peft_logprobs(family: str, paths: dict[str, Path], requests, completions) -> list[torch.Tensor]:
    """PEFT's log-probabilities over each request's new tokens, one adapter active at a time: one
    PeftModel per adapter, since PEFT 0.22's second target_parameters adapter in a model drops some of
    its modules (a load_adapter of "b" after "a" leaves qwen2_moe's shared_expert without b's LoRA)."""
    references = {name: PeftModel.from_pretrained(model(family), str(path)).eval() for name, path in paths.items()}
    rows = []
    for (prompt, adapter), completion in zip(requests, completions):
        ids = torch.tensor([prompt + completion.token_ids])
        if adapter is None:
            reference = next(iter(references.values()))
            with reference.disable_adapter():
                logits = reference(input_ids=ids).logits[0]
        else:
            logits = references[adapter](input_ids=ids).logits[0]
        rows.append(torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1])
    return rows


def assert_equal(expected: list[torch.Tensor], requests, completions) -> None:
    for rows, (_, adapter), completion in zip(expected, requests, completions):
        tokens = torch.tensor(completion.token_ids)
        chosen = rows[torch.arange(len(tokens)), tokens]
        assert (rows.max(-1).values - chosen).max() <= TOL, f"{adapter}: not PEFT's greedy tokens"
        ours = torch.tensor([entry.logprob for entry in completion.logprobs])
        assert (ours - chosen).abs().max() <= TOL, f"{adapter}: Δ logprob {(ours - chosen).abs().max():.2e}"


@pytest.mark.parametrize("family", sorted(MOE))
def test_expert_lora_equals_peft_alone_merged_and_in_one_mixed_batch(family, adapters):
    paths = adapters(family)
    engine = make_engine(family, paths)
    params = greedy(NEW_TOKENS, logprobs=0)
    alone = [engine.generate([prompt], params, [adapter])[0] for prompt, adapter in REQUESTS[:3]]
    modes = engine.stats().steps_by_mode
    assert modes.get("merged") and modes.get("gather"), "each adapter alone runs gathered, then merged"
    steps = []
    engine.step_listeners.append(steps.append)
    mixed = engine.generate([prompt for prompt, _ in REQUESTS], params, [adapter for _, adapter in REQUESTS])
    assert steps[0].mode == "gather" and steps[0].num_distinct_adapters == 2

    assert_equal(peft_logprobs(family, paths, REQUESTS[:3], alone), REQUESTS[:3], alone)
    expected = peft_logprobs(family, paths, REQUESTS, mixed)
    assert_equal(expected, REQUESTS, mixed)
    base, with_a, with_b = expected[:3]
    for other in (with_a, with_b):
        assert (other[0] - base[0]).abs().max() > 1e-2, "an adapter must change the answer, or this proves nothing"


@torch.no_grad()
def test_experts_alone_change_the_answer_and_merge_and_unmerge_exactly(tmp_path, make_peft_adapter):
    """An adapter on the experts and nothing else (no attention, no router): PEFT's answer moves far
    past the tolerance and ours follows it, gathered and merged; unmerging gives W0 back bit for bit."""
    path = make_peft_adapter(
        pristine("mixtral"), tmp_path / "experts", r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS[:2]
    )
    lora_model = wrap_model(model("mixtral"))
    forward = lora_model.model
    weights = {name: slots.weight.clone() for name, slots in lora_model.params.items()}
    lora_model.load_slot(0, load_adapter("e", path, lora_model.spec, max_rank=lora_model.max_rank))
    ids = torch.tensor([PROMPTS[1]])
    reference = PeftModel.from_pretrained(model("mixtral"), str(path)).eval()
    want = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
    with reference.disable_adapter():
        base = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
    assert (want - base).abs().max() > 1e-2
    with lora_model.gather(lora_model.build_batch(torch.zeros(ids.shape[1], dtype=torch.long))):
        gathered = torch.log_softmax(forward(input_ids=ids).logits[0], -1)
    lora_model.merge(0)
    merged = torch.log_softmax(forward(input_ids=ids).logits[0], -1)
    lora_model.unmerge()
    unmerged = torch.log_softmax(forward(input_ids=ids).logits[0], -1)
    assert (gathered - want).abs().max() <= TOL and (merged - want).abs().max() <= TOL
    assert (unmerged - base).abs().max() <= TOL
    assert all(torch.equal(slots.weight, weights[name]) for name, slots in lora_model.params.items())


def test_a_parameter_the_server_cannot_adapt_is_refused_naming_it(tmp_path, make_peft_adapter):
    """PEFT can target any 2D or 3D parameter; one that is neither an experts' projection nor a
    router's weight is a typed error naming it (the HTTP table maps it to 422 unsupported_adapter)."""
    path = make_peft_adapter(
        pristine("mixtral"), tmp_path / "head", r=4, target_modules=["q_proj"], target_parameters=["lm_head.weight"]
    )
    engine = make_engine("mixtral")
    with pytest.raises(UnsupportedAdapterError, match="target_parameters.*'lm_head.weight' is not served"):
        engine.registry.add("head", path)


def test_analysis_refuses_expert_lora_by_name(adapters):
    """Served, but not yet read by the analysis and compression routes: a typed refusal, not a
    misreading of the stacked [E·r, in] factors as one rank-E·r pair."""
    with pytest.raises(UnsupportedAdapterError, match="target_parameters"):
        read_factors(adapters("mixtral")["a"])


def test_expert_lora_on_the_row_kernels_equals_peft(adapters):
    """The CUDA step path (here in Triton's interpreter): the router's LoraLinear on the row kernels,
    the experts' pairs on add_lora, in one mixed step with a base row."""
    paths = adapters("mixtral")
    engine = make_engine("mixtral", paths, step_kernels="triton")
    assert engine.runner.row_kernels
    requests = REQUESTS[:3]  # 3 new tokens: the interpreter runs a few steps per second
    mixed = engine.generate([p for p, _ in requests], greedy(3, logprobs=0), [a for _, a in requests])
    assert_equal(peft_logprobs("mixtral", paths, requests, mixed), requests, mixed)


@torch.no_grad()
def test_composed_expert_adapters_equal_peft_gathered_and_merged(adapters):
    """A row on a + b (both at scale 1: PEFT's two active adapters, summed deltas) and on 0.5·a - b
    (no PEFT equivalent: gathered against merged), beside a base row in one gathered step."""
    paths = adapters("mixtral")
    lora_model = wrap_model(model("mixtral"))
    for slot, name in enumerate(paths):
        lora_model.load_slot(slot, load_adapter(name, paths[name], lora_model.spec, max_rank=lora_model.max_rank))
    reference = PeftModel.from_pretrained(model("mixtral"), str(paths["a"]), adapter_name="a").eval()
    reference.load_adapter(str(paths["b"]), adapter_name="b")
    reference.base_model.set_adapter(["a", "b"])
    ids = torch.tensor([PROMPTS[1][:16]])
    want = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
    with reference.disable_adapter():
        base = torch.log_softmax(reference(input_ids=ids).logits[0], -1)

    def logprobs(mix) -> torch.Tensor:
        """Three rows in one step: `mix`, the base, `mix` again (the pairs interleave)."""
        n = ids.shape[1]
        slots = torch.tensor([[0] * n + [-1] * n + [0] * n, [1] * n + [-1] * n + [1] * n])
        scales = torch.tensor([[mix[0][1]] * 3 * n, [mix[1][1]] * 3 * n])
        with lora_model.gather(lora_model.build_batch(slots, scales)):
            logits = lora_model.model(input_ids=ids.repeat(3, 1)).logits
        return torch.log_softmax(logits, -1)

    both = logprobs(((0, 1.0), (1, 1.0)))
    assert (both[0] - want).abs().max() <= TOL and (both[2] - want).abs().max() <= TOL
    assert (both[1] - base).abs().max() <= TOL
    lora_model.merge(((0, 1.0), (1, 1.0)))
    assert (torch.log_softmax(lora_model.model(input_ids=ids).logits[0], -1) - want).abs().max() <= TOL
    lora_model.unmerge()
    mix = ((0, 0.5), (1, -1.0))
    gathered = logprobs(mix)[2]
    lora_model.merge(mix)
    merged = torch.log_softmax(lora_model.model(input_ids=ids).logits[0], -1)
    lora_model.unmerge()
    assert (gathered - merged).abs().max() <= TOL and (gathered - want).abs().max() > 1e-2


@torch.no_grad()
def test_a_slot_reloaded_with_another_adapter_serves_only_the_new_one(adapters):
    """b (rank 4) over a (rank 8) in one slot: none of a's expert rows past rank 4 may linger."""
    paths = adapters("mixtral")
    lora_model = wrap_model(model("mixtral"), max_loras=1)
    for name in ("a", "b"):
        lora_model.load_slot(0, load_adapter(name, paths[name], lora_model.spec, max_rank=lora_model.max_rank))
    ids = torch.tensor([PROMPTS[2]])
    with lora_model.gather(lora_model.build_batch(torch.zeros(ids.shape[1], dtype=torch.long))):
        ours = torch.log_softmax(lora_model.model(input_ids=ids).logits[0], -1)
    reference = PeftModel.from_pretrained(model("mixtral"), str(paths["b"])).eval()
    assert (ours - torch.log_softmax(reference(input_ids=ids).logits[0], -1)).abs().max() <= TOL
