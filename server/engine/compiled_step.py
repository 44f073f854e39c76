"""One-stream decode steps on CPU through torch.compile'd (inductor) decoder layers of the lean pass.

One stream's decode step is ~25 small ops a layer around seven one-row matmuls. Eagerly each op and
each library GEMM call has a fixed cost (oneDNN's packed matmul ~30 us a call at one row on the AMD
EPYC), and GEMMs tuned for many rows read one row's weights at ~65-80% of the bandwidth that
summing the same bytes reaches. Compiled, each matmul is a product and a sum over the input
features (`_linear`), which inductor generates as one reduction loop streaming the weight's rows
(the default model's 121 matmuls: 18.4 ms so, 22.0 through oneDNN's packed kernels, 17.2 to sum
the same 538 MB; docs/benchmarks.md), fused with the norms, rotary, residuals, the MLP's gate and
attention into a few C++ loops a layer.

What makes two small graphs serve every one-row decode step:
  - one graph is a group of a few decoder layers (`_layers`), called once per group with its
    layers' weights and pool views: every group has the same shapes, so one group's code is
    compiled (12 s for the default model's three layers; the whole forward as one graph took 40 s,
    and 104 s once attention was in it), and the other is the final norm and the head (`_head`);
  - attention is in the graph: the row's key and value are written into views of the pool that end
    at its slot, and the scores read the view, whose length is a symbol of the graph (one graph
    for every context length; each layer's view starts where its sliding window does). As a custom
    op around attention.py's `attend` (two pool writes, SDPA and its Python a layer) it cost 4.5 ms
    of a 26.5 ms token;
  - it serves one row (one stream, the case eager dispatch hurts most): a graph over an unbacked row
    count served any count but ran one stream 0.87x eager where the one-row graph ran 1.18x (same
    run, AMD EPYC 2 cores; docs/benchmarks.md); batched steps, where GEMMs pay off, stay eager;
  - every weight and bias is a graph input, the one in use now (W0's, or the merged one while an
    adapter is merged): a merge or unmerge passes other tensors of the same shapes, and no guard
    fails and nothing recompiles (tests/engine/test_compiled_step.py counts the graphs).
A one-row step on an adapter that is not merged runs a second graph of the same layers, each
linear adding x·Aᵀ·B from its slot's rows (compiled_lora.py: one graph for every adapter and rank).
Steps of rows on different adapters run the eager lean pass: their per-run LoRA ops are Python over
the step's adapter mix. So do prompt chunks, per-row module copies, and families the lean pass does
not serve.

An int8 base's linears are graph inputs too, as (int8 values, float32 scales): where our row kernels
are built (adapters/native.py) the graph calls our int8 one, else it reduces over the int8 values as
over a full-precision weight. A q4_1 base's (Q4_1 linears, a Q8_0 head: adapters/blocks.py) are their
uint8 blocks, which our block kernels multiply (a q4_1 base is refused where they are not built).
Linears that read the same input (q/k/v, gate/up) are one kernel call. A bf16 head (a bf16 model's, an
int8 base's) goes through our dense
row kernel where it is built: inductor's reduction converts bf16 too slowly to stream it (the
default model's 56.6 MB head: 4.2-4.5 ms a token in the graph, 2.1-2.3 through ours, Intel Xeon;
docs/benchmarks.md). The layers' bf16 weights stay reductions: as calls of the kernel (~10 us each
in the graph's wrapper, 210 a token) they gained nothing; fp32 ones too, which the reduction reads
as fast as anything here.
While an adapter is merged into a quantized base, its merged weights are full precision: those
steps run eagerly rather than compile a graph per merged target set.

Inductor's compiled artifacts (FX graph cache) live under <cache dir>/inductor, so a restart
re-traces (seconds) but skips most of the C++ compilation. Whether the compiled step is faster is
measured at startup on this machine (interleaved with the eager pass) and cached per CPU model
under <cache dir>/compiled; where it is not faster, the eager pass runs. A measurement under load
serves that start only, and an idle engine measures again once the machine is quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters import native
from adapters.backends.cpu import cpu_model_name
from adapters.blocks import kind_of
from adapters.kernels import KERNEL_DTYPE
from adapters.model import LoraModel
from adapters.quiet_check import QuietCheck

from .attention import KVStep, SeqSlice
from .compiled_lora import CompiledLora, Rows, lora_signature
from .kv_cache import KVCache
from .lean_forward import RMS_NORMS, SILU, LeanForward, rms_norm

log = logging.getLogger(__name__)

LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip
MEASURED_ROWS = (1,)  # row counts compiled, and timed eager against compiled at startup (mode auto)
# Each call of a graph costs ~90 us of dynamo and wrapper Python (Intel Xeon, 2 cores): 30 calls
# a token of one layer each ran the default model at 30.2 ms a step, 10 of three layers at 27.3,
# 6 of five at 27.3 (compiling 2 s and 5 s longer; same run, docs/benchmarks.md).
MAX_LAYERS_PER_GRAPH = 4
# The keys a row sees (its own included) that a graph serves: a length of 0 or 1 is one a graph
# specializes on, and inductor sums a float reduction longer than 4096 in chunks, so the graph traced
# at 64 keys guards on at most 4096 (cpp.py's accumulate helper). Outside, a guard would fail, and
# under the stance that skips guards that is an error, not a recompilation: such steps run eagerly.
MIN_CONTEXT, MAX_CONTEXT = 2, 4096
DENSE_ROWS = "dense-rows"  # a bf16 head's matmul through our kernel (head_matmul)
REMEASURE_AFTER_S = 30.0  # a provisional verdict's next try at the earliest, after a noisy or interrupted one
GRAPH_VERSION = 5  # part of a cached verdict's identity: one measured on another graph is measured again


class CompiledDecode:
    """run(ids [N], positions [N], rows [M], kv_step) -> logits [M, V], through the compiled graph."""

    def __init__(self, lean: LeanForward, lora_model: LoraModel | None = None):
        self.model = lean.model
        self.head_dim = lean.head_dim
        inner = self.model.model
        self.parents = [[getattr(layer, part) for part, _ in LINEARS] for layer in inner.layers]
        self.linears = [[getattr(p, name) for p, (_, name) in zip(ps, LINEARS)] for ps in self.parents]
        self.head = self.model.lm_head
        self.embedding = inner.embed_tokens
        self.aliases: dict[nn.Parameter, torch.Tensor] = {}  # W0s and biases as plain tensors
        self.state = getattr(self.linears[0][0], "state", None)  # LoraState: counts merges and unmerges
        self._inputs: tuple | None = None  # (weights_version, *_current_inputs(), int8 merged) last read
        self.warm_signature: tuple | None = None  # the inputs' signature the graph was compiled for
        self.is_silu = all(type(layer.mlp.act_fn).__name__ in SILU for layer in inner.layers)
        self.norms = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in inner.layers]
        self.final_norm = inner.norm
        self._layout_checked: tuple = (object(), False)  # (layout_version, intact) last checked
        # Per layer: (input norm's weight and epsilon, post-attention norm's, attention's scale)
        self.layer_constants = [
            (*self._norm_constants(layer.input_layernorm), *self._norm_constants(layer.post_attention_layernorm),
             layer.self_attn.scaling)
            for layer in inner.layers
        ]  # fmt: skip
        # One graph for every group of `group` layers (same shapes): one group's code to compile.
        self.group = layers_per_graph(len(inner.layers))
        self.layer_graph = torch.compile(_layers, dynamic=None, fullgraph=True)
        self.lora_layer_graph = torch.compile(_lora_layers, dynamic=None, fullgraph=True)
        flat = [m for layer in self.linears for m in layer]
        self.lora = None if lora_model is None or self.state is None else CompiledLora(lora_model, flat)
        self.warm_lora_signature: tuple | None = None  # the LoRA rows' signature the LoRA graph was compiled for
        self.head_graph = torch.compile(_head, dynamic=None, fullgraph=True)
        self.num_steps = 0  # decode steps run compiled (warm-up included)
        self.num_lora_steps = 0  # of which through the LoRA graph
        self.max_rows = max(MEASURED_ROWS)  # steps of more rows run eagerly (0: the measurement said eager)
        self.provisional: Provisional | None = None  # a verdict measured under load, measured again when idle
        self.quantized_base = any(getattr(m, "quantized", None) is not None for m in (*flat, self.head))

    def serves(self) -> bool:
        """Whether the graph's layer is this model's: SiLU MLPs and the lean pass's RMSNorms."""
        inner = self.model.model
        norms = [n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        return self.is_silu and all(type(n).__name__ in RMS_NORMS for n in (*norms, inner.norm))

    def can_run(self, num_rows: int, contexts: tuple[int, int] = (MIN_CONTEXT, MIN_CONTEXT)) -> bool:
        """Whether a step of `num_rows` runs compiled: no more rows than measured faster, each row's
        keys (`contexts`: the fewest and the most of its rows) within the graphs' range, and the
        model still in the shape the graph reads: LoRA linears (not conv1d), norms and head on their
        parents, no per-row copy installed in their place (checked again only when the model's
        layout changes: LoraState.layout_version), and no adapter merged into a quantized W0."""
        if num_rows > self.max_rows or contexts[0] < MIN_CONTEXT or contexts[1] > MAX_CONTEXT:
            return False
        version = None if self.state is None else self.state.layout_version
        if version is None or version != self._layout_checked[0]:
            self._layout_checked = (version, self._layout_intact())
        if not self._layout_checked[1] or self.state is None:  # no LoraState: nothing is ever merged
            return self._layout_checked[1]
        self._current_inputs()
        return not self._inputs[-1]  # an adapter merged into a quantized W0

    def _layout_intact(self) -> bool:
        inner = self.model.model
        for layer, parents, linears, norms in zip(inner.layers, self.parents, self.linears, self.norms):
            if layer.input_layernorm is not norms[0] or layer.post_attention_layernorm is not norms[1]:
                return False
            for parent, m, (_, name) in zip(parents, linears, LINEARS):
                if getattr(parent, name) is not m or getattr(m, "is_conv1d", False):
                    return False
        return self.model.lm_head is self.head and inner.norm is self.final_norm

    def matmuls(self) -> dict[str, str]:
        """How the graphs multiply quantized W0s ("int8": "int8-rows", our kernel, or "reduction";
        "q4_1": "q4_1-rows") and the head where not by a reduction ("head": `head_matmul`)."""
        weights = self._current_inputs()[1]
        kinds = {_quantized_kind(w) for w in weights[:-1]} - {None}
        found = {kind: f"{kind}-rows" for kind in kinds if kind != "int8"}
        if "int8" in kinds:
            found["int8"] = "int8-rows" if native.int8_rows_op() is not None else "reduction"
        head = head_matmul(weights[-1])
        return {**found, **({"head": head} if head != "reduction" else {})}

    def gathers_faster(self, slot: int) -> bool:
        """Whether a one-row step on `slot`'s adapter runs faster unmerged through the LoRA graph:
        on a quantized base, a merge makes the adapter's layers full precision (twice the bytes of
        int8, and eager: a merged one stream ran 26.7-38.5 ms a step against 22.2-23.0 gathered in the
        graph, bf16, Intel Xeon; docs/benchmarks.md)."""
        return self.quantized_base and self.max_rows >= 1 and self.lora is not None and self.lora.serves(slot)

    def lora_rows(self, slot: int) -> Rows | None:
        """The LoRA graph's inputs for a row on `slot`'s adapter; None where it cannot serve it."""
        return None if self.lora is None else self.lora.rows(slot)

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, kv_step: KVStep, lora: Rows | None = None
    ) -> torch.Tensor:
        """`lora`: the row's adapter's rows (`lora_rows`), or None on base or merged weights."""
        self.num_steps += 1
        embed_w, weights, biases, signature = self._current_inputs()
        # Dynamo's guards check every input of every call. Inputs of the shapes, strides and dtypes
        # the graphs were warmed with need none of them: each graph is the only one of its function,
        # compiled for any context length (and LoRA rank), and a step of another row count never
        # gets here (can_run).
        skip = signature == self.warm_signature
        if lora is not None:
            self.num_lora_steps += 1
            skip = skip and lora_signature(lora) == self.warm_lora_signature
            _mark_ranks_dynamic(lora, skip)
        k_ctx, v_ctx = _context_views(kv_step, mark_dynamic=not skip)
        inner = self.model.model
        tracing = lora is not None and not skip  # P gets a symbol of its own (see _mark_ranks_dynamic)
        no_duck = torch.fx.experimental._config.patch(use_duck_shape=False) if tracing else contextlib.nullcontext()
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip), no_duck:
            hidden = F.embedding(ids[None], embed_w)  # [1, 1, C]
            cos, sin = inner.rotary_emb(hidden, positions[None])  # [1, 1, D]
            half = self.head_dim // 2
            cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
            g, per_group = self.group, self.group * len(LINEARS)
            for i in range(len(k_ctx) // g):
                span, layers = slice(i * per_group, (i + 1) * per_group), slice(i * g, (i + 1) * g)
                inputs = (hidden, cos, sin, weights[span], biases[span], k_ctx[layers], v_ctx[layers])
                if lora is None:
                    hidden = self.layer_graph(*inputs, self.layer_constants[layers])
                else:
                    hidden = self.lora_layer_graph(*inputs, self.layer_constants[layers], lora[0][span], lora[1][span])
            norm = self._norm_constants(self.final_norm)
            return self.head_graph(hidden[:, rows], *norm, weights[-1], biases[-1])

    def _current_inputs(self) -> tuple[torch.Tensor, list, list[torch.Tensor | None], tuple]:
        """(embedding weight, weights, biases, their signature), read again only after a merge or
        unmerge (walking 211 layers costs ~0.4 ms)."""
        version = None if self.state is None else self.state.weights_version
        if self._inputs is None or version is None or self._inputs[0] != version:
            embed_w, (weights, biases) = self._embedding_weight(), self._weights()
            tensors = (embed_w, *weights, *biases)
            signature = tuple(_signature(t) for t in tensors)
            quantized_merged = any(
                getattr(m, "quantized", None) is not None and getattr(m, "merged_weight", None) is not None
                for m in (*(m for layer in self.linears for m in layer), self.head)
            )
            self._inputs = (version, embed_w, weights, biases, signature, quantized_merged)
        return self._inputs[1:5]

    def _weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Each linear's weight [out, in] and bias in use now, the head's last: W0's ((values,
        scales) where W0 is int8, its uint8 blocks where blocks.py's), or the merged ones while an
        adapter is merged (graph inputs: a swap is a different tensor, not a recompile)."""
        weights, biases = [], []
        for m in (*(m for layer in self.linears for m in layer), self.head):
            merged = getattr(m, "merged_weight", None)
            quantized = getattr(m, "quantized", None)
            if merged is None and quantized is not None:
                int8 = quantized.kind == "int8"
                weights.append((quantized.q, quantized.float_scales) if int8 else quantized.blocks)
                biases.append(self._plain(m.bias))
            elif merged is None:
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

    def _norm_constants(self, norm: nn.Module) -> tuple[torch.Tensor, float]:
        return self._plain(norm.weight), norm.variance_epsilon

    def _embedding_weight(self) -> torch.Tensor:
        """The embedding's weight in use (W0, or merged with an embedding adapter), as a plain tensor."""
        merged = getattr(self.embedding, "merged_weight", None)
        return self._plain(self.embedding.weight) if merged is None else merged


