"""``GrassOptimizer``: what every subspace-aware optimizer shares.

For a projected weight ``W`` (m x n, rows selected; columns are symmetric) the optimizer
sees the handle's gradient ``C = rho * G[idx]`` (r x n) and keeps its state at (r x n).
The update lands on the selected rows only::

    W.index_add_(0, idx, -lr * scale * w[:, None] * step(C))    # (r, n) into (m, n)

``index_add`` (not ``index_copy``): a selector with replacement may pick a row twice.
The per-entry factor ``w`` comes from :func:`row_weights`: ``rho`` again (the paper's
``P step(Pᵀ G)``, ``rho_scaling="twice"``, what SGD uses), or, for adaptive optimizers
(``rho_scaling="once"``, their default), 1 split evenly between the copies of a row
drawn more than once: Adam and Adafactor divide the gradient's scale out, so ``rho`` in
the compressed gradient alone changes nothing, and every selector runs at the same
learning rate.
Every other parameter (biases, norms, embeddings, unprojected weights) gets the ordinary
update of the same algorithm.

The base class finds the site of each handle in :mod:`grassfx.instrument.registry`
(the model publishes them; the optimizer never holds the model), checks that every
gradient is finite before touching anything, handles committed refreshes (moments reset
or remapped, owed decay settled: :meth:`GrassOptimizer._on_refresh`), applies the
updates (:meth:`GrassOptimizer._apply`) and advances each model's step counter.

**Parameter groups** follow the weight: a projected weight's handle is moved into the
group that holds the weight (groups built from module names, e.g. lr=0 to freeze a layer,
layer-wise lr decay, no-decay lists, apply to the weight they name). A group that ends up
empty keeps its settings and updates nothing.

**Non-finite gradients** are never written into weights: by default ``step()`` raises
:class:`grassfx.NonFiniteGradientError` naming the parameter before touching anything;
``nonfinite="skip"`` skips the step instead (and counts it in ``skipped_steps``).
"""

from __future__ import annotations

import itertools
import math

import torch

from grassfx import _compat, fsdp
from grassfx import select as _select
from grassfx.errors import ConfigError, NonFiniteGradientError
from grassfx.instrument import guard, registry
from grassfx.instrument.anchors import broadcast_along
from grassfx.instrument.experts import flat, matrix_of

from . import decay
from .rounding import index_add_along

__all__ = ["GrassOptimizer", "check_adam_settings", "check_number", "check_rho_scaling", "row_weights", "overlap_sources", "RHO_SCALINGS"]

_NONFINITE = ("raise", "skip")
RHO_SCALINGS = ("once", "twice")


