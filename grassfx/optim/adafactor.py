"""Adafactor (Shazeer & Stern, 2018) with factored (r,) + (n,) second moments."""

from __future__ import annotations

import math

import torch

from grassfx.core.decay import decay_selected
from grassfx.errors import ConfigError

from .base import GrassOptimizer
from .checks import check_number, check_rho_scaling

__all__ = ["Adafactor"]


class Adafactor(GrassOptimizer):
    """Adafactor (Shazeer & Stern, 2018) with factored (r,) + (n,) second moments.

    Follows ``torch.optim.Adafactor``'s formulation, so with every row selected it matches
    it. For a projected weight the parameter-scale term ``RMS(W)`` is taken over the
    selected rows.

    Args:
        params: ``model.parameters()`` of a model from :func:`grassfx.compile` (groups ok).
        lr, beta2_decay, d: as ``torch.optim.Adafactor``.
        eps: the pair ``(eps1, eps2)`` of ``torch.optim.Adafactor`` (``eps1=None``: the
            gradient dtype's machine epsilon).
        weight_decay: decoupled, as ``torch.optim.Adafactor``.
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf.
        rho_scaling: ``"once"`` (default) or ``"twice"`` (the paper's form), see
            :func:`grassfx.optim.base.row_weights`.
        update_in_backward: as :class:`grassfx.optim.AdamW`'s (updates inside backward,
            :mod:`grassfx.optim.inbackward`).

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(16, 16), rank=4, backend="eager")
        >>> opt = grassfx.optim.Adafactor(model.parameters(), lr=1e-2)
    """

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *, nonfinite="raise",
                 rho_scaling="once", update_in_backward=False):
        check_number("lr", lr, low=0.0)
        self.rho_scaling = check_rho_scaling(rho_scaling)
        check_number("beta2_decay", beta2_decay, high=0.0 + 1e-300)
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ConfigError(f"eps={eps!r}: expected a pair (eps1 or None, eps2)")
        if eps[0] is not None:
            check_number("eps[0]", eps[0], low=0.0)
        check_number("eps[1]", eps[1], low=0.0)
        check_number("d", d, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay,
                        nonfinite=nonfinite)
        super().__init__(params, defaults, update_in_backward)

    def _create_state(self, p, site, group) -> None:
        self._state(p, p.grad)

    def _state(self, p, grad):
        state = self.state[p]
        if not state:
            state["step"] = 0
            if grad.dim() > 1:
                state["row_var"] = grad.new_zeros(grad.shape[:-1] + (1,))
                state["col_var"] = grad.new_zeros(grad.shape[:-2] + (1, grad.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(grad)
        return state

    @staticmethod
    def _rms(t: torch.Tensor) -> float:
        return t.norm(2).item() / math.sqrt(t.numel())

    def _direction(self, state, grad, group):
        """Return (update, step factor alpha_t / clip); advances the second moments."""
        state["step"] += 1
        t = float(state["step"])
        eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(grad.dtype).eps
        mix = t ** group["beta2_decay"]
        g2_rows = grad.norm(dim=-1, keepdim=True).square_().div_(grad.shape[-1]) if grad.dim() > 1 else None
        if grad.dim() > 1:
            state["row_var"].lerp_(g2_rows, mix)
            col = grad.norm(dim=-2, keepdim=True).square_().div_(grad.shape[-2])
            state["col_var"].lerp_(col, mix)
            var = state["row_var"] @ state["col_var"]  # (r, n) = (r, 1) @ (1, n)
            var.div_(state["row_var"].mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            state["variance"].lerp_(grad * grad, mix)
            var = state["variance"].clone()
        update = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        clip = max(1.0, self._rms(update) / group["d"])
        return update, 1.0 / clip

    def _step_size(self, group, state, p_rms: float) -> float:
        t = state["step"] + 1
        return max(group["eps"][1], p_rms) * min(group["lr"], 1 / math.sqrt(t))

    def _update_dense(self, p, group):
        state = self._state(p, p.grad)
        alpha = self._step_size(group, state, self._rms(p))
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        update, inv_clip = self._direction(state, p.grad, group)
        p.add_(update, alpha=-alpha * inv_clip)

    def _update_projected(self, handle, site, group):
        weight = site.weight
        grad = site.flat(handle.grad)  # an expert stack: (E*r, n)
        state = self._state(handle, grad)
        rows = weight if site.full else weight.index_select(site.dim, site.idx)
        alpha = self._step_size(group, state, self._rms(rows))
        decay_selected(site, 1 - group["lr"] * group["weight_decay"])
        update, inv_clip = self._direction(state, grad, group)
        self._apply_projected(site, update, -alpha * inv_clip * site.scale, self.rho_scaling)
