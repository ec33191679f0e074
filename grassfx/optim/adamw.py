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
from grassfx.core.decay import owe
from grassfx.errors import ConfigError
from grassfx.fsdp import local
from grassfx.instrument import registry

from .base import GrassOptimizer
from .checks import check_adam_settings, check_rho_scaling
from .factored import check_full_state, factored_state, factored_step, state_mode
from .kernel import FlatLists, adamw_step, row_factors
from .rounding import check_state_dtype, check_update_rounding, rounding_of
from .rows import row_weights

__all__ = ["AdamW", "adamw_step", "row_factors"]


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

    def _sharding_refusal(self):
        if self._compiled_flag:
            return ("AdamW(compiled=True) with FSDP2-sharded weights: the sharded step runs eagerly; "
                    "pass compiled=False (or leave the default)")
        if self.update_rounding == "kahan":
            return "update_rounding='kahan' with FSDP2-sharded weights is not supported: use 'stochastic' or 'nearest'"
        return None

    def _classify(self) -> None:
        self._steps = None  # chosen again (below) at the next step
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
            self._shards.state(self.state[p], p, site, self.state_dtype)
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

    def _choose_steps(self) -> tuple:
        """The step implementations, in order, each taking the items it updates and returning
        the rest; chosen once per classification (not per step). What is left goes to
        :func:`adamw_step` (eager or compiled, :meth:`_kernel`)."""
        steps = [self._factored_items]  # a group's full_state (it may change: refused by _state)
        if self._shards is not None:
            steps.append(self._sharded_items)  # FSDP2-sharded projected weights (grassfx.optim.sharded)
        if not self._use_compiled():
            steps.append(self._fused_dense)  # torch's fused kernel for what is trained in full
        return tuple(steps)

    def _factored_items(self, work, beta1: float, beta2: float, eps: float) -> list:
        """Factored state: eagerly, a block of rows at a time (grassfx.optim.factored)."""
        rest = []
        for group, p, site in work:
            mode = self._mode(group, p, site)
            if mode == "adam":
                rest.append((group, p, site))
                continue
            factored_step(p, p.grad, self._state(p, site, mode), lr=group["lr"], beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=group["weight_decay"], mode=self._rounding(p))
        return rest

    def _sharded_items(self, work, beta1: float, beta2: float, eps: float) -> list:
        """FSDP2-sharded projected weights: the sharding layer's step."""
        rest = []
        for group, p, site in work:
            if site is None or not site.sharded:
                rest.append((group, p, site))
                continue
            self._shards.adamw_step(self.state[p], group, p, site, beta1, beta2, eps, mode=self._rounding(p, site),
                                    rho_scaling=self.rho_scaling, rewarmup=self.rewarmup, dtype=self.state_dtype)
        return rest

    def _apply_lists(self, work, beta1: float, beta2: float, eps: float) -> None:
        if self._steps is None:
            self._steps = self._choose_steps()
        for step in self._steps:
            work = step(work, beta1, beta2, eps)
        dense, proj = FlatLists(), FlatLists()
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
