"""Finding MoE expert stacks: 3-D parameters that hold one matrix per expert.

Mixture-of-experts layers of Hugging Face transformers 5.x (Mixtral, Qwen2/3-MoE, ...)
store their experts as one 3-D parameter per projection, ``(E, m, n)`` = ``E`` stacked
``(m, n)`` matrices, and multiply each token by the matrix of its expert: a loop over
the experts hit (``F.linear(x, self.gate_up_proj[e])``), a gather and ``bmm``
(``batched_mm``), or a grouped GEMM (``grouped_mm``). A 3-D parameter is an *expert
stack* when

* its module's class name ends in ``Experts`` (the transformers convention; such a
  module's ``forward`` may dispatch to one of the implementations above), or
* its module's ``forward`` multiplies by it or by a piece of it (``self.<name>[e]`` into
  ``linear``, the whole stack into ``bmm``), found as for 2-D weights
  (:mod:`grassfx.instrument.usage`).

This module only decides; :mod:`grassfx.instrument.targets` turns the decision into a
``TargetSpec`` of kind ``"experts"`` and :mod:`grassfx.instrument.experts` projects it.
"""

from __future__ import annotations

import torch
from torch import nn

from .swap import original_class
from .usage import used_by_matmul

__all__ = ["EXPERTS", "expert_reason", "is_expert_stack"]

EXPERTS = "experts"  # the TargetSpec kind of an expert stack

def expert_reason(module: nn.Module, attr: str, param: torch.Tensor) -> str:
    """Why ``param`` (named ``attr`` on ``module``) is an expert stack, or ``""`` when it is not."""
    if param.dim() != 3 or not param.is_floating_point():
        return ""
    cls = original_class(module).__name__  # the user's class, also once grassfx swapped it
    if cls.endswith("Experts"):
        return f"expert stack of {cls} ({param.shape[0]} experts)"
    if used_by_matmul(module, attr):
        return f"expert stack: forward multiplies by self.{attr} ({param.shape[0]} experts)"
    return ""


def is_expert_stack(module: nn.Module, attr: str, param: torch.Tensor) -> bool:
    """Whether ``param`` holds one matrix per expert (see the module docstring).

    Example:
        >>> class TinyExperts(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.zeros(4, 8, 6))
        >>> is_expert_stack(TinyExperts(), "w", TinyExperts().w)
        True
    """
    return bool(expert_reason(module, attr, param))