def _layers(hidden, cos, sin, weights, biases, keys, values, constants, a_rows=None, b_rows=None):
    """`len(keys)` consecutive decoder layers (`_layer`) in one graph; with `a_rows` and `b_rows`
    (one adapter's, per linear), each linear adds its LoRA delta."""
    per_layer = len(LINEARS)
    for i, (k, v, c) in enumerate(zip(keys, values, constants)):
        span = slice(i * per_layer, (i + 1) * per_layer)
        lora = None if a_rows is None else list(zip(a_rows[span], b_rows[span]))
        hidden = _layer(hidden, cos, sin, weights[span], biases[span], k, v, *c, lora=lora)
    return hidden


def _lora_layers(hidden, cos, sin, weights, biases, keys, values, constants, a_rows, b_rows):
    """`_layers` with LoRA: a function of its own, so that its graph is compiled apart from the plain one."""
    return _layers(hidden, cos, sin, weights, biases, keys, values, constants, a_rows, b_rows)


def layers_per_graph(num_layers: int) -> int:
    """The most layers, up to MAX_LAYERS_PER_GRAPH, that divide the model's layers into equal
    groups: one graph then serves every group."""
    return max(g for g in range(1, MAX_LAYERS_PER_GRAPH + 1) if num_layers % g == 0)


