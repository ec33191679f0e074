"""Subspace-aware optimizers: one object trains projected and ordinary parameters.

For a projected weight ``W`` (m x n, rows selected; columns are symmetric) the optimizer
sees the handle's gradient ``C = rho * G[idx]`` (r x n) and keeps its state at (r x n).
The update lands on the selected rows only::

    W.index_add_(0, idx, -lr * scale * rho[:, None] * step(C))    # (r, n) into (m, n)

``index_add`` (not ``index_copy``): a selector with replacement may pick a row twice.
Every other parameter (biases, norms, embeddings, unprojected weights) gets the ordinary
update of the same algorithm. With every row selected, ``AdamW`` / ``SGD`` /
``Adafactor`` here equal ``torch.optim``'s.

**Refresh.** When the model picked new rows, the optimizer resets the moments (or, with
``compile(..., moments="keep_overlap")``, keeps the moments of rows selected both before
and after) before the step. ``AdamW`` counts steps per selected row (``row_step``, (r,)):
each row is bias-corrected by its own age, so a row that joined at the last refresh is
fresh Adam state while a kept row continues, and ``rewarmup=K`` ramps a new row's step
from 1/K to 1 over its first K steps.

**rho.** Adaptive optimizers (``AdamW``, ``Adafactor``) apply a selector's scale ``rho``
once (``rho_scaling="once"``: it scales the compressed gradient, and each selected row
gets one step), so every selector runs at the same learning rate; ``"twice"`` is the
paper's ``P step(Pᵀ G)``. ``SGD`` always uses the paper's form (unbiased ``P Pᵀ G``).

**Decoupled weight decay (AdamW, Adafactor)** without an O(mn) pass per step: selected
rows decay every step (O(rn)); rows outside the selection owe the product of the decay
factors, kept as one scalar per weight (``Site.decay_pending``) and applied once at the
next refresh (one O(mn) pass per ``update_freq`` steps) and by ``grassfx.unwrap``. Rows
are therefore exact at every refresh and lag by at most ``update_freq`` steps between.
``SGD``'s ``weight_decay`` is L2 added to the gradient, as in torch: for projected weights
the selected rows' L2 term ``rho * wd * W[idx]`` is added to ``C``.

**Clipping.** ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` clips the
gradients that exist: ``C`` for projected weights. With ``rho = 1`` (``top_r``,
``multinorm_nr``) ‖C‖ is the norm of the selected rows (<= the dense norm); with
``multinorm`` and ``uniform`` E‖C‖² equals the dense ‖G‖² (an unbiased estimate).

**Non-finite gradients** are never written into weights: by default ``step()`` raises
:class:`grassfx.NonFiniteGradientError` naming the parameter before touching anything;
``nonfinite="skip"`` skips the step instead (and counts it in ``skipped_steps``).

**State** holds tensors and numbers only (``torch.load(weights_only=True)`` works), and a
run saved after step N resumes bit-exactly with the model's own ``state_dict``.
"""

from __future__ import annotations

import math
import weakref

import torch

from .errors import ConfigError, NonFiniteGradientError

__all__ = ["AdamW", "SGD", "Adafactor", "GrassOptimizer"]

_NONFINITE = ("raise", "skip")


def _check_number(name, value, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}={value!r}: must be {'>' if low_open else '>='} {low}")
    if high is not None and value >= high:
        raise ConfigError(f"{name}={value!r}: must be < {high}")


