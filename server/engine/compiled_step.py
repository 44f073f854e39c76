"""Decode steps on CPU through one torch.compile'd (inductor) forward of the lean Llama pass.

At one row per sequence a decode step is ~30 layers of small ops between the matmuls (norms,
rotary, residuals, the MLP's gate), whose eager dispatch is a fixed cost per token that lower
precision does not shrink. Inductor fuses them into a few C++ loops. The matmuls stay the eager
pass's own kernels, fused q/k/v and gate/up included (the kernel plan's: oneDNN's packed matmul
where it measured faster), each one custom op (`loraserve::project`): traced as plain linears,
inductor ran them as MKL's GEMV, and the compiled step measured 0.6x the eager pass (77.9 against
47.9 ms a token on the AMD EPYC) although it dispatched far fewer ops.

What makes one compiled graph serve every decode step:
  - attention is one custom op per layer (`loraserve::pool_attend`) wrapping attention.py's `attend`
    with the step's KVStep read from a context variable: the pool writes, per-sequence SDPA and
    whatever masking `attend` does pass through untouched, and the graph does not break on them;
  - it serves one row (one stream, the case eager dispatch hurts most): a graph over an unbacked row
    count served any count but ran one stream 0.87x eager where the one-row graph ran 1.18x (same
    run, AMD EPYC 2 cores; docs/benchmarks.md), and batched steps keep oneDNN's packed matmuls;
  - a projection is its index into the step's kernels, looked up when it runs: a merge or unmerge
    swaps the kernel behind an index (W0's, or the merged weight's) without a guard failing or a
    recompilation (tests/engine/test_compiled_step.py counts them). The embedding's weight is a
    graph input for the same reason.
Gathered LoRA steps (rows on different adapters) run the eager lean pass: their per-run LoRA ops
are Python over the step's adapter mix. So do prompt chunks, int8 bases, per-row module copies,
and families the lean pass does not serve.

Inductor's compiled artifacts (FX graph cache) live under <cache dir>/inductor, so a restart
re-traces (seconds) but skips most of the C++ compilation. Whether the compiled step is faster is
measured at startup on this machine (interleaved with the eager pass) and cached per CPU model
under <cache dir>/compiled; where it is not faster, the eager pass runs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.backends.cpu import cpu_model_name
from adapters.quiet_check import QuietCheck

from .attention import KVStep, SeqSlice, attend
from .kv_cache import KVCache
from .lean_forward import SILU, LeanForward, _rms_norm

log = logging.getLogger(__name__)

LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip
MEASURED_ROWS = (1,)  # row counts compiled, and timed eager against compiled at startup (mode auto)
_step: ContextVar[KVStep | None] = ContextVar("loraserve_compiled_step", default=None)
_projections: ContextVar[list[Callable[[torch.Tensor], torch.Tensor]] | None] = ContextVar(
    "loraserve_projections", default=None
)


@torch.library.custom_op("loraserve::project", mutates_args=())
def project(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """The current step's base matmul number `index` (CompiledDecode.projections) on x [.., in]:
    x @ Wᵀ + bias by the eager pass's kernel, on the weight in use now (W0, or the merged one)."""
    return _projections.get()[index](x)


@project.register_fake
def _(x, index, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("loraserve::pool_attend", mutates_args=())
def pool_attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float
) -> torch.Tensor:
    """attention.attend for `layer` on the current step's pool: writes key/value into it, returns
    [1, N, H * D] (contiguous: o_proj's input). query [1, H, N, D]; key, value [1, KVH, N, D].
    The pool write is a side effect on tensors outside the graph, which reads them only here."""
    out = attend(layer, query, key, value, scaling, _step.get())  # [1, N, H, D]
    return out.reshape(1, out.shape[1], -1)


@pool_attend.register_fake
def _(query, key, value, layer, scaling):
    return query.new_empty(1, query.shape[2], query.shape[1] * query.shape[3])