def _layer(
    hidden, cos, sin, weights, biases, keys, values, input_norm, input_eps, post_norm, post_eps, scaling, lora=None
):
    """One decoder layer for one row: hidden [1, 1, C] -> hidden. weights, biases: q, k, v, o, gate,
    up, down's; keys, values: the layer's pool views (`_context_views`); SiLU MLP, RMSNorms; `lora`:
    each linear's (A rows, B rows), or None."""
    head_dim = cos.shape[-1]
    half = head_dim // 2
    lora = [(None, None)] * len(LINEARS) if lora is None else lora

    def linears(x, *indices):
        products = _grouped_products(x, [weights[i] for i in indices])
        return [_linear(x, weights[i], biases[i], *lora[i], product=p) for i, p in zip(indices, products)]

    x = rms_norm(hidden, input_norm, input_eps)
    q, k, v = (y.reshape(1, 1, -1, head_dim).transpose(1, 2) for y in linears(x, 0, 1, 2))
    q, k = q * cos + _swap_halves(q, half) * sin, k * cos + _swap_halves(k, half) * sin
    (attended,) = linears(_attend_one_row(q, k, v, keys, values, scaling), 3)
    hidden = hidden + attended
    gate, up = linears(rms_norm(hidden, post_norm, post_eps), 4, 5)
    (down,) = linears(F.silu(gate) * up, 6)
    return hidden + down


