"""The anchors that route a weight's gradient through the marker op.

``grassfx::rowsel(grad, idx, rho, dim)`` (:mod:`grassfx.core.ops`) is the contract between
eager mode and the compiler: eagerly it selects ``idx`` along ``dim`` of a dense gradient
and scales by ``rho`` (the dense fallback); the ``sparsify_wgrad`` pass finds it in the
backward graph and pushes the selection into the GEMM that produced ``grad``, so the dense
gradient is never formed.

Anchors are autograd Functions. Their forward returns a view of the frozen weight; their
backward hands the weight's gradient to ``rowsel`` and returns the result as the gradient
of a small *handle* parameter. The refresh anchor additionally computes row norms, picks
new rows with :mod:`grassfx.select`, and reports the new selection as the gradient of a
float64 *probe* parameter (a pure function of its inputs, so it traces and compiles).
"""

from __future__ import annotations

import torch

from grassfx import _compat
from grassfx import select as _select
from grassfx.core.ops import rowsel
from grassfx.core.rows import broadcast_along, select_scaled, squared_norms
from grassfx.errors import GrassError

__all__ = ["rowsel", "select_scaled", "broadcast_along", "squared_norms", "Anchor", "RefreshAnchor", "FullAnchor",
           "RefusingAnchor"]


class Anchor(torch.autograd.Function):
    """Forward: a view of ``weight``. Backward: ``rowsel`` of its gradient -> ``handle``."""

    @staticmethod
    def forward(ctx, weight, handle, idx, rho, dim: int, name: str):
        ctx.save_for_backward(idx, rho)
        ctx.dim, ctx.name = dim, name
        ctx.handle_dtype = handle.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        idx, rho = ctx.saved_tensors
        compressed = rowsel(grad, idx, rho, ctx.dim, ctx.name).to(ctx.handle_dtype)
        return None, compressed, None, None, None, None


def apply_anchor(weight, handle, idx, rho, dim: int, name: str):
    """``Anchor.apply``: what compiled graphs call (a name the compile caches can store)."""
    return Anchor.apply(weight, handle, idx, rho, dim, name)


# one call in Dynamo's graph, its body traced by AOTAutograd: less for Dynamo to trace per
# weight, and cacheable across processes (_compat.compile_fx)
_compat.opaque_function(Anchor, apply_anchor)


class RefreshAnchor(torch.autograd.Function):
    """Anchor used on a refresh step: the dense gradient picks the new rows.

    Backward: row norms of the dense gradient (reduced at once to a vector), new
    ``(idx, rho)`` from the selector, the compressed gradient for those new rows, and
    ``stack([idx, rho])`` (float64) as the gradient of ``probe``. Only this layer's dense
    gradient is alive while it runs.
    """

    @staticmethod
    def forward(ctx, weight, handle, probe, noise, age, dim: int, rank: int, explore: int, method: str,
                group: str, world: int, labels=None, blocks=None):
        ctx.save_for_backward(noise, age, labels)
        ctx.dim, ctx.rank, ctx.method, ctx.explore, ctx.blocks = dim, rank, method, explore, blocks
        ctx.group, ctx.world = group, world
        ctx.handle_dtype = handle.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        noise, age, labels = ctx.saved_tensors
        if ctx.world > 1:  # data parallel: select from the exact global gradient
            grad = _compat.all_reduce_mean(grad, ctx.group, ctx.world)
        sq_norms = squared_norms(grad, 1 - ctx.dim, ctx.dim)  # (m,) along the selected dim
        idx, rho = _select.select_rows(sq_norms, noise, ctx.rank, ctx.method, age, ctx.explore, labels, ctx.blocks)
        poison = sq_norms.sum().to(torch.float64) * 0.0  # NaN iff any norm is NaN/Inf
        # a refused refresh keeps the old rows: its compressed gradient (of the new rows) must
        # not reach them, so it is NaN too and the optimizer refuses the step (or skips it)
        compressed = select_scaled(grad, idx, rho + poison.to(rho.dtype), ctx.dim)
        record = torch.stack([idx.to(torch.float64), rho.to(torch.float64) + poison])  # (2, r)
        return (None, compressed.to(ctx.handle_dtype), record) + (None,) * 10


class FullAnchor(torch.autograd.Function):
    """``rank >= rows``: every row is kept, the handle receives the dense gradient."""

    @staticmethod
    def forward(ctx, weight, handle):
        ctx.handle_dtype = handle.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.handle_dtype)


class RefusingAnchor(torch.autograd.Function):
    """A read of a projected weight whose gradient has nowhere right to go.

    Used outside the forward where the rows a gradient would land on are not this step's:
    at a refresh step compiled as its own graph (the graph picks the rows from the gradient
    it forms itself) and after the optimizer changed the weight, before the next forward
    (which may refresh the rows). Reading is fine (logging a norm); a gradient through it
    raises ``message`` instead of being dropped or sent to the wrong rows.
    """

    @staticmethod
    def forward(ctx, weight, handle, message: str):
        ctx.message = message  # ``handle``: an input that requires grad, so the backward runs
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        raise GrassError(ctx.message)
