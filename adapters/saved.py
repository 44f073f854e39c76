"""PerRowModule: a base module whose rows of some slots run on that adapter's own full copy
(PEFT's `modules_to_save`, or a retrained embedding / head matrix saved beside its LoRA).

Only row-wise modules can be served so: a row's output depends on that row's input alone (Linear,
Conv1D, Embedding, LayerNorm, RMSNorm), so the copy's output for an adapter's rows is exactly what
that adapter computes, whatever shares the batch. Anything else is refused at parse (`row_modules`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from .embedding import LoraEmbedding
from .layer import LoraLinear


def row_modules(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """name -> {parameter: shape} of every module whose copy can be served per row."""
    found = {}
    for name, module in model.named_modules():
        if name and _is_row_wise(module):
            found[name] = {key: tuple(p.shape) for key, p in module.named_parameters(recurse=False)}
            if isinstance(module, LoraLinear):  # an int8 W0 is no parameter
                found[name]["weight"] = module.weight_shape
    return found


def _own_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters by name; a LoRA linear's W0 as its base matmul uses it (an int8 W0
    has no full-precision parameter left: this dequantizes it)."""
    params = dict(module.named_parameters(recurse=False))
    if isinstance(module, LoraLinear) and module.quantized is not None:
        params["weight"] = module.base_weight()
    return params


def _is_row_wise(module: nn.Module) -> bool:
    kinds = (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm, LoraLinear, LoraEmbedding)
    return isinstance(module, kinds) or type(module).__name__.endswith("RMSNorm")


class PerRowModule(nn.Module):
    """Runs `base`, then gives the rows of each slot that holds a copy the copy's output.

    Rows of such slots always come as direct runs (LoraModel.direct_slots). A norm's rows are
    recomputed with the copy's parameters. A LoRA layer (the head, the embedding, a linear) keeps
    the copy as its difference from W0 and adds that: PEFT loads such a matrix *under* the adapter's
    own LoRA on the same module, so the rows get W·x + delta, not W·x alone. Merged, the merged
    slot's copy applies to every row.
    """

    def __init__(self, base: nn.Module, state, is_head: bool = False):
        super().__init__()
        self.base, self.state, self.is_head = base, state, is_head
        self.copies: dict[int, dict[str, torch.Tensor]] = {}  # slot -> the copy's parameters
        self.merged: dict[str, torch.Tensor] | None = None

    @property
    def is_difference(self) -> bool:
        return isinstance(self.base, (LoraLinear, LoraEmbedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None and "token_ids" in self.merged:
            return self._replace_tokens(self.merged, x, self.base(x))
        if self.merged is not None:
            if self.is_difference:
                return self.base(x).add_(self._run_copy(self.merged, x))
            return self._run_copy(self.merged, x)
        y = self.base(x)
        batch = self.state.batch
        if batch is None or not self.copies:
            return y
        if self.is_head:
            batch = batch.head_batch
        flat_x = x.reshape(-1) if x.dtype == torch.long else x.reshape(-1, x.shape[-1])  # ids [N] or [N, in]
        flat_y = y.view(-1, y.shape[-1])
        for run in batch.runs:
            copy = self.copies.get(run.slot)
            if copy is None:
                continue
            if "token_ids" in copy:
                self._replace_tokens(copy, flat_x[run.start : run.stop], flat_y[run.start : run.stop])
                continue
            rows = self._run_copy(copy, flat_x[run.start : run.stop])
            if self.is_difference:
                flat_y[run.start : run.stop] += rows
            else:
                flat_y[run.start : run.stop] = rows
        return y

    def _replace_tokens(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Trainable tokens (PEFT's index_copy of rows into the matrix), in place on `y`: the embedding
        looks those ids up in the new rows; the head scores those ids with them."""
        token_ids, token_rows = params["token_ids"], params["token_rows"]  # [k], [k, hidden]
        if self.is_head:
            y[..., token_ids] = x @ token_rows.T  # [..., k]
            return y
        match = x.reshape(-1, 1) == token_ids  # [n, k]
        hit = match.any(1)
        flat = y.view(-1, y.shape[-1])
        flat[hit] = token_rows[match[hit].int().argmax(1)]
        return y

    def _run_copy(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if isinstance(base, LoraLinear):
            if base.is_conv1d:
                y = x.reshape(-1, x.shape[-1]) @ params["weight"]
                return (y if "bias" not in params else y + params["bias"]).view(*x.shape[:-1], -1)
            return F.linear(x, params["weight"], params.get("bias"))
        if isinstance(base, LoraEmbedding):
            return F.embedding(x, params["weight"])
        return functional_call(base, params, (x,))

    def set_slot(self, slot: int, params: dict[str, torch.Tensor] | None) -> None:
        """Hold `params` (the copy's full parameters) for `slot`, or drop them (None)."""
        if params is None:
            self.copies.pop(slot, None)
            return
        own = _own_parameters(self.base)
        device = own["weight"].device
        copy = {key: tensor.to(device) for key, tensor in params.items()}
        if self.is_difference and "token_ids" not in copy:
            copy = {key: tensor - own[key] for key, tensor in copy.items()}
        self.copies[slot] = copy

    def merge(self, terms: list[tuple[int, float]]) -> None:
        self.merged = next((self.copies[slot] for slot, _ in terms if slot in self.copies), None)

    def unmerge(self) -> None:
        self.merged = None