def _head(hidden, norm_weight, eps: float, weight, bias):
    """The final norm and the output head: hidden [1, M, C] -> logits [M, V]; a bf16 head through
    our dense row kernel where it is built, a Q8_0 one through our block kernel (`head_matmul`)."""
    x = rms_norm(hidden, norm_weight, eps)
    if head_matmul(weight) == DENSE_ROWS:
        return native.dense_rows_op()(x, weight, bias)[0]
    return _linear(x, weight, bias)[0]


def head_matmul(weight: torch.Tensor | tuple) -> str:
    """How the head graph multiplies by the head's weight: "dense-rows" (ours) for a bf16 one
    where our row kernels are built, "q8_0-rows" (ours) for Q8_0 blocks, else a reduction."""
    kind = _quantized_kind(weight)
    if kind is not None:
        return f"{kind}-rows" if kind != "int8" or native.int8_rows_op() is not None else "reduction"
    bf16 = weight.dtype == torch.bfloat16
    return DENSE_ROWS if bf16 and native.dense_rows_op() is not None else "reduction"


def _quantized_kind(weight: torch.Tensor | tuple) -> str | None:
    """A graph input's quantization: "int8" for (values, scales), blocks.py's kind for uint8 blocks, else None."""
    if isinstance(weight, tuple):
        return "int8"
    return kind_of(weight) if weight.dtype == torch.uint8 else None