def _bcast(vec: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vec.reshape(shape)


_RHO_SCALINGS = ("once", "twice")


def row_weights(site, rho_scaling: str):
    """Per-entry factor of a projected update (r,), or None where it is 1 everywhere.

    ``"twice"`` is the paper's ``W -= lr * P step(Pᵀ G)``: ``rho`` scales the compressed
    gradient and again the update. An adaptive optimizer divides the first ``rho`` out
    (its step does not depend on the gradient's scale), so with ``"twice"`` a selector with
    ``rho != 1`` moves its rows by ``rho`` times the step of one with ``rho = 1`` (``uniform``
    at r = m/8: 2.8x). ``"once"`` (the adaptive optimizers' default) keeps ``rho`` in the
    gradient only and gives each selected row one step, split evenly between the copies
    of a row drawn more than once, so every selector runs at the same learning rate.
    """
    if rho_scaling == "twice":
        return None if site.method in _UNIT_RHO else site.rho
    if site.method not in _WITH_REPLACEMENT:
        return None
    counts = torch.zeros(site.rows, dtype=torch.float32, device=site.idx.device)
    counts.index_add_(0, site.idx, torch.ones(site.rank, dtype=torch.float32, device=site.idx.device))
    return counts[site.idx].reciprocal()


#: selectors whose rho is always 1, and those that may pick a row more than once
_UNIT_RHO = frozenset({"top_r", "multinorm_nr"})
_WITH_REPLACEMENT = frozenset({"multinorm", "uniform"})


class GrassOptimizer(torch.optim.Optimizer):
    """Base class: parameter classification, refresh handling, decay, checks, stepping."""

    def __init__(self, params, defaults):
        nonfinite = defaults.get("nonfinite", "raise")
        if nonfinite not in _NONFINITE:
            raise ConfigError(f"nonfinite={nonfinite!r}: allowed values: raise, skip")
        super().__init__(params, defaults)
        self.skipped_steps = 0
        self._models = []
        self._names = {}
        self._classify()

    # -- setup --------------------------------------------------------------------------
    def _classify(self) -> None:
        sites, models, given = {}, {}, set()
        for group in self.param_groups:
            for p in group["params"]:
                given.add(id(p))
                site = getattr(p, "_grassfx_site", None)
                if site is not None:
                    sites[id(p)] = site
                    model = site.model
                    if model is not None:
                        models[id(model)] = model
        self._models = list(models.values())
        self._target_ids = set()
        for model in self._models:
            for name, p in model.named_parameters():
                self._names[id(p)] = name
            for site in model.sites:
                w = model.weight_of(site)
                self._target_ids.add(id(w))
                self._names[id(site.handle)] = site.name + " (compressed gradient)"
        for group in self.param_groups:
            for p in group["params"]:
                owner = getattr(p, "_grassfx_target", None)
                site = owner() if owner is not None else None
                if site is not None and id(site.handle) not in given:
                    raise ConfigError(
                        f"{site.name!r} is a grassfx-projected weight but its gradient handle "
                        "was not passed to the optimizer, so it would never train: pass "
                        "model.parameters() of the model grassfx.compile returned"
                    )

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if hasattr(self, "_models"):
            self._classify()

    # -- the step -----------------------------------------------------------------------
    def _grads(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in getattr(self, "_target_ids", ()):
                    yield group, p

    def _all_finite(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for _, p in self._grads()]
        if not flags:
            return True
        ok = bool(torch.stack(flags).all())
        if ok:
            return True
        if self.defaults.get("nonfinite", "raise") == "skip":
            return False
        for (_, p), flag in zip(self._grads(), flags):
            if not bool(flag):
                name = self._names.get(id(p), f"parameter of shape {tuple(p.shape)}")
                raise NonFiniteGradientError(
                    f"the gradient of {name} holds NaN or Inf; no weight was changed. Lower the "
                    "learning rate, clip gradients, or pass nonfinite='skip' to skip such steps"
                )
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._all_finite():
            self.skipped_steps += 1
            return loss
        work, refreshed = [], False
        for group, p in self._grads():
            site = getattr(p, "_grassfx_site", None)
            if site is not None and site.refreshed:
                self._on_refresh(p, site, group)
                refreshed = True
            work.append((group, p, site))
        if refreshed:
            for model in self._models:
                if model._dp is not None:
                    model._dp.check_selection()
        self._apply(work)
        for model in self._models:
            model.grass_step.add_(1)
        return loss

    def _apply(self, work) -> None:
        """Update every ``(group, param, site)``; subclasses may fuse and compile this."""
        for group, p, site in work:
            if site is None:
                self._update_dense(p, group)
            else:
                self._update_projected(p, site, group)

    # -- refresh ------------------------------------------------------------------------
    def _on_refresh(self, handle, site, group) -> None:
        model = site.model
        self._settle_decay(site, model)
        state = self.state[handle]
        policy = model.grass_config.moments if model is not None else "reset"
        if state:
            if policy == "keep_overlap" and site.prev_idx is not None:
                src = torch.full((site.rows,), -1, dtype=torch.long, device=site.idx.device)
                src[site.prev_idx] = torch.arange(site.rank, device=site.idx.device)
                src = src[site.idx]
                keep = _bcast(src >= 0, handle.dim(), site.dim)
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == handle.shape:
                        moved = value.index_select(site.dim, src.clamp_min(0))
                        value.copy_(torch.where(keep, moved, torch.zeros_like(moved)))
                    elif torch.is_tensor(value) and value.dim() == 1 and value.shape[0] == site.rank:
                        moved = value.index_select(0, src.clamp_min(0))
                        value.copy_(torch.where(src >= 0, moved, torch.zeros_like(moved)))
            else:
                self.state[handle] = {}
        site.refreshed = False

    @staticmethod
    def _settle_decay(site, model) -> None:
        """Apply the decay owed by rows outside the previous selection."""
        factor = float(site.decay_pending)
        if factor == 1.0 or model is None or site.prev_idx is None:
            site.decay_pending.fill_(1.0)
            return
        w = model.weight_of(site)
        scale = torch.full((site.rows,), factor, dtype=w.dtype, device=w.device)
        scale[site.prev_idx] = 1.0
        w.mul_(_bcast(scale, 2, site.dim))
        site.decay_pending.fill_(1.0)

    @staticmethod
    def _decay_selected(site, weight, factor: float) -> None:
        """Decoupled decay: selected rows now, the others owe ``factor`` (lazily)."""
        if factor == 1.0:
            return
        if site.full:
            weight.mul_(factor)
            return
        rows = torch.unique(site.idx)
        picked = weight.index_select(site.dim, rows) * factor
        weight.index_copy_(site.dim, rows, picked)
        site.decay_pending.mul_(factor)

    @staticmethod
    def _apply_projected(site, weight, update: torch.Tensor, alpha: float, rho_scaling: str = "twice") -> None:
        """``W[idx] += alpha * w * update`` along the selected dim, ``w`` from :func:`row_weights`."""
        if site.full:
            weight.add_(update, alpha=alpha)
            return
        w = row_weights(site, rho_scaling)
        if w is not None:
            update = update * _bcast(w, update.dim(), site.dim).to(update.dtype)
        weight.index_add_(site.dim, site.idx, update, alpha=alpha)

    @staticmethod
    def _weight(site):
        return site.model.weight_of(site)

    def _update_dense(self, p, group):  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_projected(self, handle, site, group):  # pragma: no cover - abstract
        raise NotImplementedError


class AdamW(GrassOptimizer):
    """AdamW with (r x n) moments for projected weights.

    Args:
        params: ``model.parameters()`` of a model from :func:`grassfx.compile` (groups ok).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(32, 32), rank=4, backend="eager")
        >>> opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(2, 32)).sum().backward(); opt.step()
        >>> [tuple(v.shape) for k, v in opt.state[model.sites[0].handle].items() if k != "step"]
        [(4, 32), (4, 32)]
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, nonfinite="raise",
                 compiled=None, rewarmup=0, rho_scaling="once"):
        _check_number("lr", lr, low=0.0)
        if isinstance(rewarmup, bool) or not isinstance(rewarmup, int) or rewarmup < 0:
            raise ConfigError(f"rewarmup={rewarmup!r}: expected an int >= 0 (steps; 0 turns it off)")
        if rho_scaling not in _RHO_SCALINGS:
            raise ConfigError(f"rho_scaling={rho_scaling!r}: allowed values: {', '.join(_RHO_SCALINGS)}")
        self.rewarmup = rewarmup
        self.rho_scaling = rho_scaling
        if compiled not in (None, True, False):
            raise ConfigError(f"compiled={compiled!r}: expected None (follow the model's backend), True or False")
        self._compiled_flag = compiled
        self._fused = None
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ConfigError(f"betas={betas!r}: expected a pair (beta1, beta2)")
        _check_number("betas[0]", betas[0], low=0.0, high=1.0)
        _check_number("betas[1]", betas[1], low=0.0, high=1.0)
        _check_number("eps", eps, low=0.0)
        _check_number("weight_decay", weight_decay, low=0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, nonfinite=nonfinite)
        super().__init__(params, defaults)

    def _moments(self, p, like):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _direction(state, grad, group):
        """Advance the moments by ``grad``; return (numerator, denominator, step size)."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - beta1**t
        bc2_sqrt = math.sqrt(1 - beta2**t)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
        return exp_avg, denom, group["lr"] / bc1

    def _update_dense(self, p, group):
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        num, denom, step_size = self._direction(self._moments(p, p), p.grad, group)
        p.addcdiv_(num, denom, value=-step_size)

    def _row_moments(self, handle, site):
        """Moments of a projected weight plus ``row_step``: each selected row's own step count."""
        state = self.state[handle]
        if not state:
            state["row_step"] = torch.zeros(site.rank, dtype=torch.float32, device=handle.device)
            state["exp_avg"] = torch.zeros_like(handle, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(handle, memory_format=torch.preserve_format)
        return state

    def _update_projected(self, handle, site, group):
        weight = self._weight(site)
        self._decay_selected(site, weight, 1 - group["lr"] * group["weight_decay"])
        if site.full:
            num, denom, step_size = self._direction(self._moments(handle, handle), handle.grad, group)
            weight.add_(num / denom, alpha=-step_size * site.model.grass_config.scale)
            return
        state = self._row_moments(handle, site)
        beta1, beta2 = group["betas"]
        state["row_step"].add_(1)
        grad = handle.grad
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        factor, bc2 = row_factors(state["row_step"], -group["lr"] * site.model.grass_config.scale,
                                  beta1, beta2, self.rewarmup, row_weights(site, self.rho_scaling))
        dim, ndim = site.dim, grad.dim()
        denom = (state["exp_avg_sq"].sqrt() / _bcast(bc2, ndim, dim)).add_(group["eps"])
        update = state["exp_avg"] / denom * _bcast(factor, ndim, dim)
        weight.index_add_(dim, site.idx, update.to(weight.dtype))  # (r, n) rows into (m, n)

    # -- the compiled step ----------------------------------------------------------------
    def _use_compiled(self) -> bool:
        if self._compiled_flag is not None:
            return self._compiled_flag
        return any(m.grass_config.backend == "inductor" for m in self._models)

    def _apply(self, work) -> None:
        if not self._use_compiled() or not work:
            return super()._apply(work)
        betas = {tuple(g["betas"]) for g, _, _ in work}
        epss = {g["eps"] for g, _, _ in work}
        if len(betas) > 1 or len(epss) > 1:  # the fused step bakes betas/eps in
            return super()._apply(work)
        (beta1, beta2), eps = betas.pop(), epss.pop()
        dense, proj = _FusedLists(), _FusedLists()
        for group, p, site in work:
            decay = 1 - group["lr"] * group["weight_decay"]
            if site is None or site.full:
                target = p if site is None else self._weight(site)
                state = self._moments(p, p)
                state["step"] += 1
                t = state["step"]
                scale = 1.0 if site is None else site.model.grass_config.scale
                dense.add(target, p.grad, state["exp_avg"], state["exp_avg_sq"],
                          step=-group["lr"] * scale / (1 - beta1**t), bc2=math.sqrt(1 - beta2**t), decay=decay)
            else:
                state = self._row_moments(p, site)
                proj.add(self._weight(site), p.grad, state["exp_avg"], state["exp_avg_sq"],
                         step=-group["lr"] * site.model.grass_config.scale, bc2=0.0, decay=decay, site=site,
                         row_step=state["row_step"], row_weight=row_weights(site, self.rho_scaling))
        if self._fused is None:
            self._fused = torch.compile(_fused_adamw, dynamic=False, fullgraph=True)
        # without weight decay the decay code is left out of the compiled step (fewer
        # kernels to compile and two fewer passes over each selected row); a bool guard
        # means at most one more compile if some group turns decay on later
        decays = any(group["weight_decay"] != 0 for group, _, _ in work)
        self._fused(dense.as_args(), proj.as_args(), beta1, beta2, eps, decays, self.rewarmup)
        if proj.pendings and decays:
            # 0-d buffers stay outside the compiled region: torch 2.13's Inductor drops
            # in-place updates of 0-d CPU float64 inputs there.
            torch._foreach_mul_(proj.pendings, proj.decays)


def row_factors(row_step: torch.Tensor, alpha, beta1: float, beta2: float, rewarmup: int, weight=None):
    """Per-row step factors of projected AdamW from each row's own step count ``row_step`` (r,).

    Returns ``(factor, bc2)`` (float32, (r,)): the update of row j is
    ``factor_j * m_j / (sqrt(v_j) / bc2_j + eps)`` with
    ``factor_j = alpha * w_j * min(1, t_j / rewarmup) / (1 - beta1^t_j)`` and
    ``bc2_j = sqrt(1 - beta2^t_j)``: every row is bias-corrected by its own age, so a row
    that joined at the last refresh is treated as the fresh Adam state it is, and with
    ``rewarmup > 0`` its step ramps up linearly over its first ``rewarmup`` steps.
    ``alpha`` may be a float or a 0-d tensor (the compiled step passes tensors).
    """
    t = row_step.to(torch.float64)
    factor = alpha / (1 - torch.pow(beta1, t))
    if rewarmup:
        factor = factor * (t / rewarmup).clamp(max=1.0)
    if weight is not None:
        factor = factor * weight.to(torch.float64)
    return factor.float(), torch.sqrt(1 - torch.pow(beta2, t)).float()


class _FusedLists:
    """Flat lists for :func:`_fused_adamw` (one entry per parameter)."""

    def __init__(self):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = [], [], [], []
        self.steps, self.bc2s, self.decays = [], [], []
        self.dims, self.idxs, self.row_steps, self.row_weights, self.pendings = [], [], [], [], []

    def add(self, param, grad, exp_avg, exp_avg_sq, *, step, bc2, decay, site=None, row_step=None, row_weight=None):
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(exp_avg)
        self.exp_avg_sqs.append(exp_avg_sq)
        self.steps.append(step)
        self.bc2s.append(bc2)
        self.decays.append(decay)
        if site is not None:
            self.dims.append(site.dim)
            self.idxs.append(site.idx)
            self.row_steps.append(row_step)
            self.row_weights.append(row_weight)
            self.pendings.append(site.decay_pending)

    def as_args(self):
        """Per-step numbers travel as tensors, so changing values never recompiles."""
        device = self.params[0].device if self.params else None
        nums = torch.tensor([self.steps, self.bc2s, self.decays], dtype=torch.float64, device=device) if self.params else None
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, nums,
                tuple(self.dims), self.idxs, self.row_steps, self.row_weights, self.pendings)


def _fused_adamw(dense, proj, beta1: float, beta2: float, eps: float, decays: bool = True, rewarmup: int = 0) -> None:
    """One AdamW step over flat lists; compiled once per parameter set.

    ``dense``: parameters updated in full (including fully selected weights).
    ``proj``: projected weights; grads and moments are (r, n) (or (m, r)), each row is
    bias-corrected by its own step count (:func:`row_factors`), the update goes to the
    selected rows, and decoupled decay hits the selected rows (the caller multiplies the
    others' debt into ``decay_pending``, settled at the next refresh).
    ``decays=False`` (every decay factor is 1) leaves the decay code out.
    """
    params, grads, exp_avgs, exp_avg_sqs, nums, _, _, _, _, _ = dense
    for i in range(len(params)):
        step, bc2, decay = nums[0, i].float(), nums[1, i].float(), nums[2, i].float()
        if decays:
            params[i].mul_(decay)
        exp_avgs[i].lerp_(grads[i], 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grads[i], grads[i], value=1 - beta2)
        denom = (exp_avg_sqs[i].sqrt() / bc2).add_(eps)
        params[i].add_(exp_avgs[i] / denom * step)
    weights, grads, exp_avgs, exp_avg_sqs, nums, dims, idxs, row_steps, row_weights_, pendings = proj
    for i in range(len(weights)):
        w, dim, idx = weights[i], dims[i], idxs[i]
        if decays:
            # decay each selected row once, even when it was drawn several times
            decay = nums[2, i].float()
            counts = torch.zeros(w.shape[dim], device=w.device).index_add_(0, idx, torch.ones_like(row_steps[i]))
            share = ((decay - 1) / counts[idx]).unsqueeze(1 - dim)
            w.index_add_(dim, idx, w.index_select(dim, idx) * share.to(w.dtype))
        row_steps[i].add_(1)
        factor, bc2 = row_factors(row_steps[i], nums[0, i], beta1, beta2, rewarmup, row_weights_[i])
        exp_avgs[i].lerp_(grads[i], 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grads[i], grads[i], value=1 - beta2)
        denom = (exp_avg_sqs[i].sqrt() / bc2.unsqueeze(1 - dim)).add_(eps)
        w.index_add_(dim, idx, (exp_avgs[i] / denom * factor.unsqueeze(1 - dim)).to(w.dtype))  # (r, n) rows into (m, n)


class SGD(GrassOptimizer):
    """SGD with momentum (optionally Nesterov) and (r x n) momentum buffers.

    Args match ``torch.optim.SGD``: ``lr``, ``momentum``, ``dampening``,
    ``weight_decay`` (L2 on the gradient), ``nesterov``.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(16, 16), rank=4, backend="eager")
        >>> opt = grassfx.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *, nonfinite="raise"):
        _check_number("lr", lr, low=0.0)
        _check_number("momentum", momentum, low=0.0)
        _check_number("dampening", dampening)
        _check_number("weight_decay", weight_decay, low=0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), nonfinite=nonfinite)
        super().__init__(params, defaults)

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
        weight = self._weight(site)
        grad = handle.grad
        if group["weight_decay"]:
            rows = weight.index_select(site.dim, site.idx)
            rows = rows * _bcast(site.rho, rows.dim(), site.dim).to(rows.dtype)
            grad = grad.add(rows, alpha=group["weight_decay"])
        scale = site.model.grass_config.scale
        self._apply_projected(site, weight, self._direction(handle, grad, group), -group["lr"] * scale)


class Adafactor(GrassOptimizer):
    """Adafactor (Shazeer & Stern, 2018) with factored (r,) + (n,) second moments.

    Follows ``torch.optim.Adafactor``'s formulation (``lr``, ``beta2_decay``,
    ``eps=(eps1, eps2)``, ``d``, decoupled ``weight_decay``), so with every row selected
    it matches it. For a projected weight the parameter-scale term ``RMS(W)`` is taken
    over the selected rows.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(16, 16), rank=4, backend="eager")
        >>> opt = grassfx.optim.Adafactor(model.parameters(), lr=1e-2)
    """

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *, nonfinite="raise",
                 rho_scaling="once"):
        _check_number("lr", lr, low=0.0)
        if rho_scaling not in _RHO_SCALINGS:
            raise ConfigError(f"rho_scaling={rho_scaling!r}: allowed values: {', '.join(_RHO_SCALINGS)}")
        self.rho_scaling = rho_scaling
        _check_number("beta2_decay", beta2_decay, high=0.0 + 1e-300)
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ConfigError(f"eps={eps!r}: expected a pair (eps1 or None, eps2)")
        if eps[0] is not None:
            _check_number("eps[0]", eps[0], low=0.0)
        _check_number("eps[1]", eps[1], low=0.0)
        _check_number("d", d, low=0.0, low_open=True)
        _check_number("weight_decay", weight_decay, low=0.0)
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay,
                        nonfinite=nonfinite)
        super().__init__(params, defaults)

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
        weight = self._weight(site)
        state = self._state(handle, handle.grad)
        rows = weight if site.full else weight.index_select(site.dim, site.idx)
        alpha = self._step_size(group, state, self._rms(rows))
        self._decay_selected(site, weight, 1 - group["lr"] * group["weight_decay"])
        update, inv_clip = self._direction(state, handle.grad, group)
        scale = site.model.grass_config.scale
        self._apply_projected(site, weight, update, -alpha * inv_clip * scale, self.rho_scaling)
