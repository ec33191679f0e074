"""SGD with momentum (optionally Nesterov) and (r x n) momentum buffers.

``weight_decay`` is L2 added to the gradient, as in torch: for projected weights the
selected rows' L2 term ``rho * wd * W[idx]`` is added to ``C``.
"""

from __future__ import annotations

from grassfx.core.rows import broadcast_along
from grassfx.errors import ConfigError

from .base import GrassOptimizer
from .checks import check_number

__all__ = ["SGD"]


class SGD(GrassOptimizer):
    """SGD with momentum (optionally Nesterov) and (r x n) momentum buffers.

    Args:
        params: ``model.parameters()`` of a model from :func:`grassfx.compile` (groups ok).
        lr, momentum, dampening, nesterov: as ``torch.optim.SGD`` (``nesterov=True`` needs
            ``momentum > 0`` and ``dampening = 0``).
        weight_decay: L2 added to the gradient, as in ``torch.optim.SGD`` (for a projected
            weight, ``rho * weight_decay * W[idx]`` is added to the selected rows' gradient).
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf.
        update_in_backward: as :class:`grassfx.optim.AdamW`'s (updates inside backward,
            :mod:`grassfx.optim.inbackward`).

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(16, 16), rank=4, backend="eager")
        >>> opt = grassfx.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *, nonfinite="raise",
                 update_in_backward=False):
        check_number("lr", lr, low=0.0)
        check_number("momentum", momentum, low=0.0)
        check_number("dampening", dampening)
        check_number("weight_decay", weight_decay, low=0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), nonfinite=nonfinite)
        super().__init__(params, defaults, update_in_backward)

    def _direction(self, p, grad, group):
        momentum = group["momentum"]
        if momentum == 0:
            return grad
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        return grad.add(buf, alpha=momentum) if group["nesterov"] else buf

    def _update_dense(self, p, group):
        grad = p.grad
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        p.add_(self._direction(p, grad, group), alpha=-group["lr"])

    def _update_projected(self, handle, site, group):
        grad = site.flat(handle.grad)  # an expert stack: (E*r, n)
        if group["weight_decay"]:
            rows = site.weight.index_select(site.dim, site.idx)
            rows = rows * broadcast_along(site.rho, rows.dim(), site.dim).to(rows.dtype)
            grad = grad.add(rows, alpha=group["weight_decay"])
        self._apply_projected(site, self._direction(handle, grad, group), -group["lr"] * site.scale)