class CompiledDecode:
    """run(ids [N], positions [N], rows [M], kv_step) -> logits [M, V], through the compiled graph."""

    def __init__(self, lean: LeanForward):
        self.model = lean.model
        self.head_dim = lean.head_dim
        inner = self.model.model
        self.parents = [[getattr(layer, part) for part, _ in LINEARS] for layer in inner.layers]
        self.linears = [[getattr(p, name) for p, (_, name) in zip(ps, LINEARS)] for ps in self.parents]
        self.embedding = inner.embed_tokens
        self.aliases: dict[nn.Parameter, torch.Tensor] = {}  # the embedding's W0 as a plain tensor
        self.is_silu = [type(layer.mlp.act_fn).__name__ in SILU for layer in inner.layers]
        # The base matmuls in the order the graph calls them: per layer q/k/v, o, gate/up, down
        # (one index for a fused group), then the head; each spec is (index, output sizes).
        self.projections: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.layer_specs = [
            (
                self._specs(lean, layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                self._specs(lean, layer.self_attn, ("o_proj",)),
                self._specs(lean, layer.mlp, ("gate_proj", "up_proj")),
                self._specs(lean, layer.mlp, ("down_proj",)),
            )
            for layer in inner.layers
        ]
        self.head_specs = self._specs(lean, self.model, ("lm_head",))
        self.graph = torch.compile(self._forward, dynamic=None, fullgraph=True)
        self.num_steps = 0  # decode steps run compiled (warm-up included)
        self.max_rows = max(MEASURED_ROWS)  # steps of more rows run eagerly (0: the measurement said eager)

    def _specs(self, lean: LeanForward, parent: nn.Module, names: tuple[str, ...]) -> list[tuple[int, list[int]]]:
        """Register the matmuls of `names`: one for a fused group, else one each."""
        group = lean.fused.get(parent)
        if group is not None and group.names == names:
            self.projections.append(group.base)
            return [(len(self.projections) - 1, group.sizes)]
        specs = []
        for name in names:
            module = getattr(parent, name)
            self.projections.append(getattr(module, "_base_forward", module))  # LoRA: W0 or merged; else itself
            specs.append((len(self.projections) - 1, [module.out_features]))
        return specs

    def can_run(self, num_rows: int) -> bool:
        """Whether a step of `num_rows` runs compiled: no more rows than measured faster, and the
        model still in the shape the graph reads: plain (not int8, not conv1d) LoRA linears on
        their parents, no per-row copy installed in their place."""
        if num_rows > self.max_rows:
            return False
        for parents, linears in zip(self.parents, self.linears):
            for parent, m, (_, name) in zip(parents, linears, LINEARS):
                if (
                    getattr(parent, name) is not m
                    or getattr(m, "int8", None) is not None
                    or getattr(m, "is_conv1d", False)
                ):
                    return False
        return True

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, kv_step: KVStep) -> torch.Tensor:
        step, projections = _step.set(kv_step), _projections.set(self.projections)
        self.num_steps += 1
        try:
            return self.graph(ids, positions, rows, self._embedding_weight())
        finally:
            _projections.reset(projections)
            _step.reset(step)

    def _embedding_weight(self) -> torch.Tensor:
        """The embedding's weight in use (W0, or merged with an embedding adapter), as a plain
        tensor: a Parameter where a merged tensor was would fail the graph's type guard and recompile."""
        merged = getattr(self.embedding, "merged_weight", None)
        if merged is not None:
            return merged
        weight = self.embedding.weight
        alias = self.aliases.get(weight)
        if alias is None:
            alias = self.aliases[weight] = weight.detach()
        return alias

    def _forward(self, ids, positions, rows, embed_w):
        inner = self.model.model
        hidden = F.embedding(ids[None], embed_w)  # [1, N, C]
        cos, sin = inner.rotary_emb(hidden, positions[None])  # [1, N, D]
        half = self.head_dim // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        shape = (1, ids.shape[0], -1, self.head_dim)
        for layer, is_silu, (qkv, o, gate_up, down) in zip(inner.layers, self.is_silu, self.layer_specs):
            attn, x = layer.self_attn, _rms_norm(layer.input_layernorm, hidden)
            q, k, v = (y.reshape(shape).transpose(1, 2) for y in _project(x, qkv))
            q, k = q * cos + _swap_halves(q, half) * sin, k * cos + _swap_halves(k, half) * sin
            out = torch.ops.loraserve.pool_attend(q, k, v, attn.layer_idx, attn.scaling)  # [1, N, H * D]
            hidden = hidden + _project(out, o)[0]
            gate, up = _project(_rms_norm(layer.post_attention_layernorm, hidden), gate_up)
            act = F.silu(gate) if is_silu else layer.mlp.act_fn(gate)
            hidden = hidden + _project(act * up, down)[0]
        hidden = _rms_norm(inner.norm, hidden)
        return _project(hidden[:, rows], self.head_specs)[0][0]


