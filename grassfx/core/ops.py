"""The marker ops: the contract between eager mode and the compiler.

``grassfx::rowsel(grad, idx, rho, dim, name)`` selects ``idx`` along ``dim`` of a dense
weight gradient and scales by ``rho``; ``grassfx::expertsel(grad, idx, rho, name)`` does
the same for each expert of an (E, m, n) stack. Eagerly they run that selection (the dense
fallback); the ``sparsify_wgrad`` pass finds them in a backward graph and pushes the
selection into the GEMM that produced ``grad``, so the dense gradient is never formed.
``name`` is the weight's qualified name; it only labels the graph node.

The anchors (:mod:`grassfx.instrument.anchors`, :mod:`grassfx.instrument.experts`) call
them; the passes match them (:data:`ROWSEL`, :data:`EXPERTSEL`).
"""

from __future__ import annotations

import torch

from .rows import select_experts, select_scaled

__all__ = ["rowsel", "expertsel", "ROWSEL", "EXPERTSEL"]


@torch.library.custom_op("grassfx::rowsel", mutates_args=())
def rowsel(grad: torch.Tensor, idx: torch.Tensor, rho: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """``rho * grad.index_select(dim, idx)`` (rho broadcast along ``dim``).

    ``name`` is the weight's qualified name; it only labels the graph node.
    """
    return select_scaled(grad, idx, rho, dim)


@rowsel.register_fake
def _rowsel_fake(grad, idx, rho, dim, name):
    shape = list(grad.shape)
    shape[dim] = idx.shape[0]
    return grad.new_empty(shape)


@torch.library.custom_op("grassfx::expertsel", mutates_args=())
def expertsel(grad: torch.Tensor, idx: torch.Tensor, rho: torch.Tensor, name: str) -> torch.Tensor:
    """``rho[..., None] * take_along_dim(grad, idx[..., None], 1)``: the rows of each expert.

    ``name`` is the weight's qualified name; it only labels the graph node.
    """
    return select_experts(grad, idx, rho)


@expertsel.register_fake
def _expertsel_fake(grad, idx, rho, name):
    return grad.new_empty((grad.shape[0], idx.shape[1], grad.shape[2]))


#: the overloads a backward graph's nodes call
ROWSEL = torch.ops.grassfx.rowsel.default
EXPERTSEL = torch.ops.grassfx.expertsel.default
