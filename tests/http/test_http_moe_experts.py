"""An MoE adapter on the experts and router, uploaded over HTTP to a Mixtral brought as `--model DIR`.

PEFT's all-linear on Mixtral targets the experts' stacked projections and the router through
`target_parameters`; such an upload was a 422 `unsupported_adapter` (issue 26, item 4). Here it is
accepted and its greedy answers over HTTP equal PEFT's, and an adapter on a parameter the server
cannot adapt is still a 422 naming that parameter.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from peft import PeftModel

from server.http.app import create_app
from server.http.settings import Settings
from support.engine import load_tokenizer
from support.families import build
from support.http import adapter_files, assert_openai_error
from support.servers import serve_in_thread

PROMPT = [1, 504, 3087, 310, 9, 2743, 11]
NUM_TOKENS = 5
TOL = 1e-4  # fp32 |Δ logprob|, as tests/engine/test_moe_experts.py

pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, make_peft_adapter):
    """(model directory, experts adapter, unservable adapter, the pristine model)."""
    root = tmp_path_factory.mktemp("mixtral")
    model = build("mixtral", vocab_size=len(load_tokenizer()))
    model.save_pretrained(root / "tiny-mixtral")
    load_tokenizer().save_pretrained(root / "tiny-mixtral")
    experts = make_peft_adapter(model, root / "experts", r=4, lora_alpha=8, target_modules="all-linear")
    head = make_peft_adapter(model, root / "head", r=4, target_modules=["q_proj"], target_parameters=["lm_head.weight"])
    return root / "tiny-mixtral", experts, head, model


@torch.no_grad()
def peft_greedy_logprobs(model, adapter_dir) -> list[float]:
    reference = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids, logprobs = list(PROMPT), []
    for _ in range(NUM_TOKENS):
        row = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        ids.append(int(row.argmax()))
        logprobs.append(row.max().item())
    reference.unload()
    return logprobs


def test_an_expert_adapter_uploads_and_serves_equal_to_peft_and_an_unservable_one_is_named(mixtral, tmp_path):
    directory, experts, head, model = mixtral
    app = create_app(Settings(model=str(directory), adapter_store=tmp_path / "store", kernel_choice="packed"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        assert http.post("/v1/adapters", data={"name": "experts"}, files=adapter_files(experts)).status_code == 201
        request = dict(prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0, logprobs=0, ignore_eos=True)
        response = http.post("/v1/completions", json=dict(model="experts", **request))
        assert response.status_code == 200, response.text
        served = response.json()["choices"][0]["logprobs"]["token_logprobs"]
        expected = peft_greedy_logprobs(model, experts)
        assert len(served) == NUM_TOKENS and max(abs(a - b) for a, b in zip(served, expected)) <= TOL
        refused = http.post("/v1/adapters", data={"name": "head"}, files=adapter_files(head))
        error = assert_openai_error(refused, 422, "target_parameters", "lm_head.weight")
        assert error["code"] == "unsupported_adapter"