def _project(x: torch.Tensor, specs: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
    """The outputs of the matmuls `specs` name, a fused group's split into its members'."""
    outs = []
    for index, sizes in specs:
        y = torch.ops.loraserve.project(x, index, sum(sizes))
        outs += y.split(sizes, dim=-1) if len(sizes) > 1 else [y]
    return outs


def _swap_halves(x: torch.Tensor, half: int) -> torch.Tensor:
    """x.roll(half, dims=-1) (the lean pass's rotary), as a cat: roll cannot trace an unbacked size."""
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def compiled_decode(lean: object, cache: KVCache, mode: str, cache_dir: Path) -> CompiledDecode | None:
    """The compiled decode step for this model, compiled and warmed now; None where decode steps
    stay eager: `mode` "off", no lean pass (another family), not CPU, an int8 base, or (mode "auto")
    a measurement on this CPU that found the compiled step no faster than the eager pass at one row."""
    if mode == "off" or not isinstance(lean, LeanForward) or cache.k[0].device.type != "cpu":
        return None
    compiled = CompiledDecode(lean)
    if not compiled.can_run(1):
        log.info("decode steps run eagerly: the compiled step does not serve int8 or conv1d bases")
        return None
    identity = _identity(lean.model)
    path = compiled_path(cache_dir, identity)
    verdict = _read_verdict(path, identity) if mode == "auto" else None
    if verdict is not None and not verdict["max_rows"]:
        log.info("decode steps run eagerly: compiled measured no faster on this CPU (%s)", path)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")  # read by inductor at each use
    started = time.perf_counter()
    log.info("compiling the decode step (one row): about a minute on a first start, "
             "seconds once %s holds the compiled code", cache_dir / "inductor")  # fmt: skip
    with torch.inference_mode(), _warm_steps(cache) as steps:
        for kv_step, ids, positions, rows in steps:
            compiled(ids, positions, rows, kv_step)
        log.info("compiled the decode step in %.1f s", time.perf_counter() - started)
        if mode == "auto" and verdict is None:
            verdict = _measure_quietly(lean, compiled, steps, path, identity)
    if verdict is not None:
        compiled.max_rows = verdict["max_rows"]
        log.info("decode steps of up to %s rows compiled (ms a step: %s; %s)", verdict["max_rows"], verdict["ms"], path)
    return compiled if compiled.max_rows else None


def _identity(model: nn.Module) -> dict:
    """What a cached verdict must match: the CPU model, torch, threads, dtype and the model's shape."""
    config = model.config
    shape = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return {
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "shape": [getattr(config, name, None) for name in shape] + [config.vocab_size],
    }


def compiled_path(cache_dir: Path, identity: dict) -> Path:
    """The verdict's file: one per CPU model, torch, threads, dtype and model shape."""
    return cache_dir / "compiled" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}.json"


def _read_verdict(path: Path, identity: dict) -> dict | None:
    try:
        saved = json.loads(path.read_text())
        return saved["verdict"] if saved["identity"] == identity else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged: measure again, rewrite it
        log.warning("ignoring the compiled-step verdict %s (%s)", path, exc)
        return None


