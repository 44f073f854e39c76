"""LoRA on an MoE router's weight (PEFT's `target_parameters` "gate.weight"), per row.

A router is not a Linear: its forward computes `F.linear(x, self.weight)` and then its family's own
softmax, top-k and renormalisation. Rather than copy each family's routing, the stock forward runs
under a torch function mode that answers that one call with a LoraLinear sharing the weight: each
row's logits get its own adapter's delta (or the merged weight), and the routing that follows is the
family's own, so a row's adapter also decides which experts its token reaches. The mode is entered
only while the router has something to apply; a router whose forward does not use its weight in
exactly one such call (found by running it once at wrap time) is not wrapped, and an adapter that
targets it is refused (peft_format.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .layer import LoraLinear
from .slots import LoraState


class RouterLora(TorchFunctionMode):
    """Installed on a router by forward hooks: inside its forward, `F.linear(x, router.weight)` is the
    LoraLinear's forward (base logits plus each row's delta, or the merged weight's logits)."""

    def __init__(self, router: nn.Module, linear: LoraLinear):
        super().__init__()
        self.weight, self.linear = router.weight, linear
        self.is_entered = False
        router.register_forward_pre_hook(self._enter)
        router.register_forward_hook(self._exit, always_call=True)  # also when the forward raises

    def _enter(self, module: nn.Module, args) -> None:
        linear = self.linear
        if linear.merged_weight is not None or (linear.state.batch is not None and linear.lora_a is not None):
            self.__enter__()
            self.is_entered = True

    def _exit(self, module: nn.Module, args, output) -> None:
        if self.is_entered:
            self.is_entered = False
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) == 2 and not kwargs and args[1] is self.weight:
            return self.linear(args[0])
        return func(*args, **kwargs)


class _WeightUses(TorchFunctionMode):
    """Counts, during a call, `F.linear(x, weight)` calls and any other op that reads `weight`'s values
    (its shape or dtype are no use of them, nor a cast to its own dtype, which returns it: GLM-4-MoE's
    and ERNIE 4.5's fp32 routers cast their fp32 weight before the F.linear)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.num_linear, self.num_other = weight, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is F.linear and len(args) == 2 and not kwargs and args[1] is self.weight:
            self.num_linear += 1
        elif result is not self.weight and getattr(func, "__name__", "") != "__get__":  # a no-op cast is no use
            self.num_other += any(a is self.weight for a in (*args, *kwargs.values()))
        return result


@torch.no_grad()
def is_linear_router(router: nn.Module) -> bool:
    """Whether `router`'s forward uses its 2D weight [E, H] in exactly one F.linear and nowhere else."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return False
    uses, x = _WeightUses(weight), torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        with uses:
            router(x)
    except Exception:  # a router that needs more than hidden states: not one we can serve
        return False
    return uses.num_linear == 1 and uses.num_other == 0


def wrap_routers(
    model: nn.Module, experts: list[str], state: LoraState, num_slots: int, max_rank: int
) -> dict[str, LoraLinear]:
    """LoRA slots for the router beside each experts module named in `experts` (a sibling module with
    a weight of one row per expert); returns parameter name -> its LoraLinear."""
    routers: dict[str, LoraLinear] = {}
    for name in experts:
        parent_name, _, _ = name.rpartition(".")
        parent, num_experts = model.get_submodule(parent_name), model.get_submodule(name).num_experts
        for child_name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if child_name == name.rpartition(".")[2] or not isinstance(weight, nn.Parameter):
                continue
            if weight.dim() != 2 or weight.shape[0] != num_experts or not is_linear_router(child):
                continue
            view = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            view.weight = weight
            linear = LoraLinear(view, state, num_slots, max_rank)
            RouterLora(child, linear)
            routers[f"{parent_name + '.' if parent_name else ''}{child_name}.weight"] = linear
    return routers
