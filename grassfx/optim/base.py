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

import torch

from grassfx import _compat, fsdp
from grassfx.core import decay
from grassfx.core.rows import broadcast_along
from grassfx.errors import ConfigError, NonFiniteGradientError
from grassfx.instrument import guard, registry

from .checks import (
    RHO_SCALINGS,
    check_adam_settings,
    check_nonfinite,
    check_number,
    check_rho_scaling,
    check_saved_ranks,
    finite_flags,
)
from .inbackward import BackwardUpdates
from .rounding import index_add_along
from .rows import matrix, overlap_sources, row_weights
from .sharded import ShardedRows

__all__ = ["GrassOptimizer", "check_adam_settings", "check_number", "check_rho_scaling", "row_weights", "overlap_sources",
           "finite_flags", "check_saved_ranks", "RHO_SCALINGS"]


class GrassOptimizer(torch.optim.Optimizer):
    """Base class: parameter classification, refresh handling, checks, stepping."""

    #: read by grassfx.instrument.guard: this optimizer writes handles' gradients into the weights
    grassfx_aware = True

    def __init__(self, params, defaults, update_in_backward: bool = False):
        check_nonfinite(defaults.get("nonfinite", "raise"))
        if update_in_backward not in (True, False):
            raise ConfigError(f"update_in_backward={update_in_backward!r}: expected True or False")
        super().__init__(params, defaults)
        self.skipped_steps = 0
        self._schedules = []
        self._in_backward = None
        self._shards = None  # the sharding layer (grassfx.optim.sharded) when weights are FSDP2-sharded
        self._classify()
        if update_in_backward and self._sharded:
            raise ConfigError("update_in_backward=True with FSDP2-sharded parameters is not supported: "
                              "FSDP2 reduce-scatters gradients after the backward; pass update_in_backward=False")
        if update_in_backward:
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
            refusal = self._sharding_refusal()
            if refusal is not None:
                raise ConfigError(refusal.format(site=sharded[0].name))
            if self._shards is None:
                self._shards = ShardedRows()
        guard.check_optimizer(self, error=ConfigError)  # a projected weight without its handle

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if hasattr(self, "_schedules"):
            self._classify()
        if getattr(self, "_in_backward", None) is not None:
            self._in_backward.install()

    def _sharding_refusal(self):
        """Why this optimizer cannot step FSDP2-sharded projected weights (a message with
        ``{site}``), or None when it can (:mod:`grassfx.optim.sharded`)."""
        return (f"grassfx.optim.{type(self).__name__} with FSDP2-sharded weights ({{site!r}}, ...) is not "
                "supported: use grassfx.optim.AdamW (its state is sharded like the weights; docs/distributed.md)")

    @property
    def schedules(self) -> tuple:
        """The refresh schedules of the models this optimizer trains."""
        return tuple(self._schedules)

    def trains_through_handle(self, p) -> bool:
        """Whether ``p`` is a projected weight (its handle carries its gradient)."""
        return id(p) in self._target_ids

    def update_now(self, group, p, site) -> bool:
        """Update one parameter at once (``site``: :func:`.rows.matrix` of its site); returns
        whether a committed refresh was handled first (:mod:`.inbackward`)."""
        refreshed = site is not None and site.refreshed
        if refreshed:
            self._on_refresh(p, site)
        self._apply([(group, p, site)])
        return refreshed

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
                self._create_state(p, matrix(registry.site_of(p)), group)
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
            site = matrix(registry.site_of(p))  # an expert stack: seen as (E*m, n), flat rows
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
                self._shards.remap(state, site)
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
        shape = site.flat(handle).shape
        for value in state.values():
            value = site.flat(value) if torch.is_tensor(value) else value  # views: copy_ writes through
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