def _write_verdict(path: Path, identity: dict, verdict: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
            json.dump({"identity": identity, "verdict": verdict}, file, indent=1)
        os.replace(file.name, path)  # atomic: replicas starting together never read half a file
    except OSError as exc:  # a read-only cache costs a measurement per start, nothing more
        log.warning("cannot cache the compiled-step verdict in %s (%s)", path, exc)


@contextlib.contextmanager
def _warm_steps(cache: KVCache) -> Iterator[list[tuple]]:
    """Decode steps of each of MEASURED_ROWS rows over the start of the pool (each row 64 tokens of
    context, or what the pool holds), as (kv_step, ids, positions, rows); the pool's slice is
    restored after, though at startup no sequence owns it yet."""
    span = max(MEASURED_ROWS) * max(1, min(64, cache.capacity_tokens // max(MEASURED_ROWS)))
    context = span // max(MEASURED_ROWS)
    saved = [(k[:, :span].clone(), v[:, :span].clone()) for k, v in zip(cache.k, cache.v)]
    steps = []
    for num_rows in MEASURED_ROWS:
        seqs = [SeqSlice(row, 1, row * context, context) for row in range(num_rows)]
        write = torch.tensor([row * context + context - 1 for row in range(num_rows)])
        positions = torch.full((num_rows,), context - 1)
        ids = torch.zeros(num_rows, dtype=torch.long)
        steps.append((KVStep(cache, seqs, write), ids, positions, torch.arange(num_rows)))
    try:
        yield steps
    finally:
        for (k, v), (k_saved, v_saved) in zip(zip(cache.k, cache.v), saved):
            k[:, :span].copy_(k_saved)
            v[:, :span].copy_(v_saved)


def _measure_quietly(
    lean: LeanForward, compiled: CompiledDecode, steps: list[tuple], path: Path, identity: dict
) -> dict:
    """`_measure`, bracketed by the kernel plan's quiet check: a verdict is cached only when the
    machine was quiet around it. Under load the two passes slow unequally (measured at load 5 on the
    AMD EPYC: eager 1,173 ms a step against compiled 479, where quiet they were 48 against 78), and
    a cached verdict would keep the wrong choice on every later start; a noisy one serves this start."""
    check = QuietCheck()
    before = check.bracket()
    verdict = _measure(lean, compiled, steps)
    brackets = [before, check.bracket()]
    verdict["conditions"] = check.conditions(brackets)
    if verdict["conditions"]["quiet"]:
        _write_verdict(path, identity, verdict)
    else:
        log.warning("the compiled-step measurement ran under load (%s): used for this start, not cached", brackets)
    return verdict


def _measure(lean: LeanForward, compiled: CompiledDecode, steps: list[tuple], rounds: int = 7, tokens: int = 6) -> dict:
    """Decode steps of each measured row count, eager and compiled in turn round after round (so a
    busy spell slows both), median ms a step of each. Compiled serves steps up to the largest row
    count at which it was at least 3% faster, and none if it was not at one row (max_rows 0). Its
    matmuls are MKL's, where the eager pass may run oneDNN's packed ones (the kernel plan): at more
    rows the matmuls weigh more and the fused elementwise ops less, so more rows may favour eager."""
    times = {(rows, name): [] for rows in MEASURED_ROWS for name in ("eager", "compiled")}
    for _ in range(rounds):
        for kv_step, ids, positions, rows in steps:
            for name, forward in (("eager", lean), ("compiled", compiled)):
                started = time.perf_counter()
                for _ in range(tokens):
                    forward(ids, positions, rows, kv_step)
                times[len(ids), name].append((time.perf_counter() - started) / tokens * 1e3)
    ms = {
        rows: {name: round(statistics.median(times[rows, name]), 3) for name in ("eager", "compiled")}
        for rows in MEASURED_ROWS
    }
    faster = [rows for rows in MEASURED_ROWS if ms[rows]["compiled"] < 0.97 * ms[rows]["eager"]]
    max_rows = (
        0 if 1 not in faster else max(rows for rows in faster if all(r in faster for r in MEASURED_ROWS if r <= rows))
    )
    return {
        "max_rows": max_rows,
        "ms": {str(rows): times_ for rows, times_ in ms.items()},
        "load_average": os.getloadavg()[0],
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