def _context_views(kv_step: KVStep, mark_dynamic: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the views of the K and V pools holding the keys the step's one row sees (its
    sliding window's, where the layer has one), its own slot last. `mark_dynamic`: their length
    is a symbol of the graph, so one graph serves every context length."""
    cache = kv_step.cache
    spans = {window: parts[0][1] for window, parts in kv_step.parts.items()}  # one sequence: one part
    views = [], []
    for k_pool, v_pool, window in zip(cache.k, cache.v, cache.windows):
        for out, pool in zip(views, (k_pool, v_pool)):
            view = pool[:, spans[window]]
            if mark_dynamic:
                torch._dynamo.mark_dynamic(view, 1)
            out.append(view)
    return views


def _attend_one_row(q, k, v, keys, values, scaling: float | None) -> torch.Tensor:
    """One decode row's attention, its key and value first written into the pool. q [1, H, 1, D];
    k, v [1, KVH, 1, D]; keys, values [KVH, L, D]: views of the pool holding the L keys the row sees,
    its own last. Scores and softmax in float32, as SDPA's CPU kernel accumulates; [1, 1, H * D]."""
    keys.select(1, -1).copy_(k[0, :, 0])
    values.select(1, -1).copy_(v[0, :, 0])
    num_kv_heads, _, head_dim = keys.shape
    scale = scaling if scaling is not None else head_dim**-0.5
    grouped = q.reshape(num_kv_heads, -1, 1, head_dim).float()  # [KVH, G, 1, D]: GQA's head order
    scores = (grouped * keys[:, None].float()).sum(-1) * scale  # [KVH, G, L]
    weights = torch.softmax(scores, dim=-1)
    out = (weights[..., None] * values[:, None].float()).sum(-2)  # [KVH, G, D]
    return out.to(q.dtype).reshape(1, 1, -1)


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_rows: torch.Tensor | None = None,
    b_rows: torch.Tensor | None = None,
    product: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [.., in] @ weightᵀ + bias as a product and a sum over `in`: inductor makes it one reduction
    loop that streams the weight's rows (a GEMV near the machine's read bandwidth), where a linear
    would call a library GEMM tuned for many rows. With LoRA rows (A [P, in], B [P, out], scale in
    B), adds (x·Aᵀ)·B as two more such reductions. `product`: x @ weightᵀ, where already made
    (`_grouped_products`)."""
    if product is not None:
        y = product
    elif isinstance(weight, tuple):  # an int8 W0: (values [out, in], float32 scales [out])
        y = _int8_linear(x, *weight)
    elif weight.dtype == torch.uint8:  # a W0 in blocks (blocks.py): our block kernels, which it needs
        y = native.block_rows_op(kind_of(weight))(x, [weight])[0]
    else:
        y = (x.unsqueeze(-2) * weight).sum(-1)
    if a_rows is not None:
        y = y + ((x.unsqueeze(-2) * a_rows).sum(-1).unsqueeze(-1) * b_rows).sum(-2)
    return y if bias is None else y + bias


def _grouped_products(x: torch.Tensor, weights: list) -> list[torch.Tensor | None]:
    """x @ Wᵀ for linears that read the same x (q/k/v, gate/up), all int8 W0s or all blocks of one
    kind, in one call of our row kernels where they are built: a call costs ~10 us in the graph's
    wrapper, and a token made 210 (ms a step: docs/benchmarks.md). Otherwise None each: each linear
    makes its own."""
    kinds = {_quantized_kind(w) for w in weights}
    if len(weights) < 2 or len(kinds) != 1 or None in kinds:
        return [None] * len(weights)
    (kind,) = kinds
    if kind != "int8":
        return native.block_rows_op(kind)(x, weights)
    group = native.int8_rows_group_op()
    if group is None:
        return [None] * len(weights)
    return group(x, [w[0] for w in weights], [w[1] for w in weights])


def _int8_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (values * scales)ᵀ with the int8 kernels' contract (bf16-rounded activations and
    product): our int8 row kernel where it is built (it streams the int8 bytes near the memory's
    bandwidth, where inductor's loop over them converts too slowly: 8-10 GB/s against ~15, Intel
    Xeon; docs/benchmarks.md), else that loop."""
    op = native.int8_rows_op()
    if op is not None:
        return op(x, values, scales, None)
    rows = x.to(KERNEL_DTYPE).float().unsqueeze(-2)
    return ((rows * values).sum(-1) * scales).to(KERNEL_DTYPE).to(x.dtype)


