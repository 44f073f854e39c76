"""CUDA parity check: loraserve against PEFT on one device, in fp32 and bf16.

Two random-weight Llamas (nothing downloaded, no weights needed): a tiny 2-layer one, and one with
the architecture of the model directory given by --model-dir (config.json + tokenizer; by default
.gpu/model, the default model's files without its weights). Two PEFT adapters with non-zero B.

Checks, each printed as one PASS/FAIL line and collected in a JSON summary (--out):
  logits  gather (runs and grouped bmm) and merged logits of a mixed batch (rows on the base, a1, a2)
          against PEFT's, within a tolerance measured from PEFT's own noise on this device (mixed
          batch against each adapter's own batch, each row alone against the batch), never below a
          few fp32 steps; the adapters must move the logits by over 10x that tolerance.
  bf16    PEFT keeps adapter weights in fp32, we run them in bf16: the tolerance also allows twice
          PEFT's own bf16 error against its fp32 logits, and our error against those fp32 logits
          must be at most twice PEFT's.
  engine  LLMEngine.generate on mixed adapters, greedy, fp32: the tokens equal PEFT `generate` run
          per request (tiny model: exactly; the random 30-layer model: exactly, or the first
          difference is a near-tie in PEFT's own scores, as its random logits are nearly flat), on
          the CUDA default (Triton row kernels, decode replayed from captured graphs: also checked
          to have replayed) and on the per-sequence torch path; and in bf16 on the default, where a
          first difference must be a near-tie at bf16's resolution.

Usage: python benchmarks/cuda_check.py [--device cuda] [--model-dir .gpu/model] [--out PATH]
Exit status 1 if any check fails. `--device cpu` runs the same on CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the --device cpu smoke run: Triton kernels only run interpreted there,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # and triton reads this when first imported (by peft)

import peft  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from adapters import AdapterRegistry, LoraBatch, wrap_model  # noqa: E402
from server.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from server.engine.model_loader import BaseModel  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402

BASE = "__base__"  # PEFT's adapter name for a plain base row
ROWS = ["a1", BASE, "a2", "a1", BASE, "a1"]  # unequal groups, base rows between adapter rows
ADAPTERS = {
    "a1": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "a2": dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True),
}
GROUPED = dict(max_direct_runs=0, min_run_rows=10**9)  # every adapter row through the grouped bmm
FLOAT_STEPS = 128  # fp32 steps of the largest logit allowed whatever the measured noise
PROMPTS = [
    "Hello there, how are you",
    "The quick brown fox jumps over",
    "1 2 3 4 5",
    "Once upon a time",
    "def fibonacci(n):",
    "List three colors:",
]
GEN_ADAPTERS = [None, "a1", "a2", "a1", None, "a2"]


class Checks:
    def __init__(self):
        self.results: list[dict] = []

    def add(self, name: str, passed: bool, **details) -> bool:
        self.results.append({"name": name, "passed": bool(passed), **details})
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in details.items())
        print(f"{'PASS' if passed else 'FAIL'} {name} {shown}", flush=True)
        return passed

    def run(self, name: str, fn) -> None:
        """Run a group of checks; an exception fails the group instead of stopping the script."""
        try:
            fn()
        except Exception as exc:  # report and go on with the next group
            traceback.print_exc()
            self.add(name, False, error=f"{type(exc).__name__}: {exc}")


# Models and adapters
def tiny_config(vocab_size: int) -> LlamaConfig:
    """As tests/support/engine.py: init scaled up so greedy argmaxes are far apart."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build(config) -> torch.nn.Module:
    """A seeded random model, fp32 on the CPU (the same weights whatever the device)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def make_peft_adapter(base: torch.nn.Module, path: Path, **lora_kwargs) -> Path:
    """As tests/support/peft.py: a PEFT adapter with random, non-zero A and B, seeded by its name."""
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(path.name.encode()))
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    assert all(bool(p.any()) for n, p in model.named_parameters() if ".lora_B." in n), "every lora_B must be non-zero"
    model.save_pretrained(str(path))
    return path


def load_peft(base: torch.nn.Module, paths: dict[str, Path]) -> peft.PeftModel:
    (first, first_path), *rest = paths.items()
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(first_path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


# Logits
@torch.no_grad()
def peft_logits(model: peft.PeftModel, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    return model(ids, adapter_names=rows).logits.float()


@torch.no_grad()
def peft_merged_logits(model: peft.PeftModel, name: str, ids: torch.Tensor) -> torch.Tensor:
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    model.merge_adapter(adapter_names=[name])
    try:
        return model(ids).logits.float()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.unmerge_adapter()
        model.load_state_dict(saved)


@torch.no_grad()
def gather_logits(lora_model, ids: torch.Tensor, row_slots: list[int], row_kernels=False, **split) -> torch.Tensor:
    token_slots = torch.tensor(row_slots).repeat_interleave(ids.shape[1])
    lora_model.row_kernels = row_kernels  # the Triton row kernels (adapters/lora_kernels.py) instead of runs/groups
    try:
        batch = (
            LoraBatch.build(token_slots, lora_model.device, **split) if split else lora_model.build_batch(token_slots)
        )
        with lora_model.gather(batch):
            return lora_model.model(ids).logits.float()
    finally:
        lora_model.row_kernels = False


@torch.no_grad()
def merged_logits(lora_model, ids: torch.Tensor, slot: int) -> torch.Tensor:
    lora_model.merge(slot)
    try:
        return lora_model.model(ids).logits.float()
    finally:
        lora_model.unmerge()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def peft_references(fp32_model, paths, ids, device, dtype) -> dict:
    """PEFT's logits for the mixed rows, each adapter's own batch, each row alone, and merged."""
    model = load_peft(fp32_model.to(device=device, dtype=dtype), paths)
    ref = {"mixed": peft_logits(model, ids, ROWS)}
    ref.update({name: peft_logits(model, ids, [name] * len(ROWS)) for name in {*ROWS}})
    ref["alone"] = torch.cat([peft_logits(model, ids[i : i + 1], [name]) for i, name in enumerate(ROWS)])
    ref.update({f"{name}-merged": peft_merged_logits(model, name, ids) for name in paths})
    del model
    return ref


def check_logits(
    checks: Checks, label: str, pristine, paths, device: str, dtype: torch.dtype, fp32_ref: dict | None
) -> dict:
    ids = torch.randint(0, pristine.config.vocab_size, (len(ROWS), 12), generator=torch.Generator().manual_seed(2)).to(
        device
    )
    ref = peft_references(copy.deepcopy(pristine), paths, ids, device, dtype)
    # PEFT against itself: the same math through other kernels (row subsets, batch of one row)
    peft_noise = max(
        max(max_diff(ref["mixed"][i], ref[name][i]) for i, name in enumerate(ROWS)),
        max_diff(ref["alone"], ref["mixed"]),
    )
    # bf16: PEFT runs its adapters in fp32 and we in bf16, so each rounds differently; allow twice
    # PEFT's own bf16 error against the fp32 reference (the "vs fp32" check below bounds ours)
    precision = max_diff(ref["mixed"], fp32_ref["mixed"]) if fp32_ref is not None else 0.0
    floor = FLOAT_STEPS * torch.finfo(torch.float32).eps * ref[BASE].abs().max().item()
    tol = max(2 * peft_noise, 2 * precision, floor)
    effect = min(max_diff(ref[name], ref[BASE]) for name in paths)
    checks.add(
        f"{label} adapters move logits far beyond tolerance",
        effect > 10 * tol,
        effect=effect,
        tol=tol,
        peft_noise=peft_noise,
        peft_vs_fp32=precision,
    )

    model = copy.deepcopy(pristine).to(device=device, dtype=dtype)
    lora_model = wrap_model(model, max_loras=4, max_rank=64)
    registry = AdapterRegistry(lora_model)
    for name, path in paths.items():
        registry.add(name, path)
    slots = {BASE: -1, **{name: registry.acquire(name).slot for name in paths}}
    row_slots = [slots[name] for name in ROWS]
    ours = {
        "runs": gather_logits(lora_model, ids, row_slots),
        "grouped": gather_logits(lora_model, ids, row_slots, **GROUPED),
        "row_kernels": gather_logits(lora_model, ids, row_slots, row_kernels=True),
    }
    errors = {}
    for split, got in ours.items():
        errors[f"gather_{split}"] = err = max_diff(got, ref["mixed"])
        checks.add(f"{label} gather ({split}) mixed batch == PEFT", err <= tol, max_err=err, tol=tol)
    for name in paths:
        rows = [i for i, row in enumerate(ROWS) if row == name]
        merged = merged_logits(lora_model, ids, slots[name])
        # merging rounds W0 + delta once: allow PEFT's own merged-vs-unmerged drift too
        merge_tol = max(tol, 2 * max_diff(ref[f"{name}-merged"], ref[name]))
        errors[f"merged_{name}"] = err = max_diff(merged[rows], ref[f"{name}-merged"][rows])
        checks.add(f"{label} merged {name} == PEFT merged", err <= merge_tol, max_err=err, tol=merge_tol)
    base_rows = [i for i, row in enumerate(ROWS) if row == BASE]
    with torch.no_grad():
        plain = copy.deepcopy(pristine).to(device=device, dtype=dtype)(ids).logits.float()
    errors["base_rows"] = err = max_diff(ours["runs"][base_rows], plain[base_rows])
    checks.add(f"{label} base rows == unwrapped model", err <= floor, max_err=err, exact=err == 0.0)
    if fp32_ref is not None:  # bf16: no further from the fp32 truth than PEFT in bf16 is
        ours_err = max(max_diff(got, fp32_ref["mixed"]) for got in ours.values())
        checks.add(
            f"{label} error vs fp32 PEFT <= 2x PEFT's",
            ours_err <= 2 * precision + floor,
            ours_err=ours_err,
            peft_err=precision,
        )
        errors.update(vs_fp32=ours_err, peft_vs_fp32=precision)
    del lora_model, model
    return {"ref": ref, "tol": tol, "peft_noise": peft_noise, "effect": effect, "errors": errors}


# Engine generate
@torch.no_grad()
def peft_greedy(model: peft.PeftModel, prompt_ids: list[int], n: int, adapter: str | None, device: str):
    """Greedy tokens from PEFT `generate`, EOS neither stopping nor suppressed, and the step scores."""
    ids = torch.tensor([prompt_ids], device=device)
    model.get_base_model().generation_config.eos_token_id = None
    config = GenerationConfig(
        eos_token_id=None,
        pad_token_id=2,
        do_sample=False,
        max_new_tokens=n,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, adapter_names=[adapter or BASE]
    )
    return out.sequences[0, ids.shape[1] :].tolist(), [s[0].float() for s in out.scores]


def check_generate(
    checks: Checks,
    label: str,
    pristine,
    tokenizer,
    paths,
    device: str,
    num_tokens: int,
    near_tie: float | None,
    dtype: torch.dtype = torch.float32,
    **config,
) -> dict:
    """The engine's greedy tokens against PEFT's; `config`: EngineConfig fields (the default on CUDA
    is the row kernels with captured decode; step_kernels="torch" is the per-sequence path)."""
    engine = LLMEngine(
        BaseModel(copy.deepcopy(pristine).to(device=device, dtype=dtype), tokenizer, label, Path(label)),
        EngineConfig(max_num_seqs=16, kv_cache_tokens=4096, **config),
    )
    for name, path in paths.items():
        engine.registry.add(name, path)
    params = SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    completions = engine.generate(PROMPTS, params, GEN_ADAPTERS)
    seconds = time.perf_counter() - started
    reference = load_peft(copy.deepcopy(pristine).to(device=device, dtype=dtype), paths)
    exact, ties, worst_gap, outputs = 0, 0, 0.0, []
    for prompt, adapter, completion in zip(PROMPTS, GEN_ADAPTERS, completions):
        expected, scores = peft_greedy(reference, tokenizer.encode(prompt), num_tokens, adapter, device)
        got = completion.token_ids
        if got == expected:
            exact += 1
        else:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            gap = (
                (scores[first][expected[first]] - scores[first][got[first]]).item()
                if first < len(got)
                else float("inf")
            )
            worst_gap = max(worst_gap, gap)
            ties += near_tie is not None and gap <= near_tie
        outputs.append({"adapter": adapter, "ours": got, "peft": expected})
    distinct = len({tuple(o["ours"]) for o in outputs[:3]})  # prompt-wise: different adapters, different text
    passed = exact + ties == len(PROMPTS)
    checks.add(
        f"{label} engine greedy == PEFT generate",
        passed,
        exact=f"{exact}/{len(PROMPTS)}",
        near_ties=ties,
        worst_gap=worst_gap,
        seconds=seconds,
    )
    stats = engine.stats()
    checks.add(
        f"{label} engine used gather steps", stats.steps_by_mode.get("gather", 0) > 0, steps=dict(stats.steps_by_mode)
    )
    graphs = engine.runner.graphs
    if graphs is not None and graphs.capture:
        replayed = sum(graphs.replays.values())
        captured = all(entry.graph is not None for entry in graphs.graphs.values())
        checks.add(f"{label} engine decoded from captured graphs", replayed > 0 and captured, replays=replayed)
    return {"outputs": outputs, "seconds": seconds, "distinct_first_three": distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".gpu" / "model",
        help="a directory with config.json and the tokenizer (weights not needed)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per request in the engine check")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for a smoke test")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    models = {"tiny": build(tiny_config(len(tokenizer))), "arch": build(AutoConfig.from_pretrained(args.model_dir))}
    checks, summary = Checks(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, pristine in models.items():
            paths = {
                name: make_peft_adapter(pristine, Path(tmp) / f"{label}-{name}", **kwargs)
                for name, kwargs in ADAPTERS.items()
            }
            fp32 = {}

            def logits_fp32(label=label, pristine=pristine, paths=paths):
                fp32.update(check_logits(checks, f"{label} fp32", pristine, paths, args.device, torch.float32, None))
                summary[f"{label}_fp32_logits"] = {k: v for k, v in fp32.items() if k != "ref"}

            def logits_bf16(label=label, pristine=pristine, paths=paths):
                result = check_logits(
                    checks, f"{label} bf16", pristine, paths, args.device, torch.bfloat16, fp32.get("ref")
                )
                summary[f"{label}_bf16_logits"] = {k: v for k, v in result.items() if k != "ref"}

            def generate(label=label, pristine=pristine, paths=paths):
                near_tie = None if label == "tiny" else 1e-3  # the random 30-layer model's logits are nearly flat
                for path, config in (("captured", {}), ("torch", {"step_kernels": "torch"})):
                    summary[f"{label}_fp32_generate_{path}"] = check_generate(
                        checks,
                        f"{label} fp32 {path}",
                        pristine,
                        tokenizer,
                        paths,
                        args.device,
                        args.tokens,
                        near_tie,
                        **config,
                    )

            def generate_bf16(label=label, pristine=pristine, paths=paths):
                # bf16 rounds each kernel's sums differently from PEFT's: a first difference must be a
                # near-tie at bf16's resolution (8 ulps of a logit of ~1), or none at all
                summary[f"{label}_bf16_generate_captured"] = check_generate(
                    checks,
                    f"{label} bf16 captured",
                    pristine,
                    tokenizer,
                    paths,
                    args.device,
                    args.tokens,
                    8 * 2**-8,
                    torch.bfloat16,
                )

            checks.run(f"{label} fp32 logits", logits_fp32)
            checks.run(f"{label} bf16 logits", logits_bf16)
            checks.run(f"{label} fp32 generate", generate)
            checks.run(f"{label} bf16 generate", generate_bf16)
            fp32.clear()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    failed = [c["name"] for c in checks.results if not c["passed"]]
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
        "models": {
            label: {"layers": m.config.num_hidden_layers, "hidden": m.config.hidden_size, "vocab": m.config.vocab_size}
            for label, m in models.items()
        },
        "checks": checks.results,
        "details": summary,
        "failed": failed,
        "passed": not failed,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    print(f"{'ALL PASS' if not failed else 'FAILED: ' + ', '.join(failed)} ({len(checks.results)} checks)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
