"""The AdamW kernel: all of grassfx's AdamW maths, over flat lists of tensors.

:func:`adamw_step` runs eagerly or compiled (``AdamW(compiled=True)``); :func:`row_factors`
and :func:`moments` are also what the sharded layer (:mod:`.sharded`) runs on its shards.
See :mod:`.adamw` for the arithmetic and why it is so.
"""

from __future__ import annotations

import torch

from grassfx import select as _select
from grassfx.fsdp import local

from .rounding import add_to_rows, first_copies, round_update

__all__ = ["adamw_step", "row_factors", "moments", "FlatLists"]


def row_factors(row_step: torch.Tensor, alpha, beta1: float, beta2: float, rewarmup: int, weight=None):
    """Per-row step factors of projected AdamW from each row's own step count ``row_step`` (r,).

    Returns ``(factor, bc2)`` (float32, (r,)): the update of row j is
    ``factor_j * m_j / (sqrt(v_j) / bc2_j + eps)`` with
    ``factor_j = alpha * w_j * min(1, t_j / rewarmup) / (1 - beta1^t_j)`` and
    ``bc2_j = sqrt(1 - beta2^t_j)``: every row is bias-corrected by its own age, so a row
    that joined at the last refresh is treated as the fresh Adam state it is, and with
    ``rewarmup > 0`` its step ramps up linearly over its first ``rewarmup`` steps.
    ``w`` is ``weight`` (:func:`grassfx.optim.base.row_weights`; None: 1). ``alpha`` may be
    a float or a 0-d tensor (the kernel passes tensors).
    """
    t = row_step.to(torch.float64)
    factor = alpha / (1 - torch.pow(beta1, t))
    if rewarmup:
        factor = factor * (t / rewarmup).clamp(max=1.0)
    if weight is not None:
        factor = factor * weight.to(torch.float64)
    return factor.float(), torch.sqrt(1 - torch.pow(beta2, t)).float()


def moments(exp_avg, exp_avg_sq, grad, beta1: float, beta2: float, bc2, eps: float):
    """Advance both moments by ``grad``; return the denominator ``sqrt(v) / bc2 + eps``."""
    grad = grad.to(exp_avg.dtype)  # the gradient itself when the state has the parameter's dtype
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (exp_avg_sq.sqrt() / bc2).add_(eps)


def adamw_step(dense, proj, beta1: float, beta2: float, eps: float, decays: bool = True, rewarmup: int = 0) -> None:
    """One AdamW step over flat lists (see the module docstring).

    ``dense``: ``(params, grads, exp_avgs, exp_avg_sqs, nums, modes, comps)``, parameters
    updated in full; ``nums[:, i]`` = (step size ``-lr * scale / bc1``, ``sqrt(bc2)``, decay
    factor), float64.
    ``proj``: ``(weights, grads, exp_avgs, exp_avg_sqs, nums, modes, comps, dims, idxs,
    row_steps, row_weights, firsts)``, projected weights: grads and moments are (r, n) (or
    (m, r)); each row is bias-corrected by its own step count (``row_steps[i]``, advanced
    here; :func:`row_factors`, with ``row_weights[i]`` or None), the update goes to the
    selected rows and decoupled decay hits each selected row once (the caller records the
    other rows' debt); ``nums[:, i]`` = (``-lr * scale``, decay factor), float64.
    ``modes[i]``: how the new value is rounded into the weight (:mod:`.rounding`; fp32
    weights always ``"nearest"``), ``comps[i]`` its Kahan buffer or None, ``firsts[i]``
    (:func:`~grassfx.optim.rounding.first_copies`) or None where no row is drawn twice.
    ``decays=False`` (every decay factor is 1) leaves the decay code out.
    """
    params, grads, exp_avgs, exp_avg_sqs, nums, modes, comps = dense
    for i in range(len(params)):
        p, step, bc2, factor = params[i], nums[0, i].float(), nums[1, i].float(), nums[2, i].float()
        if modes[i] == "nearest":  # torch.optim.AdamW's arithmetic, in the weight's dtype
            if decays:
                p.mul_(factor)
            denom = moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2, eps)
            p.add_(exp_avgs[i] * step / denom)
            continue
        denom = moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2, eps)
        new = p.float() * factor if decays else p.float()  # the new value in float32, rounded once
        p.copy_(round_update(modes[i], new + (exp_avgs[i] * step / denom).float(), p.dtype, comps[i]))
    weights, grads, exp_avgs, exp_avg_sqs, nums, modes, comps, dims, idxs, row_steps, weights_, firsts = proj
    for i in range(len(weights)):
        w, dim, idx = weights[i], dims[i], idxs[i]
        row_steps[i].add_(1)
        factor, bc2 = row_factors(row_steps[i], nums[0, i], beta1, beta2, rewarmup, weights_[i])
        denom = moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2.unsqueeze(1 - dim), eps)
        update = exp_avgs[i] / denom * factor.unsqueeze(1 - dim)  # (r, n)
        add_to_rows(w, dim, idx, update, modes[i], comps[i], firsts[i], nums[1, i].float() if decays else None)


class FlatLists:
    """Flat lists for :func:`adamw_step` (one entry per parameter)."""

    def __init__(self):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = [], [], [], []
        self.nums = []  # per parameter: the float64 column of adamw_step's ``nums``
        self.modes, self.comps = [], []
        self.dims, self.idxs, self.row_steps, self.row_weights, self.firsts, self.sites = [], [], [], [], [], []

    def add(self, param, grad, state, mode, *nums):
        # FSDP2's sharded parameters and their state: the local shards (views)
        self.params.append(local(param))
        self.grads.append(local(grad))
        self.exp_avgs.append(local(state["exp_avg"]))
        self.exp_avg_sqs.append(local(state["exp_avg_sq"]))
        self.modes.append(mode)
        self.comps.append(local(state.get("kahan_comp")))
        self.nums.append(nums)

    def add_projected(self, site, grad, state, mode, row_weight, *nums):
        # an expert stack's (E, r, n) gradient and state as (E*r, n) views of its flat rows
        views = {k: site.flat(state[k]) for k in ("exp_avg", "exp_avg_sq", "kahan_comp") if k in state}
        self.add(site.weight, site.flat(grad), views, mode, *nums)
        self.dims.append(site.dim)
        self.idxs.append(site.idx)
        self.row_steps.append(state["row_step"])
        self.row_weights.append(row_weight)
        drawn_twice = mode != "nearest" and site.method in _select.WITH_REPLACEMENT
        self.firsts.append(first_copies(site.idx, site.weight.shape[site.dim]) if drawn_twice else None)
        self.sites.append(site)

    def _nums(self):
        if not self.params:
            return None
        return torch.tensor(self.nums, dtype=torch.float64, device=self.params[0].device).t()

    def dense_args(self):
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self._nums(), tuple(self.modes), self.comps

    def proj_args(self):
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self._nums(), tuple(self.modes),
                self.comps, tuple(self.dims), self.idxs, self.row_steps, self.row_weights, self.firsts)