def _signature(t: torch.Tensor | tuple | None) -> tuple | None:
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_signature(part) for part in t)
    return (t.shape, t.stride(), t.dtype)


def _mark_ranks_dynamic(lora: Rows, skip: bool) -> None:
    """The rows' P as a symbol of the LoRA graph (at least 2: see compiled_lora.py), where its
    guards are checked (the caller turns duck sizing off, so that P never shares a symbol with a
    context length that happens to be of the same size when the graph is traced)."""
    if skip:
        return
    for part in lora:
        for rows in part:
            if rows.shape[0] >= 2:
                torch._dynamo.mark_dynamic(rows, 0)


def _swap_halves(x: torch.Tensor, half: int) -> torch.Tensor:
    """x.roll(half, dims=-1) (the lean pass's rotary), as a cat: roll cannot trace an unbacked size."""
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def compiled_decode(
    lean: object, cache: KVCache, mode: str, cache_dir: Path, lora_model: LoraModel | None = None
) -> CompiledDecode | None:
    """The compiled decode step for this model, compiled and warmed now; None where decode steps
    stay eager: `mode` "off", no lean pass (another family), not CPU, or (mode "auto")
    a measurement on this CPU that found the compiled step no faster than the eager pass at one row."""
    if mode == "off" or not isinstance(lean, LeanForward) or cache.k[0].device.type != "cpu":
        return None
    compiled = CompiledDecode(lean, lora_model)
    if not compiled.serves() or not compiled.can_run(1):
        log.info("decode steps run eagerly: the compiled step serves SiLU MLPs and RMSNorms")
        return None
    if compiled.matmuls():  # int8 W0s or a bf16 head: our row kernels serve them (built once a machine)
        native.load_row_kernels(cache_dir)
    identity = _identity(lean.model, compiled.matmuls())
    path = compiled_path(cache_dir, identity)
    verdict = _read_verdict(path, identity) if mode == "auto" else None
    if verdict is not None and not verdict["max_rows"]:
        log.info("decode steps run eagerly: compiled measured no faster on this CPU (%s)", path)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_inductor_dir(cache_dir))  # read by inductor at each use
    started = time.perf_counter()
    log.info("compiling the decode step (one row; base and LoRA graphs): 15-30 s on a first start, "
             "a few once %s holds the compiled code", os.environ["TORCHINDUCTOR_CACHE_DIR"])  # fmt: skip
    with torch.inference_mode(), _warm_steps(cache) as steps:
        try:
            for kv_step, ids, positions, rows in steps:
                compiled(ids, positions, rows, kv_step)
                if compiled.lora is not None:
                    warm_rows = compiled.lora.warm_rows()
                    compiled(ids, positions, rows, kv_step, warm_rows)
                    compiled.warm_lora_signature = lora_signature(warm_rows)
        except Exception as exc:  # inductor needs a C++ compiler; a slim image may have none
            if mode == "on":
                raise RuntimeError(f"--compile-decode on: compiling the decode step failed: {exc}") from exc
            log.warning("decode steps run eagerly: compiling the decode step failed (%s)", exc)
            return None
        log.info("compiled the decode step in %.1f s", time.perf_counter() - started)
        compiled.warm_signature = compiled._current_inputs()[3]
        if mode == "auto" and verdict is None:
            verdict = _measure_quietly(lean, compiled, steps, path, identity)
            if not verdict["conditions"]["quiet"]:
                best = verdict["conditions"]["reference_best_us"] * 1e-6
                compiled.provisional = Provisional(lean, cache, path, identity, best)
    if verdict is not None:
        compiled.max_rows = verdict["max_rows"]
        log.info("decode steps of up to %s rows compiled (ms a step: %s; %s)", verdict["max_rows"], verdict["ms"], path)
    return compiled if compiled.max_rows or compiled.provisional else None


