"""AdamW with (r x n) moments for projected weights, and its one kernel.

:func:`adamw_step` holds all of grassfx's AdamW maths. It runs over flat lists of
parameters and is called either directly (eager) or once compiled by ``torch.compile``
(``AdamW(compiled=True)``, the default for models compiled with Inductor); the per-step
numbers (step size with bias correction, ``sqrt`` of the second bias correction, decay
factor) travel as one float64 tensor, so learning-rate schedules never recompile.

For a parameter updated in full (every unprojected parameter, and projected weights with
``rank >= rows``) the arithmetic is that of ``torch.optim.AdamW`` operation for
operation (``p + (step * m) / (sqrt(v) / bc2 + eps)``, as its ``addcdiv_``). Eagerly, such
a parameter (with ``scale`` 1, nearest rounding and moments in its own dtype, on a CPU or
CUDA device) is updated by torch's fused AdamW kernel instead, one pass over each tensor
(the embeddings and an LM head are most of a step's optimizer time), so at full rank
``grassfx.optim.AdamW`` equals ``torch.optim.AdamW(fused=True)`` bit for bit.

A projected weight counts steps per selected row (``state["row_step"]``, float32 (r,),
instead of one shared ``step``): each row is bias-corrected by its own age
(:func:`row_factors`), so a row that joined at the last refresh is fresh Adam state while
a row kept across it (``moments="keep_overlap"``) continues where it was, and
``rewarmup=K`` ramps a new row's step from 1/K to 1 over its first K steps. The per-row
vectors are tensors, so neither new rows nor ages ever recompile.
"""

from __future__ import annotations

import math

import torch

from grassfx import _compat
from grassfx import select as _select
from grassfx.errors import ConfigError
from grassfx.fsdp import local
from grassfx.instrument import registry
from grassfx.instrument.experts import flat

from .base import GrassOptimizer, check_adam_settings, check_rho_scaling, row_weights
from .decay import owe
from .factored import check_full_state, factored_state, factored_step, state_mode
from .rounding import add_to_rows, check_state_dtype, check_update_rounding, first_copies, round_update, rounding_of
from .sharded import adamw_site_step

__all__ = ["AdamW", "adamw_step", "row_factors"]


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


def _moments(exp_avg, exp_avg_sq, grad, beta1: float, beta2: float, bc2, eps: float):
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
            denom = _moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2, eps)
            p.add_(exp_avgs[i] * step / denom)
            continue
        denom = _moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2, eps)
        new = p.float() * factor if decays else p.float()  # the new value in float32, rounded once
        p.copy_(round_update(modes[i], new + (exp_avgs[i] * step / denom).float(), p.dtype, comps[i]))
    weights, grads, exp_avgs, exp_avg_sqs, nums, modes, comps, dims, idxs, row_steps, weights_, firsts = proj
    for i in range(len(weights)):
        w, dim, idx = weights[i], dims[i], idxs[i]
        row_steps[i].add_(1)
        factor, bc2 = row_factors(row_steps[i], nums[0, i], beta1, beta2, rewarmup, weights_[i])
        denom = _moments(exp_avgs[i], exp_avg_sqs[i], grads[i], beta1, beta2, bc2.unsqueeze(1 - dim), eps)
        update = exp_avgs[i] / denom * factor.unsqueeze(1 - dim)  # (r, n)
        add_to_rows(w, dim, idx, update, modes[i], comps[i], firsts[i], nums[1, i].float() if decays else None)

class _Lists:
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
        views = {k: flat(site, state[k]) for k in ("exp_avg", "exp_avg_sq", "kahan_comp") if k in state}
        self.add(site.weight, flat(site, grad), views, mode, *nums)
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


