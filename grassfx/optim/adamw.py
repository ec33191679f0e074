"""AdamW with (r x n) moments for projected weights, and its one kernel.

:func:`adamw_step` holds all of grassfx's AdamW maths. It runs over flat lists of
parameters and is called either directly (eager) or once compiled by ``torch.compile``
(``AdamW(compiled=True)``, the default for models compiled with Inductor); the per-step
numbers (step size with bias correction, ``sqrt`` of the second bias correction, decay
factor) travel as one float64 tensor, so learning-rate schedules never recompile.

For a parameter updated in full (every unprojected parameter, and projected weights with
``rank >= rows``) the arithmetic is that of ``torch.optim.AdamW`` operation for
operation (``p + (step * m) / (sqrt(v) / bc2 + eps)``, as its ``addcdiv_``), so at full
rank the two agree exactly.
"""

from __future__ import annotations

import math

import torch

from grassfx.errors import ConfigError

from .base import GrassOptimizer, check_number
from .decay import decay_rows, owe

__all__ = ["AdamW", "adamw_step"]


def _moments(exp_avg, exp_avg_sq, grad, beta1: float, beta2: float, bc2, eps: float):
    """Advance both moments by ``grad``; return the denominator ``sqrt(v) / bc2 + eps``."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (exp_avg_sq.sqrt() / bc2).add_(eps)


def adamw_step(dense, proj, beta1: float, beta2: float, eps: float, decays: bool = True) -> None:
    """One AdamW step over flat lists (see the module docstring).

    ``dense``: ``(params, grads, exp_avgs, exp_avg_sqs, nums)``, parameters updated in full.
    ``proj``: ``(weights, grads, exp_avgs, exp_avg_sqs, nums, dims, idxs, rhos)``, projected
    weights: grads and moments are (r, n) (or (m, r)); the update goes to the selected rows
    and decoupled decay hits each selected row once (the caller records the other rows'
    debt). ``nums[:, i]`` = (step size ``-lr * scale / bc1``, ``sqrt(bc2)``, decay factor),
    float64. ``decays=False`` (every decay factor is 1) leaves the decay code out.
    """
    params, grads, exp_avgs, exp_avg_sqs, nums = dense
    for i in range(len(params)):
        step, bc2, factor = nums[0, i].float(), nums[1, i].float(), nums[2, i].float()
        if decays:
            params[i].mul_(factor)
        denom = _moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2, eps)
        params[i].add_(exp_avgs[i] * step / denom)
    weights, grads, exp_avgs, exp_avg_sqs, nums, dims, idxs, rhos = proj
    for i in range(len(weights)):
        w, dim, idx = weights[i], dims[i], idxs[i]
        step, bc2, factor = nums[0, i].float(), nums[1, i].float(), nums[2, i].float()
        if decays:
            decay_rows(w, idx, dim, factor)
        denom = _moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2, eps)
        rho = rhos[i].unsqueeze(1 - dim)  # broadcast along the selected dim
        w.index_add_(dim, idx, (exp_avgs[i] * step / denom * rho).to(w.dtype))  # (r, n) rows into (m, n)


class _Lists:
    """Flat lists for :func:`adamw_step` (one entry per parameter)."""

    def __init__(self):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = [], [], [], []
        self.steps, self.bc2s, self.factors = [], [], []
        self.dims, self.idxs, self.rhos, self.sites = [], [], [], []

    def add(self, param, grad, state, *, step, bc2, factor, site=None):
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        self.steps.append(step)
        self.bc2s.append(bc2)
        self.factors.append(factor)
        if site is not None:
            self.dims.append(site.dim)
            self.idxs.append(site.idx)
            self.rhos.append(site.rho)
            self.sites.append(site)

    def _nums(self):
        if not self.params:
            return None
        return torch.tensor([self.steps, self.bc2s, self.factors], dtype=torch.float64, device=self.params[0].device)

    def dense_args(self):
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self._nums()

    def proj_args(self):
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self._nums(),
                tuple(self.dims), self.idxs, self.rhos)


class AdamW(GrassOptimizer):
    """AdamW with (r x n) moments for projected weights.

    Args:
        params: ``model.parameters()`` of a model from :func:`grassfx.compile` (groups ok).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf.
        compiled: run :func:`adamw_step` compiled (``True``), eagerly (``False``), or
            compiled when a model was compiled with Inductor (``None``, the default).

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(32, 32), rank=4, backend="eager")
        >>> opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(2, 32)).sum().backward(); opt.step()
        >>> [tuple(v.shape) for k, v in opt.state[model.sites[0].handle].items() if k != "step"]
        [(4, 32), (4, 32)]
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, nonfinite="raise",
                 compiled=None):
        check_number("lr", lr, low=0.0)
        if compiled not in (None, True, False):
            raise ConfigError(f"compiled={compiled!r}: expected None (follow the model's backend), True or False")
        self._compiled_flag = compiled
        self._compiled_step = None
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ConfigError(f"betas={betas!r}: expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], low=0.0, high=1.0)
        check_number("betas[1]", betas[1], low=0.0, high=1.0)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, nonfinite=nonfinite)
        super().__init__(params, defaults)

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _use_compiled(self) -> bool:
        if self._compiled_flag is not None:
            return self._compiled_flag
        return any(s.config.backend == "inductor" for s in self._schedules)

    def _kernel(self):
        if not self._use_compiled():
            return adamw_step
        if self._compiled_step is None:
            self._compiled_step = torch.compile(adamw_step, dynamic=False, fullgraph=True)
        return self._compiled_step

    def _apply(self, work) -> None:
        by_consts = {}  # the kernel bakes betas and eps in: one call per distinct pair
        for group, p, site in work:
            by_consts.setdefault((tuple(group["betas"]), group["eps"]), []).append((group, p, site))
        for ((beta1, beta2), eps), items in by_consts.items():
            self._apply_lists(items, beta1, beta2, eps)

    def _apply_lists(self, work, beta1: float, beta2: float, eps: float) -> None:
        dense, proj = _Lists(), _Lists()
        for group, p, site in work:
            state = self._state(p)
            state["step"] += 1
            t = state["step"]
            scale = 1.0 if site is None else site.scale
            nums = dict(step=-group["lr"] * scale / (1 - beta1**t), bc2=math.sqrt(1 - beta2**t),
                        factor=1 - group["lr"] * group["weight_decay"])
            if site is None or site.full:
                dense.add(p if site is None else site.weight, p.grad, state, **nums)
            else:
                proj.add(site.weight, p.grad, state, site=site, **nums)
        # without weight decay the decay code is left out of the kernel (fewer kernels to
        # compile and two fewer passes over each selected row); compiled, a bool guard
        # means at most one more compile if some group turns decay on later
        decays = any(group["weight_decay"] != 0 for group, _, _ in work)
        self._kernel()(dense.dense_args(), proj.proj_args(), beta1, beta2, eps, decays)
        if decays:
            # the 0-d float64 debts stay outside the compiled region: torch 2.13's Inductor
            # drops in-place updates of 0-d CPU float64 inputs there
            for site, factor in zip(proj.sites, proj.factors):
                owe(site, factor)