def check_number(name, value, low=None, high=None, low_open=False):
    """Raise :class:`grassfx.ConfigError` unless ``value`` is a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}={value!r}: must be {'>' if low_open else '>='} {low}")
    if high is not None and value >= high:
        raise ConfigError(f"{name}={value!r}: must be < {high}")


def check_adam_settings(lr, betas, eps, weight_decay, rewarmup) -> int:
    """Check the settings AdamW-style optimizers share (ConfigError naming the bad one);
    returns ``rewarmup``."""
    check_number("lr", lr, low=0.0)
    if isinstance(rewarmup, bool) or not isinstance(rewarmup, int) or rewarmup < 0:
        raise ConfigError(f"rewarmup={rewarmup!r}: expected an int >= 0 (steps; 0 turns it off)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ConfigError(f"betas={betas!r}: expected a pair (beta1, beta2)")
    check_number("betas[0]", betas[0], low=0.0, high=1.0)
    check_number("betas[1]", betas[1], low=0.0, high=1.0)
    check_number("eps", eps, low=0.0)
    check_number("weight_decay", weight_decay, low=0.0)
    return rewarmup


def check_rho_scaling(rho_scaling) -> str:
    """Raise :class:`grassfx.ConfigError` unless ``rho_scaling`` is one of :data:`RHO_SCALINGS`."""
    if rho_scaling not in RHO_SCALINGS:
        raise ConfigError(f"rho_scaling={rho_scaling!r}: allowed values: {', '.join(RHO_SCALINGS)}")
    return rho_scaling


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
        return None if site.method in _select.UNIT_RHO else site.rho
    if site.method not in _select.WITH_REPLACEMENT:
        return None
    counts = torch.zeros(site.rows, dtype=torch.float32, device=site.idx.device)
    counts.index_add_(0, site.idx, torch.ones(site.rank, dtype=torch.float32, device=site.idx.device))
    return counts[site.idx].reciprocal()


def overlap_sources(site) -> torch.Tensor:
    """For each slot of the new selection, the slot the same row had before the refresh
    (``site.prev_idx``), or -1 for a row that was not selected (int64, (r,))."""
    src = torch.full((site.rows,), -1, dtype=torch.long, device=site.idx.device)
    src[site.prev_idx] = torch.arange(site.rank, device=site.idx.device)
    return src[site.idx]


def finite_flags(tensors: list) -> list[bool]:
    """Whether each tensor holds only finite numbers, with one reduction per tensor and one sync.

    ``isfinite().all()`` reads a tensor several times and allocates a bool copy of it; a
    float32 (float64) sum is finite when every entry is and NaN/Inf otherwise, unless finite
    entries overflow it, so a non-finite sum is confirmed entry by entry. bf16 and fp16
    tensors are checked by their smallest and largest entries (``aminmax``, in their own
    dtype: no overflow, no float32 copy, NaN propagates; ``vector_norm(t, inf)``, which also
    reads a tensor once, ran 11x slower on CPU: 24.6 vs 2.2 ms for a bf16 8192 x 2048
    gradient, ``benchmarks/finite_check.py``). Empty tensors are finite.
    """
    if not tensors:
        return []
    owners, by_dtype = [], {}  # per summary value: (dtype, place in its group, tensor); one stack per dtype
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        if t.dtype in (torch.bfloat16, torch.float16):
            # in their own dtype: sum(dtype=float32) would first copy the tensor to float32
            # (250 MiB for a 32000 x 2048 gradient)
            values = torch.aminmax(t)
        else:
            values = (t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32),)
        for v in values:
            group = by_dtype.setdefault(v.dtype, [])
            owners.append((v.dtype, len(group), i))
            group.append(v)
    ok = [True] * len(tensors)
    if by_dtype:
        device = next(iter(by_dtype.values()))[0].device
        finite = {dtype: torch.isfinite(torch.stack([v.to(device) for v in values]))
                  for dtype, values in by_dtype.items()}
        flags = torch.cat(list(finite.values())).tolist()  # the one sync
        offsets = dict(zip(finite, itertools.accumulate([0] + [len(v) for v in by_dtype.values()])))
        for dtype, position, i in owners:
            ok[i] = ok[i] and flags[offsets[dtype] + position]
        for i, t in enumerate(tensors):  # a non-finite float32/float64 sum may be an overflow
            if not ok[i] and t.dtype not in (torch.bfloat16, torch.float16):
                ok[i] = bool(torch.isfinite(t).all())
    return ok


def check_saved_ranks(state_dict, param_groups) -> None:
    """Refuse a checkpoint whose state of a projected weight was made at another rank (or
    another selected dim): it would load, and fail at the next step with a shape mismatch.

    Every state tensor of a handle with the handle's number of dims must match it along each
    dim (or be 1 there: Adafactor's factored variances); a 1-D one (``row_step``) has one
    entry per selected row.
    """
    saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    mine = itertools.chain.from_iterable(g["params"] for g in param_groups)
    for key, handle in zip(saved, mine):
        site = registry.site_of(handle)
        if site is None or site.sharded:
            continue
        rows = matrix_of(site).rank if not site.full else None
        axis = handle.dim() - 2 + site.dim  # the selected dim of the handle
        for name, value in state_dict["state"].get(key, {}).items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if value.dim() == handle.dim():
                ok = all(a in (b, 1) for a, b in zip(value.shape, handle.shape))
                saved_rank = value.shape[axis]
            else:
                ok = value.dim() == 1 and value.numel() == rows
                experts = handle.shape[0] if handle.dim() == 3 else 1  # an expert stack's (E, r, n)
                saved_rank = value.numel() // experts if value.dim() == 1 else "?"
            if not ok:
                raise ConfigError(
                    f"the optimizer state of {site.name!r} was saved at rank {saved_rank} (state {name!r} of shape "
                    f"{tuple(value.shape)}); this optimizer's model selects {site.rank} of {site.rows} "
                    f"{'rows' if site.dim == 0 else 'columns'} (gradient handle {tuple(handle.shape)}). Compile the "
                    f"model with the checkpoint's rank (and proj_dim) to resume, or start from a fresh optimizer"
                )


class GrassOptimizer(torch.optim.Optimizer):
    """Base class: parameter classification, refresh handling, checks, stepping."""

    #: read by grassfx.instrument.guard: this optimizer writes handles' gradients into the weights
    grassfx_aware = True

    def __init__(self, params, defaults, update_in_backward: bool = False):
        nonfinite = defaults.get("nonfinite", "raise")
        if nonfinite not in _NONFINITE:
            raise ConfigError(f"nonfinite={nonfinite!r}: allowed values: raise, skip")
        if update_in_backward not in (True, False):
            raise ConfigError(f"update_in_backward={update_in_backward!r}: expected True or False")
        super().__init__(params, defaults)
        self.skipped_steps = 0
        self._schedules = []
        self._in_backward = None
        self._classify()
        if update_in_backward and self._sharded:
            raise ConfigError("update_in_backward=True with FSDP2-sharded parameters is not supported: "
                              "FSDP2 reduce-scatters gradients after the backward; pass update_in_backward=False")
        if update_in_backward:
            from .inbackward import BackwardUpdates

            self._in_backward = BackwardUpdates(self)

    # -- setup --------------------------------------------------------------------------
    def _group_handles_with_weights(self) -> None:
        """Move each handle into the group of its weight: group settings follow the weight's name.

        ``model.parameters()`` lists a projected weight (``module.0.weight``) and, separately,
        its gradient handle (``sites.N.handle``). Groups built from names (layer-wise lr,
        lr=0 to freeze, no-decay lists) name the weight; its update goes through the handle,
        so the handle must carry the weight's hyperparameters.
        """
        group_of = {}
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                group_of[id(p)] = i
        for i, group in enumerate(self.param_groups):
            for p in list(group["params"]):
                site = registry.target_of(p)
                if site is None or group_of.get(id(site.handle), i) == i:
                    continue
                old = self.param_groups[group_of[id(site.handle)]]["params"]
                old[:] = [q for q in old if q is not site.handle]
                group["params"].append(site.handle)
                group_of[id(site.handle)] = i

    def _classify(self) -> None:
        self._group_handles_with_weights()
        schedules = {}
        for group in self.param_groups:
            for p in group["params"]:
                site = registry.site_of(p)
                if site is not None and site.schedule is not None:
                    schedules[id(site.schedule)] = site.schedule
        self._schedules = list(schedules.values())
        self._target_ids = {id(site.weight) for schedule in self._schedules for site in schedule.sites}
        sites = [site for schedule in self._schedules for site in schedule.sites]
        fsdp.check_not_sharded_after(sites)
        sharded = [site for site in sites if site.sharded]
        self._sharded = bool(sharded) or any(fsdp.is_dtensor(p) for g in self.param_groups for p in g["params"])
        if sharded:
            from .sharded import check_supported

            check_supported(self, sharded)
        guard.check_optimizer(self, error=ConfigError)  # a projected weight without its handle

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if hasattr(self, "_schedules"):
            self._classify()
        if getattr(self, "_in_backward", None) is not None:
            self._in_backward.install()

    @property
    def update_in_backward(self) -> bool:
        """Whether each parameter is updated inside backward (:mod:`grassfx.optim.inbackward`)."""
        return self._in_backward is not None

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer``'s, but every state tensor keeps the dtype it was saved
        in: the base class casts every floating state tensor but ``step`` to its parameter's
        dtype, which would turn float32 moments of a bf16 weight (``state_dtype``) into bf16
        and stop a bfloat16 per-row step count at 256. State saved at another rank is refused
        (:func:`check_saved_ranks`)."""
        check_saved_ranks(state_dict, self.param_groups)
        saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        mine = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        tensors = {p: {key: value.clone() for key, value in state_dict["state"].get(k, {}).items()
                       if torch.is_tensor(value)} for k, p in zip(saved, mine)}
        super().load_state_dict(state_dict)
        for p, values in tensors.items():
            for key, value in values.items():
                if key == "row_step":
                    value = value.to(torch.float32)  # checkpoints from before it was kept float32
                self.state[p][key] = value.to(p.device)
        if self._in_backward is not None:  # the loaded groups are new dicts: the hooks must read them
            self._in_backward.install()

    # -- the step -----------------------------------------------------------------------
    def _grads(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in getattr(self, "_target_ids", ()):
                    yield group, p

    def _all_finite(self) -> bool:
        grads = [fsdp.local(p.grad) for _, p in self._grads()]
        flags = finite_flags(grads)
        if self._sharded and grads:  # FSDP2: each rank sees its shard of the gradients; all must agree
            import torch.distributed as dist

            # on the gradients' device: NCCL reduces CUDA tensors only
            agreed = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=grads[0].device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            flags = [bool(f) for f in agreed.tolist()]
        if all(flags):
            return True
        if self.defaults.get("nonfinite", "raise") == "skip":
            return False
        for (_, p), flag in zip(self._grads(), flags):
            if not flag:
                name = registry.name_of(p) or f"parameter of shape {tuple(p.shape)}"
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
        if _compat.initializing_checkpoint_state():
            # torch.distributed.checkpoint makes an empty optimizer's state by a step with zero
            # gradients and lr 0: create the state, change nothing else (not the model's step
            # counter, not a pending refresh)
            for group, p in self._grads():
                self._create_state(p, matrix_of(registry.site_of(p)), group)
            return loss
        if self._in_backward is not None:
            self._in_backward.finish()  # the updates ran in backward; gradients set by hand still apply
        else:  # (in backward, each handle's gradient is consumed and freed as it arrives)
            for schedule in self._schedules:
                guard.check_gradients_delivered(schedule)
        if not self._all_finite():
            self.skipped_steps += 1
            return loss
        work, refreshed = [], False
        for group, p in self._grads():
            site = matrix_of(registry.site_of(p))  # an expert stack: seen as (E*m, n), flat rows
            if site is not None and site.refreshed:
                self._on_refresh(p, site)
                refreshed = True
            work.append((group, p, site))
        if refreshed:
            for schedule in self._schedules:
                schedule.refresh_seen()
        self._apply(work)
        for schedule in self._schedules:
            # several grassfx optimizers over one model (split parameters) make one step
            # together: the first to step after a forward advances the model's counter
            last = schedule.advanced_by
            if last is None or last[0] != schedule.generation or last[1] == id(self):
                schedule.advance()
                schedule.advanced_by = (schedule.generation, id(self))
        return loss

    def _apply(self, work) -> None:
        """Update every ``(group, param, site)``; subclasses may fuse and compile this."""
        for group, p, site in work:
            if site is None:
                self._update_dense(p, group)
            else:
                self._update_projected(p, site, group)

    # -- refresh ------------------------------------------------------------------------
    def _on_refresh(self, handle, site) -> None:
        """The model picked new rows: settle owed decay, then reset (or remap) the moments."""
        decay.settle(site, site.prev_idx)
        state = self.state[handle]
        if state:
            if site.moments == "keep_overlap" and site.prev_idx is not None and site.sharded:
                from .sharded import remap

                remap(state, site)
            elif site.moments == "keep_overlap" and site.prev_idx is not None:
                self._remap_moments(state, handle, site)
            else:
                self.state[handle] = {}
        site.refreshed = False

    @staticmethod
    def _remap_moments(state: dict, handle, site) -> None:
        """Keep the state of rows selected before and after the refresh; zero the rest."""
        src = overlap_sources(site)
        keep = broadcast_along(src >= 0, 2, site.dim)
        shape = flat(site, handle).shape
        for value in state.values():
            value = flat(site, value) if torch.is_tensor(value) else value  # views: copy_ writes through
            if torch.is_tensor(value) and value.shape == shape:
                moved = value.index_select(site.dim, src.clamp_min(0))
                value.copy_(torch.where(keep, moved, torch.zeros_like(moved)))
            elif torch.is_tensor(value) and value.dim() == 1 and value.shape[0] == site.rank:
                moved = value.index_select(0, src.clamp_min(0))
                value.copy_(torch.where(src >= 0, moved, torch.zeros_like(moved)))

    # -- helpers for eager updates --------------------------------------------------------
    @staticmethod
    def _apply_projected(site, update: torch.Tensor, alpha: float, rho_scaling: str = "twice") -> None:
        """``W[idx] += alpha * w * update`` along the selected dim, ``w`` from :func:`row_weights`."""
        weight = site.weight
        if site.full:
            weight.add_(update, alpha=alpha)
            return
        w = row_weights(site, rho_scaling)
        if w is not None:
            update = update * broadcast_along(w, update.dim(), site.dim).to(update.dtype)
        index_add_along(weight, site.dim, site.idx, update, alpha=alpha)

    def _create_state(self, p, site, group) -> None:
        """Create ``p``'s optimizer state (``group``: its parameter group) as its first step
        would (nothing, for optimizers whose state appears with the first gradient)."""

    def _update_dense(self, p, group):  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_projected(self, handle, site, group):  # pragma: no cover - abstract
        raise NotImplementedError
