"""Decode steps on CPU through one torch.compile'd (inductor) forward of the lean Llama pass.

One stream's decode step is ~25 small ops a layer around seven one-row matmuls. Eagerly each op and
each library GEMM call has a fixed cost (oneDNN's packed matmul ~30 us a call at one row on the AMD
EPYC), and GEMMs tuned for many rows read one row's weights at ~65-75% of the bandwidth that
summing the same bytes reaches. In the graph each matmul is a product and a sum over the input
features (`_linear`), which inductor generates as one reduction loop streaming the weight's rows,
beside its fused loops for the norms, rotary, residuals and the MLP's gate. The default model's
121 matmuls, one run on the AMD EPYC: 25.9 ms as reductions in one graph, 34.1 ms through oneDNN's
packed kernels, 24.3 ms to sum the same 538 MB (docs/benchmarks.md). Through `loraserve::project`,
a custom op calling the eager pass's packed kernels (the previous design), the graph ran no faster
than the eager pass over HTTP.

What makes one compiled graph serve every decode step:
  - attention is one custom op per layer (`loraserve::pool_attend`) wrapping attention.py's `attend`
    with the step's KVStep read from a context variable: the pool writes, per-sequence SDPA and
    whatever masking `attend` does pass through untouched, and the graph does not break on them;
  - it serves one row (one stream, the case eager dispatch hurts most): a graph over an unbacked row
    count served any count but ran one stream 0.87x eager where the one-row graph ran 1.18x (same
    run, AMD EPYC 2 cores; docs/benchmarks.md); batched steps, where GEMMs pay off, stay eager;
  - every weight and bias is a graph input, the one in use now (W0's, or the merged one while an
    adapter is merged): a merge or unmerge passes other tensors of the same shapes, and no guard
    fails and nothing recompiles (tests/engine/test_compiled_step.py counts the graphs).
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
from collections.abc import Iterator
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
# Registered by the low-level Library API: torch.library.custom_op's wrappers (an aliasing check,
# dynamo's disable) made a trivial op 8-11 us a call against 4.5 us this way (AMD EPYC).
_library = torch.library.Library("loraserve", "DEF")
_library.define("pool_attend(Tensor query, Tensor key, Tensor value, int layer, float scaling) -> Tensor")


def pool_attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float
) -> torch.Tensor:
    """attention.attend for `layer` on the current step's pool: writes key/value into it, returns
    [1, N, H * D] (contiguous: o_proj's input). query [1, H, N, D]; key, value [1, KVH, N, D].
    The pool write is a side effect on tensors outside the graph, which reads them only here."""
    out = attend(layer, query, key, value, scaling, _step.get())  # [1, N, H, D]
    return out.reshape(1, out.shape[1], -1)


_library.impl("pool_attend", pool_attend, "CPU")


@torch.library.register_fake("loraserve::pool_attend")
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
        self.head = self.model.lm_head
        self.embedding = inner.embed_tokens
        self.aliases: dict[nn.Parameter, torch.Tensor] = {}  # W0s and biases as plain tensors
        self.state = getattr(self.linears[0][0], "state", None)  # LoraState: counts merges and unmerges
        self._inputs: tuple | None = None  # (weights_version, *_current_inputs()) last read
        self.warm_signature: tuple | None = None  # the inputs' signature the graph was compiled for
        self.is_silu = [type(layer.mlp.act_fn).__name__ in SILU for layer in inner.layers]
        self.graph = torch.compile(self._forward, dynamic=None, fullgraph=True)
        self.num_steps = 0  # decode steps run compiled (warm-up included)
        self.max_rows = max(MEASURED_ROWS)  # steps of more rows run eagerly (0: the measurement said eager)

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
        return getattr(self.head, "int8", None) is None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, kv_step: KVStep) -> torch.Tensor:
        step = _step.set(kv_step)
        self.num_steps += 1
        embed_w, weights, biases, signature = self._current_inputs()
        # Dynamo's guards check all ~420 inputs a call (0.74 ms a token in profile_one_token.json).
        # Inputs of the shapes, strides and dtypes the graph was warmed with need none of them: it
        # is the only graph, and a step of another row count never reaches it (can_run).
        skip = signature == self.warm_signature
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
                return self.graph(ids, positions, rows, embed_w, weights, biases)
        finally:
            _step.reset(step)

    def _current_inputs(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None], tuple]:
        """(embedding weight, weights, biases, their signature), read again only after a merge or
        unmerge (walking 211 layers costs ~0.4 ms)."""
        version = None if self.state is None else self.state.weights_version
        if self._inputs is None or version is None or self._inputs[0] != version:
            embed_w, (weights, biases) = self._embedding_weight(), self._weights()
            tensors = (embed_w, *weights, *biases)
            signature = tuple(None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors)
            self._inputs = (version, embed_w, weights, biases, signature)
        return self._inputs[1:]

    def _weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Each linear's weight [out, in] and bias in use now, the head's last: W0's, or the merged
        ones while an adapter is merged (graph inputs: a swap is a different tensor, not a recompile)."""
        weights, biases = [], []
        for m in (*(m for layer in self.linears for m in layer), self.head):
            merged = getattr(m, "merged_weight", None)
            if merged is None:
                weights.append(self._plain(m.weight))
                biases.append(self._plain(m.bias))
            else:
                weights.append(merged)
                biases.append(self._plain(m.bias) if m.merged_bias is None else m.merged_bias)
        return weights, biases

    def _plain(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A Parameter as a plain tensor (cached): where a merged tensor was, a Parameter would fail
        the graph's type guard and recompile."""
        if not isinstance(tensor, nn.Parameter):
            return tensor
        alias = self.aliases.get(tensor)
        if alias is None:
            alias = self.aliases[tensor] = tensor.detach()
        return alias

    def _embedding_weight(self) -> torch.Tensor:
        """The embedding's weight in use (W0, or merged with an embedding adapter), as a plain tensor."""
        merged = getattr(self.embedding, "merged_weight", None)
        return self._plain(self.embedding.weight) if merged is None else merged

    def _forward(self, ids, positions, rows, embed_w, weights, biases):
        inner = self.model.model
        hidden = F.embedding(ids[None], embed_w)  # [1, N, C]
        cos, sin = inner.rotary_emb(hidden, positions[None])  # [1, N, D]
        half = self.head_dim // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        shape = (1, ids.shape[0], -1, self.head_dim)
        linears = iter(zip(weights, biases))
        for layer, is_silu in zip(inner.layers, self.is_silu):
            attn, x = layer.self_attn, _rms_norm(layer.input_layernorm, hidden)
            q, k, v = (_linear(x, *next(linears)).reshape(shape).transpose(1, 2) for _ in range(3))
            q, k = q * cos + _swap_halves(q, half) * sin, k * cos + _swap_halves(k, half) * sin
            out = torch.ops.loraserve.pool_attend(q, k, v, attn.layer_idx, attn.scaling)  # [1, N, H * D]
            hidden = hidden + _linear(out, *next(linears))
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            gate, up = _linear(x, *next(linears)), _linear(x, *next(linears))
            act = F.silu(gate) if is_silu else layer.mlp.act_fn(gate)
            hidden = hidden + _linear(act * up, *next(linears))
        hidden = _rms_norm(inner.norm, hidden)
        return _linear(hidden[:, rows], *next(linears))[0]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., in] @ weightᵀ + bias as a product and a sum over `in`: inductor makes it one reduction
    loop that streams the weight's rows (a GEMV near the machine's read bandwidth), where a linear
    would call a library GEMM tuned for many rows."""
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


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
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_inductor_dir(cache_dir))  # read by inductor at each use
    started = time.perf_counter()
    log.info("compiling the decode step (one row): about a minute on a first start, "
             "seconds once %s holds the compiled code", os.environ["TORCHINDUCTOR_CACHE_DIR"])  # fmt: skip
    with torch.inference_mode(), _warm_steps(cache) as steps:
        try:
            for kv_step, ids, positions, rows in steps:
                compiled(ids, positions, rows, kv_step)
        except Exception as exc:  # inductor needs a C++ compiler; a slim image may have none
            if mode == "on":
                raise RuntimeError(f"--compile-decode on: compiling the decode step failed: {exc}") from exc
            log.warning("decode steps run eagerly: compiling the decode step failed (%s)", exc)
            return None
        log.info("compiled the decode step in %.1f s", time.perf_counter() - started)
        compiled.warm_signature = compiled._current_inputs()[3]
        if mode == "auto" and verdict is None:
            verdict = _measure_quietly(lean, compiled, steps, path, identity)
    if verdict is not None:
        compiled.max_rows = verdict["max_rows"]
        log.info("decode steps of up to %s rows compiled (ms a step: %s; %s)", verdict["max_rows"], verdict["ms"], path)
    return compiled if compiled.max_rows else None


def _inductor_dir(cache_dir: Path) -> Path:
    """<cache dir>/inductor, or a directory under the temporary one where the cache is read-only
    (an image's cache, baked in at build time): inductor fails where it cannot write its code."""
    directory = cache_dir / "inductor"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK | os.X_OK):
            return directory
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"loraserve-inductor-{os.getuid()}"
    log.warning("the cache %s is read-only: compiled code goes to %s, lost with it", directory, fallback)
    return fallback


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
    matmuls are reduction loops, one pass over a weight per row: from a few rows on, the eager
    pass's GEMMs (one pass for all rows) win."""
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
