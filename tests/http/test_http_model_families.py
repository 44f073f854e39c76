"""A family served since issue 26, through `--model DIR` as a user brings it, and one refused.

Falcon's old decoder (multi-query attention, one layer norm, parallel attention and MLP) drops the
`**kwargs` its attention needs: before the step context (server/engine/attention.py) /ready said 200
and every request was a 500. Its tiny random model is saved as a local HF directory with the default
tokenizer, served by the app as `loraserve serve --model DIR --adapter a=...` would, and its greedy
answers over HTTP are compared with PEFT's, for the base and the adapter.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig

from server.http.app import create_app
from server.http.settings import Settings
from support.engine import load_tokenizer
from support.families import adapter_kwargs, build
from support.servers import serve_in_thread, start_process

FAMILY = "falcon_old"
PROMPT = [1, 504, 3087, 310, 9, 2743, 11]  # token ids: no tokenizer rule between us and the model
NUM_TOKENS = 5
TOL = 1e-4  # fp32 |Δ logprob|, as tests/engine/test_model_families.py


@pytest.fixture(scope="module")
def falcon(tmp_path_factory, make_peft_adapter):
    """(model directory, adapter directory, the pristine model) for a tiny Falcon with the default
    tokenizer's vocabulary."""
    root = tmp_path_factory.mktemp("falcon")
    model = build(FAMILY, vocab_size=len(load_tokenizer()))
    model.save_pretrained(root / "tiny-falcon")
    load_tokenizer().save_pretrained(root / "tiny-falcon")
    adapter = make_peft_adapter(model, root / "a", **adapter_kwargs(FAMILY)["a"])
    return root / "tiny-falcon", adapter, model


@torch.no_grad()
def peft_greedy_logprobs(model, adapter_dir, adapter: str | None) -> list[float]:
    """PEFT's greedy continuation of PROMPT, one forward per token, and each chosen token's logprob."""
    reference = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="a").eval()
    ids, logprobs = list(PROMPT), []
    for _ in range(NUM_TOKENS):
        logits = reference(input_ids=torch.tensor([ids]), adapter_names=[adapter or "__base__"]).logits[0, -1]
        row = torch.log_softmax(logits.float(), -1)
        ids.append(int(row.argmax()))
        logprobs.append(row.max().item())
    reference.unload()  # the pristine model is shared by both calls
    return logprobs


def test_a_falcon_directory_serves_equal_to_peft_over_http(falcon):
    directory, adapter_dir, model = falcon
    app = create_app(Settings(model=str(directory), adapters=[f"a={adapter_dir}"]))
    with serve_in_thread(app) as url:
        for name, adapter in (("tiny-falcon", None), ("a", "a")):
            response = httpx.post(
                f"{url}/v1/completions",
                json=dict(model=name, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0, logprobs=0, ignore_eos=True),
                timeout=120,
            )
            assert response.status_code == 200, response.text
            served = response.json()["choices"][0]["logprobs"]["token_logprobs"]
            expected = peft_greedy_logprobs(model, adapter_dir, adapter)
            assert len(served) == NUM_TOKENS
            assert max(abs(a - b) for a, b in zip(served, expected)) <= TOL, (name, served, expected)


def test_an_unserved_family_stops_the_server_naming_it(tmp_path):
    """As any bad setting: exit 2 before the server starts, the architecture named (from config.json alone)."""
    config = AutoConfig.for_model("bloom", n_layer=2, n_head=4, hidden_size=64, architectures=["BloomForCausalLM"])
    config.save_pretrained(tmp_path / "tiny-bloom")  # refused from its config: no weights needed
    server = start_process(tmp_path, "--model", str(tmp_path / "tiny-bloom"))
    try:
        code = server.process.wait(timeout=120)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)
    log = server.log_tail()
    assert code == 2, log
    assert (
        "invalid settings: model:" in log and "BloomForCausalLM" in log and "not a model family loraserve serves" in log
    )