@dataclasses.dataclass
class Provisional:
    """What measuring a verdict again needs, while the one in use was measured under load."""

    lean: LeanForward
    cache: KVCache
    path: Path
    identity: dict
    reference_best: float  # the quiet check's best reference time so far (s): a slower one is load
    next_try: float = 0.0  # time.monotonic() before which an idle engine does not try again


class _Interrupted(Exception):
    """Work arrived while an idle engine was measuring."""


def measure_again_when_quiet(compiled: CompiledDecode | None, interrupted: Callable[[], bool]) -> None:
    """Settle a verdict measured under load, called by an idle engine (async_engine.py). A server
    first started under load otherwise kept that verdict for its whole life (one stream 22.1 against
    37.7 tok/s for a quiet start's on the Intel Xeon: the noisy measurement chose eager). Runs only
    after a quiet bracket, at most once every REMEASURE_AFTER_S; `interrupted()` between rounds (new
    work) abandons it, costing a request at most one round (~6 decode steps of each pass)."""
    pending = None if compiled is None else compiled.provisional
    if pending is None or time.monotonic() < pending.next_try:
        return
    pending.next_try = time.monotonic() + REMEASURE_AFTER_S
    check = QuietCheck(pending.reference_best)
    if not check.is_quiet(check.bracket()):
        return
    try:
        with torch.inference_mode(), _warm_steps(pending.cache) as steps:
            verdict = _measure_quietly(
                pending.lean, compiled, steps, pending.path, pending.identity, check, interrupted
            )
    except _Interrupted:
        log.info("measuring the compiled step again: interrupted by new work, tried later")
        return
    if verdict["conditions"]["quiet"]:
        compiled.max_rows, compiled.provisional = verdict["max_rows"], None
        log.info("decode steps of up to %s rows compiled, measured again on a quiet machine (ms a step: %s; %s)",
                 verdict["max_rows"], verdict["ms"], pending.path)  # fmt: skip


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