class AdamW(GrassOptimizer):
    """AdamW with (r x n) moments for projected weights.

    Args:
        params: ``model.parameters()`` of a model from :func:`grassfx.compile` (groups ok).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf.
        compiled: run :func:`adamw_step` eagerly (``False``, the default: nothing more to
            compile; its state is r/m of AdamW's, so the step is cheap), compiled into
            fused kernels (``True``: fewer kernels per step, 10-25 s more compile time on
            this project's CPU, ``benchmarks/RESULTS.md``), or compiled when a model was
            compiled with Inductor (``None``).
        rewarmup: ramp a newly selected row's step from 1/K to 1 over its first K steps
            (an int >= 0; 0, the default, turns it off).
        rho_scaling: ``"once"`` (default: each selected row gets one step, whatever the
            selector's ``rho``) or ``"twice"`` (the paper's ``P step(Pᵀ G)``); see
            :func:`grassfx.optim.base.row_weights`.
        update_rounding: how a bf16/fp16 weight receives its update (pure low-precision
            training, no float32 master copy; :mod:`grassfx.optim.rounding`):
            ``"nearest"`` (default: as ``torch.optim.AdamW``), ``"stochastic"`` (unbiased
            random rounding of the float32 new value; global RNG) or ``"kahan"``
            (compensated summation, a buffer of the weight's dtype in the state). Float32
            weights are updated exactly alike in every mode.
        state_dtype: dtype of the moments: ``None`` (default: each parameter's dtype),
            ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        update_in_backward: update each parameter inside backward, as soon as its gradient
            exists, and free the gradient (:mod:`grassfx.optim.inbackward`): no gradient of
            the whole model is alive at once. Refuses gradient accumulation, data
            parallelism, ``nonfinite="skip"`` and ``compiled=True``; gradients cannot be clipped.
        full_state: the state of the 2-D parameters grassfx does not project (embeddings,
            an untied LM head; :mod:`grassfx.optim.factored`): ``"adam"`` (default: both
            moments), ``"factored"`` (the first moment, and the second factored into row and
            column means: half the state) or ``"factored_nomomentum"`` (the factored second
            moment only). Also a parameter-group key (e.g. the input embedding without
            momentum, the head with it). Fixed once a parameter has state. Not with
            FSDP2-sharded parameters. Their quality cost: ``benchmarks/RESULTS.md``, section 4.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(32, 32), rank=4, backend="eager")
        >>> opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(2, 32)).sum().backward(); opt.step()
        >>> {k: tuple(v.shape) for k, v in opt.state[model.sites[0].handle].items()}
        {'row_step': (4,), 'exp_avg': (4, 32), 'exp_avg_sq': (4, 32)}
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, nonfinite="raise",
                 compiled=False, rewarmup=0, rho_scaling="once", update_rounding="nearest", state_dtype=None,
                 update_in_backward=False, full_state="adam"):
        self.rewarmup = check_adam_settings(lr, betas, eps, weight_decay, rewarmup)
        self.full_state = check_full_state(full_state)
        self.update_rounding = check_update_rounding(update_rounding)
        self.state_dtype = check_state_dtype(state_dtype)
        self.rho_scaling = check_rho_scaling(rho_scaling)
        if compiled not in (None, True, False):
            raise ConfigError(f"compiled={compiled!r}: expected None (follow the model's backend), True or False")
        if compiled and update_in_backward:
            raise ConfigError("compiled=True with update_in_backward=True: updates inside backward run "
                              "one parameter at a time, eagerly (one compiled kernel per shape would recompile)")
        self._compiled_flag = compiled
        self._compiled_step = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, nonfinite=nonfinite,
                        full_state=self.full_state)
        super().__init__(params, defaults, update_in_backward)

    def _classify(self) -> None:
        super()._classify()
        modes = [check_full_state(group["full_state"]) for group in self.param_groups]
        if self._sharded and any(mode != "adam" for mode in modes):
            raise ConfigError("full_state='factored' or 'factored_nomomentum' with FSDP2-sharded parameters is not "
                              "supported: a factored second moment needs the row and column sums of the whole "
                              "gradient; pass full_state='adam'")

    def load_state_dict(self, state_dict) -> None:
        """As :meth:`GrassOptimizer.load_state_dict`; each group's ``full_state`` must be the
        saved group's (a different one is refused: the saved state was made for it), and a
        group saved before ``full_state`` existed keeps this optimizer's."""
        for i, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            if "full_state" in saved and saved["full_state"] != group["full_state"]:
                raise ConfigError(f"parameter group {i} of the checkpoint has full_state={saved['full_state']!r}, "
                                  f"this optimizer's has {group['full_state']!r}: build the optimizer with the "
                                  "checkpoint's full_state (its state was made for it)")
        modes = [group["full_state"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mode in zip(self.param_groups, modes):
            group.setdefault("full_state", mode)
        self._classify()

    @staticmethod
    def _mode(group, p, site) -> str:
        """The ``full_state`` that applies to ``p``: its group's for a 2-D parameter that is not
        projected, ``"adam"`` for every other."""
        if site is not None or p.dim() != 2:
            return "adam"
        return check_full_state(group["full_state"])

    def _fused_dense(self, work, beta1: float, beta2: float, eps: float) -> list:
        """Update what is trained in full (with ``scale`` 1, nearest rounding, moments in the
        parameter's dtype) by torch's fused AdamW kernel: the arithmetic of
        ``torch.optim.AdamW(fused=True)``, one pass over each tensor instead of the eager
        kernel's several (the embeddings and the LM head are most of a step's optimizer
        time). Returns the rest of ``work``, for :func:`adamw_step`."""
        rest, batches = [], {}
        for item in work:
            group, p, site = item
            param = p if site is None else site.weight
            if (site is not None and not (site.full and site.scale == 1.0)) or self._rounding(p, site) != "nearest" \
                    or p.grad.dtype != param.dtype or (self.state_dtype not in (None, param.dtype)):
                rest.append(item)
                continue
            key = (group["lr"], group["weight_decay"], param.device, param.dtype)
            batches.setdefault(key, []).append(item)
        for (lr, weight_decay, device, _), items in batches.items():
            states = [self._state(p, site) for _, p, site in items]
            params = [local(p if site is None else site.weight) for _, p, site in items]
            steps = [torch.tensor(float(state["step"] + 1), dtype=torch.float32, device=device) for state in states]
            if _compat.fused_adamw(params, [local(p.grad) for _, p, _ in items], [local(s["exp_avg"]) for s in states],
                                   [local(s["exp_avg_sq"]) for s in states], steps, lr=lr, beta1=beta1, beta2=beta2,
                                   weight_decay=weight_decay, eps=eps):
                for state in states:
                    state["step"] += 1
            else:
                rest.extend(items)
        return rest

    def _state(self, p, site=None, mode: str = "adam"):
        """Moments of ``p`` (in ``state_dtype``), with one shared ``step`` (updated in full) or,
        for the handle of a projected weight (``site`` not full), ``row_step``: each selected
        row's own step count; with ``update_rounding="kahan"`` and a bf16/fp16 weight, the
        compensation ``kahan_comp`` (the shape of ``p``, the weight's dtype). ``mode``: the
        parameter's ``full_state`` (:meth:`_mode`; a factored mode makes
        :func:`~grassfx.optim.factored.factored_state`); state made for another is refused."""
        state = self.state[p]
        if state and state_mode(state) != mode:
            name = registry.name_of(p) or f"parameter of shape {tuple(p.shape)}"
            raise ConfigError(f"the optimizer state of {name} was made for full_state={state_mode(state)!r}, its "
                              f"parameter group now says {mode!r}: full_state cannot change once a parameter has "
                              "state (start from a fresh optimizer, or set the group back)")
        if not state and mode != "adam":
            state.update(factored_state(p, mode, self.state_dtype, self._rounding(p) == "kahan"))
        if not state:
            if site is None or site.full:
                state["step"] = 0
            else:
                state["row_step"] = torch.zeros(site.rank, dtype=torch.float32, device=p.device)
            dtype = self.state_dtype or p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if self._rounding(p, site) == "kahan":  # in the weight's dtype (a handle may have another)
                weight = p if site is None else site.weight
                state["kahan_comp"] = torch.zeros_like(p, dtype=weight.dtype, memory_format=torch.preserve_format)
        return state

    def _create_state(self, p, site, group) -> None:
        if site is not None and site.sharded:
            from .sharded import adamw_state, layout_of

            adamw_state(self, p, site, layout_of(site))
        else:
            self._state(p, site, self._mode(group, p, site))

    def _rounding(self, p, site=None) -> str:
        """The update rounding of ``p`` (a handle: of its weight)."""
        return rounding_of(p if site is None else site.weight, self.update_rounding)

    def _use_compiled(self) -> bool:
        if self.update_in_backward or self._sharded:
            return False
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
        rest = []
        for group, p, site in work:  # factored: eagerly, a block of rows at a time (grassfx.optim.factored)
            mode = self._mode(group, p, site)
            if mode == "adam":
                rest.append((group, p, site))
                continue
            factored_step(p, p.grad, self._state(p, site, mode), lr=group["lr"], beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=group["weight_decay"], mode=self._rounding(p))
        work = rest
        if self._sharded:  # FSDP2-sharded projected weights: their own step (grassfx.optim.sharded)
            sharded = [item for item in work if item[2] is not None and item[2].sharded]
            work = [item for item in work if item[2] is None or not item[2].sharded]
            for group, p, site in sharded:
                adamw_site_step(self, group, p, site, beta1, beta2, eps)
        if not self._use_compiled():
            work = self._fused_dense(work, beta1, beta2, eps)
        dense, proj = _Lists(), _Lists()
        for group, p, site in work:
            state = self._state(p, site)
            scale = 1.0 if site is None else site.scale
            decay = 1 - group["lr"] * group["weight_decay"]
            mode = self._rounding(p, site)
            if site is None or site.full:
                state["step"] += 1
                t = state["step"]
                dense.add(p if site is None else site.weight, p.grad, state, mode,
                          -group["lr"] * scale / (1 - beta1**t), math.sqrt(1 - beta2**t), decay)
            else:  # bias correction per row, inside the kernel
                proj.add_projected(site, p.grad, state, mode, row_weights(site, self.rho_scaling),
                                   -group["lr"] * scale, decay)
        # without weight decay the decay code is left out of the kernel (fewer kernels to
        # compile and two fewer passes over each selected row); compiled, a bool guard
        # means at most one more compile if some group turns decay on later
        decays = any(group["weight_decay"] != 0 for group, _, _ in work)
        self._kernel()(dense.dense_args(), proj.proj_args(), beta1, beta2, eps, decays, self.rewarmup)
        if decays:
            # the 0-d float64 debts stay outside the compiled region: torch 2.13's Inductor
            # drops in-place updates of 0-d CPU float64 inputs there
            for site, (_, factor) in zip(proj.sites, proj.nums):
                owe(site, factor)
