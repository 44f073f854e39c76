"""What a DoRA row and a two-adapter composition row cost against plain LoRA rows, in the same
mixed-batch decode step (issue 10). Default model, fp32, CPU, packed base weights (the engine's default).

Workload: one decode step of 16 rows at a 128-token context, rows packed by adapter as the engine
packs them, 4 adapters x 4 rows (r=16 on q,k,v,o). Variants, each timed against the plain step in
alternation (ABBA, medians after a warm-up, as adapter_ops.py does):
- dora: the 4 rows of one adapter use a DoRA adapter of the same rank and targets instead;
- composed: those 4 rows use a composition of two of the adapters (scales 0.5 and 1.0).
The per-row cost is the step's extra time over the plain step, divided by the 4 rows that changed,
next to a plain LoRA row's own cost (the plain step's time over the base step, per adapter row).

Usage: python benchmarks/variant_rows.py [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).parent))
from adapter_ops import CONTEXT_LEN, NUM_ROWS, machine_info, sample_pairs  # noqa: E402

from adapters import AdapterRegistry, LoraBatch, wrap_model  # noqa: E402
from adapters.kernels import PACKED, KernelPlan  # noqa: E402
from server.engine.model_loader import load_base_model  # noqa: E402

RANK, TARGETS = 16, ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_OUT = Path(__file__).parent / "results" / "variant_rows.json"


def save_adapter(base, path: Path, seed: int, **extra) -> Path:
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False, **extra),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(str(path))
    return path


def step(lm, batch, cache, ids):
    with lm.gather(batch):
        lm.model(ids, cache=cache, use_cache=True)
    cache.crop(CONTEXT_LEN - cache.get_seq_length())


def run(repeats: int) -> dict:
    torch.set_num_threads(1)
    base = load_base_model().model
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        with torch.inference_mode(False):
            paths = {f"a{i}": save_adapter(base, Path(tmp) / f"a{i}", i) for i in range(4)}
            paths["dora"] = save_adapter(base, Path(tmp) / "dora", 9, use_dora=True)
        lm = wrap_model(base, max_loras=5, max_rank=RANK, kernels=KernelPlan(PACKED))
        registry = AdapterRegistry(lm)
        slots = {name: (registry.add(name, path), registry.acquire(name).slot)[1] for name, path in paths.items()}
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, lm.model.config.vocab_size, (NUM_ROWS, CONTEXT_LEN), generator=generator)
        cache = lm.model(prompt, use_cache=True, logits_to_keep=1).cache
        ids = torch.randint(0, lm.model.config.vocab_size, (NUM_ROWS, 1), generator=generator)
        per = NUM_ROWS // 4
        plain_slots = torch.tensor([slots[f"a{i}"] for i in range(4)]).repeat_interleave(per)
        plain = lm.build_batch(plain_slots)
        dora_slots = plain_slots.clone()
        dora_slots[-per:] = slots["dora"]
        dora = lm.build_batch(dora_slots)
        composed_slots = torch.stack([plain_slots, torch.full((NUM_ROWS,), -1)])
        composed_scales = torch.ones(2, NUM_ROWS)
        composed_slots[:, -per:] = torch.tensor([[slots["a0"]], [slots["a1"]]])
        composed_scales[0, -per:] = 0.5
        composed = LoraBatch.build(composed_slots, token_scales=composed_scales, direct_slots=lm.dora_slots)
        timings = {}
        for name, batch in (("base", None), ("dora", dora), ("composed", composed)):
            timings[name] = sample_pairs(
                lambda b=batch: step(lm, b, cache, ids), lambda: step(lm, plain, cache, ids), repeats
            )
    med = {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in timings.items()}
    plain_row = (med["base"][1] - med["base"][0]) / NUM_ROWS  # a plain LoRA row over a base row
    result = {
        "machine": machine_info(),
        "config": {
            "repeats": repeats,
            "rank": RANK,
            "targets": TARGETS,
            "num_rows": NUM_ROWS,
            "context_len": CONTEXT_LEN,
        },
        "plain_step_ms": med["base"][1],
        "base_step_ms": med["base"][0],
        "plain_row_ms": plain_row,
    }
    for name in ("dora", "composed"):
        variant, reference = med[name]
        extra = (variant - reference) / per
        paired = statistics.median(a / b for a, b in zip(*timings[name]))
        result[name] = {
            "step_ms": variant,
            "plain_step_ms": reference,
            "paired_step_ratio": paired,
            "extra_per_row_ms": extra,
            "row_cost_vs_plain_row": (plain_row + extra) / plain_row,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(args.repeats)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
