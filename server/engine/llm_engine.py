"""LLMEngine: one resident base model serving many adapters with continuous batching.

Each `step()` is the whole spine: schedule -> choose LoRA mode -> run -> sample -> postprocess.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from adapters import BASE_MIX, AdapterNotFoundError, AdapterRegistry, SlotMix, wrap_model
from adapters.kernel_plan import choose_kernels

from .adapter_mode import GATHER, ModeDecision, ModePolicy
from .adapter_ref import BASE_REF, COMPOSED_LABEL, AdapterRef, Term, bind, identity
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import NonFiniteOutputError, PromptTooLongError, QueueFullError, RequestError
from .grammar import GrammarCompiler, MaskFiller, constrained_rows, consume
from .kv_cache import KVCache
from .memory_plan import plan_memory
from .model_families import inspect_model
from .model_loader import BaseModel as LoadedModel
from .model_loader import default_cache_dir
from .model_runner import ModelRunner, PromptRows
from .prefix_cache import PrefixCache
from .sampler import non_finite_rows, prompt_logprobs, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, StepPlan
from .sequence import Completion, RequestOutput, Sequence, TokenLogprob
from .stats import EngineStats, RequestStats, StepStats
from .tokenization import Tokenization

log = logging.getLogger(__name__)


class LLMEngine:
    """Synchronous engine: `add_request` + `step()`, or `generate()` for scripts."""

    def __init__(self, base: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.tokenizer, self.model_name = base.tokenizer, base.name
        kernels = choose_kernels(
            base.model, config.kernel_choice, config.quantization, config.cache_dir or default_cache_dir()
        )
        self.lora_model = wrap_model(
            base.model,
            max_loras=config.max_loras,
            max_rank=config.max_lora_rank,
            kernels=kernels,
            quantization=config.quantization,
        )
        self.registry = AdapterRegistry(self.lora_model, max_cpu_loras=config.max_cpu_loras)
        self.attention = inspect_model(base.model)  # the KV geometry; an unserved feature is refused here
        model_config = base.model.config
        row_kernels, decode_graphs = _step_kernels(config, self.lora_model.device)
        self.memory = plan_memory(self.lora_model, model_config, self.attention, config, captures_graphs=decode_graphs)
        self.lora_model.merge_budget = self.memory.merge_buffers
        log.info("%s", self.memory.describe())
        self.cache = KVCache(
            num_layers=self.attention.num_layers,
            num_kv_heads=self.attention.num_kv_heads,
            head_dim=self.attention.head_dim,
            capacity_tokens=self.memory.kv_tokens,
            dtype=base.model.dtype,
            device=self.lora_model.device,
            block_size=config.block_size,
            scratch_page=decode_graphs,
            windows=[layer.window for layer in self.attention.layers],
        )
        self.prefix_cache = PrefixCache(self.cache, enabled=config.enable_prefix_caching)
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings,
            self.cache.capacity_tokens,
        )
        self.scheduler = Scheduler(
            self.cache,
            self.registry,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_bypass_steps=config.max_bypass_steps,
            prefix=self.prefix_cache,
        )
        self.runner = ModelRunner(
            self.lora_model,
            self.cache,
            row_kernels=row_kernels,
            decode_graphs=decode_graphs,
            max_rows=config.max_num_seqs,
            max_positions=self.max_model_len,
            compile_decode="off" if config.enforce_eager else config.compile_decode,
            cache_dir=config.cache_dir or default_cache_dir(),
        )
        self.policy = ModePolicy(self.lora_model, config.merge_after_steps, config.merge_min_steps_left)
        self.eos_token_ids = frozenset(_eos_ids(base))
        self.vocab_size = base.model.get_input_embeddings().num_embeddings
        self.tokenization = Tokenization(self.tokenizer, self.vocab_size)  # shared with HTTP
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids, config)  # thread-safe
        self.mask_filler = MaskFiller(self.grammars)
        self.requests: dict[str, Sequence] = {}
        self.counters = EngineStats(
            kv_capacity_tokens=self.cache.capacity_tokens,
            memory_plan=self.memory.parts(),
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
        )
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.request_listeners: list[Callable[[RequestStats], None]] = []
        self._request_ids = itertools.count()
        self.snapshot = self.stats()  # refreshed by the engine thread; safe to read from any thread
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all()

    # Requests
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: AdapterRef = BASE_REF,
        request_id: str | None = None,
    ) -> Sequence:
        """Queue a request; raises a typed error (unknown adapter, too long, queue full) instead.

        Each of `adapter`'s terms is bound to the version registered now: a later replace or delete
        of the name does not change or fail it, and its prefix-cache lookups use that version's
        identity (adapter_ref.py)."""
        params = params or SamplingParams()
        if not adapter.is_composition and adapter.label is not None and adapter.label not in self.registry:
            raise AdapterNotFoundError(f"adapter {adapter.label!r} does not exist")
        prompt_ids = self.tokenization.encode_prompt(prompt)
        max_tokens = self.max_model_len - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        if len(prompt_ids) + max(max_tokens, 1 if params.max_tokens is None else 0) > self.max_model_len:
            raise PromptTooLongError(
                f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                f"maximum context length of {self.max_model_len} tokens",
                field="prompt",
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{self.config.max_waiting} requests are already waiting")
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", field="request_id")
        # Compiled already (and cached) when the HTTP layer checked the request: this is a copy.
        self._check_token_ids(params)
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens)
        seq = Sequence(request_id, prompt_ids, params, adapter, detok, max_tokens, matcher=matcher)
        seq.bound = bind(self.registry, adapter, self.config.max_loras)
        seq.block_hashes = self.prefix_cache.hash_blocks(identity(seq.bound, adapter), params.cache_salt, prompt_ids)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Token ids a step will index with, checked before the step: one bad id inside a step would
        fail every request sharing it."""
        for field, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise RequestError(
                    f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})", field=field
                )

    def abort(self, request_id: str, error: Exception | None = None) -> RequestOutput | None:
        """Stop a request now and free its KV cache and adapter slot; `error` says why the engine
        failed it (None: its client went away)."""
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return None
        seq.error = error
        self._finish(seq, "abort")
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # The spine
    def idle(self, interrupted: Callable[[], bool]) -> None:
        """Work for an idle engine: settle a compiled-step verdict measured under load (abandoned
        when `interrupted()`: new work arrived)."""
        self.runner.idle(interrupted)

    def step(self) -> list[RequestOutput]:
        """schedule -> choose the LoRA mode -> run and sample -> advance each request."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        outputs = [self.abort(seq.request_id, exc) for seq, exc in plan.failed]
        if plan.scheduled:
            mixes = {seq.slot_mix for seq, _ in plan.scheduled}  # before advancing: finishing releases slots
            steps_left = max(seq.max_tokens - len(seq.output_token_ids) for seq, _ in plan.scheduled)
            decision = self.policy.choose(mixes, steps_left, self.runner.gathers_faster(plan.scheduled))
            sampling, tokens, logprobs = self._run(plan, decision)
            outputs += self._advance(plan, sampling, tokens, logprobs)
            self._record_step(plan, mixes, decision, time.perf_counter() - started)
        return outputs

    def _run(self, plan: StepPlan, decision: ModeDecision) -> tuple[list[Sequence], list[int], list]:
        """The forward pass, then one token for each sequence that samples; prompt rows that asked
        for scores are scored on the way. Grammar masks are filled while the forward runs."""
        masking = self.mask_filler.start(constrained_rows(plan.scheduled))
        logits, sampling, scored = self.runner.run(plan.scheduled, gather=decision.mode == GATHER)
        for rows in scored:
            self._score_prompt(rows)
        masks = masking.result() if masking is not None else None
        logits, sampling = self._drop_failed_rows(logits, sampling)
        return sampling, *sample(logits, sampling, masks, self.eos_token_ids)

    def _drop_failed_rows(self, logits: torch.Tensor, sampling: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """Fail the sequences whose logits are not finite (or whose prompt scores were not), and
        sample the others as if those rows were never there."""
        for row in non_finite_rows(logits):
            sampling[row].error = _non_finite(sampling[row].adapter, self.lora_model.dtype)
        keep = [row for row, seq in enumerate(sampling) if seq.error is None]
        if len(keep) == len(sampling):
            return logits, sampling
        return logits[keep], [sampling[row] for row in keep]

    def _advance(
        self, plan: StepPlan, sampling: list[Sequence], tokens: list[int], logprobs: list
    ) -> list[RequestOutput]:
        now = time.monotonic()
        prompt_only = [seq for seq, num_new in plan.scheduled if self._account(seq, num_new, now)]
        failed = [self.abort(seq.request_id, seq.error) for seq, _ in plan.scheduled if seq.error is not None]
        outputs = [self._append(seq, token, logprob, now) for seq, token, logprob in zip(sampling, tokens, logprobs)]
        return failed + outputs + [self._finish_prompt_only(seq) for seq in prompt_only if seq.error is None]

    def _account(self, seq: Sequence, num_new: int, now: float) -> bool:
        """Count the tokens this step computed for `seq`; True if its prompt was all it asked for."""
        seq.num_computed += num_new
        self.prefix_cache.register(seq)
        if seq.scheduled_time is None:
            seq.scheduled_time = now
            self.counters.num_prompt_tokens += len(seq.prompt_token_ids)
        return not seq.max_tokens and seq.num_computed == seq.num_tokens

    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[AdapterRef | str | tuple[Term, ...] | None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in order.

        `adapters`: one per prompt, a reference or what AdapterRef.of takes (a name, None for the
        base, or (name, scale) terms), converted here once."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        refs = [AdapterRef.of(a) for a in adapters] if adapters is not None else [BASE_REF] * len(prompts)
        seqs: list[Sequence] = []
        try:
            for prompt, sampling, ref in zip(prompts, params_list, refs):
                seqs.append(self.add_request(prompt, sampling, ref))
        except Exception:  # all or nothing: do not leave the accepted ones running
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        while any(not s.is_finished for s in seqs):
            self.step()
        return [
            Completion(
                s.request_id,
                s.detokenizer.text,
                s.output_token_ids,
                s.logprobs,
                s.finish_reason,
                len(s.prompt_token_ids),
                s.prompt_logprobs if s.params.prompt_logprobs is not None else None,
            )
            for s in seqs
        ]

    def publish_stats(self) -> None:
        """Refresh `snapshot` (call from the thread that steps the engine)."""
        self.snapshot = self.stats()

    def stats(self) -> EngineStats:
        """A snapshot of the counters plus the current gauges."""
        snapshot = dataclasses.replace(self.counters, steps_by_mode=self.counters.steps_by_mode.copy())
        snapshot.num_running = len(self.scheduler.running)
        snapshot.num_waiting = len(self.scheduler.waiting)
        snapshot.kv_used_tokens = sum(s.num_computed for s in self.scheduler.running)
        snapshot.kv_reserved_tokens = self.cache.num_reserved_tokens
        snapshot.kv_cached_tokens = self.cache.num_cached_tokens
        snapshot.prefix_cache_queries = self.prefix_cache.num_queries
        snapshot.prefix_cache_hits = self.prefix_cache.num_hits
        snapshot.num_prefix_cache_evictions = self.cache.num_evicted_blocks
        snapshot.running_adapters = sorted({s.label for s in self.scheduler.running if s.label})
        snapshot.waiting_adapters = sorted({s.label for s in self.scheduler.waiting if s.label})
        snapshot.num_preemptions = self.scheduler.num_preemptions
        snapshot.resident_adapters = [name for name in self.registry.resident() if name]
        snapshot.host_adapters = self.registry.host_cached()
        snapshot.num_registered_adapters = len(self.registry)
        snapshot.adapter_sizes = self.registry.sizes()
        snapshot.num_adapter_loads = self.registry.num_loads
        snapshot.num_adapter_evictions = self.registry.num_evictions
        snapshot.merge_buffer_bytes = self.lora_model.merge_buffer_bytes
        return snapshot

    # Postprocess
    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        seq.output_token_ids.append(token)
        self.counters.num_generation_tokens += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.first_token_time = seq.first_token_time or now
        params, reason = seq.params, None
        if seq.matcher is not None and not consume(seq.matcher, token, self.eos_token_ids):  # a grammar limit
            seq.error = self.grammars.evict_failed(params.grammar, seq.matcher, len(seq.output_token_ids))
            reason = "abort"
        # A grammar allows EOS only once its text is complete: then EOS ends it, ignore_eos or not.
        elif token in params.stop_token_ids or (
            token in self.eos_token_ids and (not params.ignore_eos or seq.matcher is not None)
        ):
            reason = "stop"
        elif seq.detokenizer.add(token) or (seq.matcher is not None and seq.matcher.is_stopped()):
            reason = "stop"  # a stop string, or the grammar is complete and allows nothing more
        elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            self._finish(seq, reason)
        return self._output(seq)

    def _score_prompt(self, rows: PromptRows) -> None:
        seq, prompt = rows.seq, rows.seq.prompt_token_ids
        if not seq.prompt_logprobs:  # nothing predicts the first token (vLLM reports None for it)
            seq.prompt_logprobs.append(TokenLogprob(prompt[0], None, []))
        if rows.targets and non_finite_rows(rows.logits):
            seq.error = _non_finite(seq.adapter, self.lora_model.dtype)
        elif rows.targets:
            seq.prompt_logprobs += prompt_logprobs(
                rows.logits, prompt[rows.targets.start : rows.targets.stop], seq.params.prompt_logprobs
            )

    def _finish_prompt_only(self, seq: Sequence) -> RequestOutput:
        """max_tokens 0: the prompt is in (and scored, if asked); nothing is sampled."""
        self._finish(seq, "length")
        return self._output(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason, seq.finish_time = reason, time.monotonic()
        del self.requests[seq.request_id]
        stats = RequestStats(
            seq.request_id,
            seq.label,
            reason,
            len(seq.prompt_token_ids),
            len(seq.output_token_ids),
            _since(seq.arrival_time, seq.scheduled_time),
            _since(seq.arrival_time, seq.first_token_time),
            seq.finish_time - seq.arrival_time,
            seq.num_preemptions,
            seq.prefix_cache_queries,
            seq.prefix_cache_hits,
        )
        self.counters.num_finished += 1
        for listener in self.request_listeners:
            listener(stats)

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.is_finished
        tokens = seq.output_token_ids[seq.num_emitted_tokens :]
        logprobs = seq.logprobs[seq.num_emitted_logprobs :]
        prompt_scores = seq.prompt_logprobs[seq.num_emitted_prompt_logprobs :]
        seq.num_emitted_tokens, seq.num_emitted_logprobs = len(seq.output_token_ids), len(seq.logprobs)
        seq.num_emitted_prompt_logprobs = len(seq.prompt_logprobs)
        return RequestOutput(
            seq.request_id,
            seq.detokenizer.delta(finished),
            tokens,
            logprobs,
            finished,
            seq.finish_reason,
            len(seq.prompt_token_ids),
            len(seq.output_token_ids),
            prompt_scores,
            seq.error,
        )

    def _record_step(self, plan: StepPlan, mixes: set[SlotMix], decision: ModeDecision, duration: float) -> None:
        counters = self.counters
        counters.num_steps += 1
        counters.steps_by_mode[decision.mode] += 1
        if decision.swap_seconds is not None:
            counters.num_swaps += 1
            counters.swap_seconds += decision.swap_seconds
        step = StepStats(
            decision.mode,
            len(plan.scheduled),
            plan.num_tokens,
            len(mixes - {BASE_MIX}),
            duration,
            decision.swap_seconds,
        )
        for listener in self.step_listeners:
            listener(step)


def _non_finite(ref: AdapterRef, dtype: torch.dtype) -> NonFiniteOutputError:
    """Why a request whose logits are not finite fails, naming what it ran (an adapter, a composition
    or the base) and the field that chose it."""
    if ref.label == COMPOSED_LABEL:
        what, field = f"the composition of {', '.join(map(repr, ref.names))}", "adapters"
    else:
        kind = "composition" if ref.is_composition else "adapter"
        what, field = (f"{kind} {ref.label!r}" if ref.label else "the base model"), "model"
    dtype_name = str(dtype).removeprefix("torch.")
    return NonFiniteOutputError(
        f"the logits of {what} are not finite (its weights overflow {dtype_name} activations)", field=field
    )


def _since(start: float, end: float | None) -> float | None:
    return None if end is None else end - start


def _eos_ids(base: LoadedModel) -> set[int]:
    ids = {base.tokenizer.eos_token_id}
    generation_eos = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return {i for i in ids if i is not None}


def _step_kernels(config: EngineConfig, device: torch.device) -> tuple[bool, bool]:
    """(row kernels, decode graphs) for this device: both on CUDA by default (the launch-bound
    device); elsewhere the per-sequence torch path, which measures faster on CPU."""
    row_kernels = config.step_kernels == "triton" or (config.step_kernels == "auto" and device.type == "cuda")
    if row_kernels and device.type == "cuda" and not _have_triton():
        if config.step_kernels == "triton":
            raise ValueError("--step-kernels triton needs the triton package, which is not installed")
        log.warning("triton is not installed: CUDA steps run the per-sequence torch kernels")
        row_kernels = False
    if row_kernels and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "--step-kernels triton runs off CUDA only in Triton's interpreter (slow; for tests): set "
            "TRITON_INTERPRET=1 before starting, or use --step-kernels auto"
        )
    graphs = config.decode_graphs
    if graphs is None:
        graphs = row_kernels and device.type == "cuda" and not config.enforce_eager
    return row_kernels, graphs and row_kernels


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