def _identity(model: nn.Module, matmuls: dict[str, str] | None = None) -> dict:
    """What a cached verdict must match: the graph, the CPU model, torch, threads, dtype, the
    model's shape and, for int8 or bf16 weights, the graph's matmuls (CompiledDecode.matmuls)."""
    config = model.config
    shape = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    kernels = {"matmuls": matmuls} if matmuls else {}
    return {
        "graph": GRAPH_VERSION,
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "shape": [getattr(config, name, None) for name in shape] + [config.vocab_size],
        **kernels,
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
    lean: LeanForward,
    compiled: CompiledDecode,
    steps: list[tuple],
    path: Path,
    identity: dict,
    check: QuietCheck | None = None,
    interrupted: Callable[[], bool] = lambda: False,
) -> dict:
    """`_measure`, bracketed by the kernel plan's quiet check before it and after each of its rounds:
    a verdict is cached only when the machine was quiet throughout. Under load the two passes slow
    unequally (measured at load 5 on the AMD EPYC: eager 1,173 ms a step against compiled 479, where
    quiet they were 48 against 78), and a cached verdict would keep the wrong choice on every later
    start; a noisy one serves this start. Brackets only before and after were not enough: a server
    started beside a test suite found both quiet around steps that ran at 10x their quiet time."""
    check = check or QuietCheck()
    brackets = [check.bracket()]

    def after_round() -> None:
        if interrupted():
            raise _Interrupted
        brackets.append(check.bracket())

    verdict = _measure(lean, compiled, steps, after_round=after_round)
    verdict["conditions"] = check.conditions(brackets)
    if verdict["conditions"]["quiet"]:
        _write_verdict(path, identity, verdict)
    else:
        log.warning("the compiled-step measurement ran under load (%s): used for this start, not cached", brackets)
    return verdict


def _measure(
    lean: LeanForward,
    compiled: CompiledDecode,
    steps: list[tuple],
    rounds: int = 7,
    tokens: int = 6,
    after_round: Callable[[], object] = lambda: None,
) -> dict:
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
        after_round()
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
