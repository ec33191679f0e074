"""Row selection on tensors: the helpers every floor above uses.

Pure torch functions of their arguments; they trace and compile.
"""

from __future__ import annotations

import torch

__all__ = ["broadcast_along", "select_scaled", "select_experts", "squared_norms"]


def broadcast_along(vec: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """View a 1-D ``vec`` so that it broadcasts along ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return vec.reshape(shape)


def select_scaled(grad: torch.Tensor, idx: torch.Tensor, rho: torch.Tensor, dim: int) -> torch.Tensor:
    """``rho * grad.index_select(dim, idx)``: the compressed gradient (rho broadcast along ``dim``)."""
    picked = grad.index_select(dim, idx)
    return picked * broadcast_along(rho, grad.dim(), dim).to(picked.dtype)


def select_experts(grad: torch.Tensor, idx: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``rho[e, j] * grad[e, idx[e, j], :]``: (E, r, n) from (E, m, n) and (E, r)."""
    picked = torch.take_along_dim(grad, idx.unsqueeze(-1), dim=1)  # (E, r, n)
    return picked * rho.unsqueeze(-1).to(picked.dtype)


def squared_norms(grad: torch.Tensor, reduce_dim: int, row_dim: int) -> torch.Tensor:
    """float32 squared norms of ``grad`` over ``reduce_dim``, with no temporary as large as ``grad``.

    A refresh holds one dense gradient at a time; squaring it first (``(g * g).sum()``)
    would hold a second one. float32/float64 gradients reduce in one ``vector_norm`` (no
    copy). bfloat16/float16 ones accumulate in float32, which needs a cast: eagerly an
    eighth of the rows (``row_dim``) is cast at a time (a float32 copy of 1/8 of the
    gradient, 1/4 of its bytes); traced into a compiled refresh, Inductor fuses the cast
    into the reduction.
    """
    if grad.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(grad, dim=reduce_dim).float().square()
    if torch.compiler.is_compiling():
        return torch.linalg.vector_norm(grad, dim=reduce_dim, dtype=torch.float32).square()
    step = max(1, -(-grad.shape[row_dim] // 8))
    parts = [torch.linalg.vector_norm(part, dim=reduce_dim, dtype=torch.float32) for part in grad.split(step, row_dim)]
    return torch.cat(parts, dim=row_dim if row_dim < reduce_dim else row_dim - 1).square()
