"""FusedLinears: sibling LoRA layers that read the same input (q/k/v, gate/up) run one base matmul.

Some kernels have a fixed cost per call that one decode row does not hide (on CPU, oneDNN's packed
matmul): the members' rules say which kernels run them, and their device's backend whether those
gain from one call (backends/; figures in benchmarks/results/). Each member's output is a view of
the fused output, and each member's own LoRA delta is added to its view exactly as its forward
would (`add_lora` on that view), so gather rows, DoRA extras and composed rows behave the same.

The fused weight replaces the members' packed copies of W0 (each member keeps W0 and runs it
plainly when called on its own: `run_w0_plainly`), so the base's memory does not grow. While an
adapter is merged, the fused weight is rebuilt by the first member's rule from the members' merged
weights at the first forward after the merge (one more packed copy of those layers, freed at
unmerge). int8 members are not fused: the int8 kernel's fixed cost is small, and its weights
would have to be copied.

On CUDA every group is fused whatever the kernels (`share_weights`): a decode step's small GEMMs
each cost a launch and a pass over the activations, and the CUDA pass (server/engine/cuda_forward.py)
adds each group's LoRA with one grouped op. There the members' W0 become views of the fused weight,
so the group costs no memory beyond the members'.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import backend_for, dense_kernel
from .layer import LoraLinear


class FusedLinears:
    """Runs `names` of `parent` (LoraLinear layers with the same input) as one base matmul."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], *, share_weights: bool = False):
        self.parent, self.names = parent, names
        self.members: list[LoraLinear] = [getattr(parent, name) for name in names]
        self.sizes = [m.out_features for m in self.members]
        weights = [m.weight for m in self.members]
        if share_weights:  # one copy of W0: the members' weights become views of the fused one
            fused = torch.cat(weights) if len(weights) > 1 else weights[0]
            for m, view in zip(self.members, fused.split(self.sizes)):
                m.weight.data = view
            weights = [fused]
        self.kernel = self._fuse(weights, [m.bias for m in self.members])
        for m in self.members:  # the fused copy serves them: they drop their own packed copies
            m.run_w0_plainly()
        self._merged_from: list | None = None  # the members' merges (serials) the merged fused kernel is of
        self._merged_kernel = None

    @classmethod
    def of(cls, parent: nn.Module, names: tuple[str, ...], *, share_weights: bool = False) -> FusedLinears | None:
        """A fused group for `names`, or None where they cannot share a matmul; `share_weights`:
        fused whether or not the backend's kernels gain from it, W0 kept once (the CUDA pass)."""
        if not cls.fits(parent, names):
            return None
        members = [getattr(parent, name) for name in names]
        backend = backend_for(members[0].device)
        if not share_weights and not all(backend.gains_from_fusing(m.dense_rule, m.weight) for m in members):
            return None
        return cls(parent, names, share_weights=share_weights)

    @staticmethod
    def fits(parent: nn.Module, names: tuple[str, ...]) -> bool:
        """Whether `names` of `parent` can share one matmul: full-precision Linear LoRA layers (not
        per-row copies) with one input size and dtype."""
        members = [getattr(parent, name, None) for name in names]
        if not all(type(m) is LoraLinear for m in members):  # missing, or a per-row copy wraps one
            return False
        first = members[0]
        return not any(
            m.is_conv1d or m.quantized is not None or m.in_features != first.in_features or m.dtype != first.dtype
            for m in members
        )

    @property
    def is_intact(self) -> bool:
        """False once a member was replaced on its parent (a per-row copy installed around it)."""
        return all(getattr(self.parent, name) is m for name, m in zip(self.names, self.members))

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x @ [W_1; ..; W_G]ᵀ + biases [.., Σ out] (the merged weights while merged), no LoRA."""
        return self._current_kernel()(x)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's forward(x), from one base matmul: views of one [.., Σ out] output."""
        outs = list(self.base(x).split(self.sizes, dim=-1))
        batch = self.members[0].state.batch
        if batch is not None:
            for m, y in zip(self.members, outs):
                if m.lora_a is not None:
                    m.add_delta(y, x, batch)  # the member's own delta, by whichever kernels it runs
        return outs

    def _current_kernel(self):
        merged = [None if m.merged_weight is None else m.merge_serial for m in self.members]
        if all(serial is None for serial in merged):
            self._merged_kernel = self._merged_from = None  # free the last merge's copies
            return self.kernel
        if merged != self._merged_from:
            weights = [m.base_weight() if m.merged_weight is None else m.merged_weight for m in self.members]
            biases = [m.bias if m.merged_bias is None else m.merged_bias for m in self.members]
            self._merged_kernel, self._merged_from = self._fuse(weights, biases), merged
        return self._merged_kernel

    def _fuse(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    torch.zeros(m.out_features, dtype=m.dtype, device=m.device) if b is None else b
                    for m, b in zip(self.members, biases)
                ]
            )
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # one: the shared fused W0 itself
        return dense_kernel(self.members[0].dense_rule, weight, bias)
