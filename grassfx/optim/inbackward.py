"""Updates inside backward: each parameter is stepped as soon as its gradient exists.

``grassfx.optim.AdamW(..., update_in_backward=True)`` (SGD and Adafactor too) registers a
post-accumulate-grad hook on every parameter it trains. The hook checks the gradient,
applies the parameter's update (a projected weight's selected rows from its (r x n)
compressed gradient; an embedding, head or norm in full) with the same arithmetic as
``step()``, and frees the gradient, so the gradients of the whole model are never alive
at once. ``step()`` then only finishes the step (the model's step counter).

What it cannot do, and refuses:

* **Gradient accumulation.** Each micro-batch's backward would update the weights. A
  second backward before ``step()`` raises :class:`grassfx.GrassError` before changing
  anything more (the first backward's updates are applied).
* **Data parallelism.** Gradients must be averaged across ranks before any update, at
  the end of backward; updates inside backward would diverge between ranks. A process
  group of more than one rank (grassfx's own reducer or DDP) raises
  :class:`grassfx.ConfigError` (``compile(..., data_parallel=False)`` trains each rank
  alone and is allowed).
* **Gradient clipping** needs every gradient's norm before any update. There is nothing
  to clip after backward: ``.grad`` is None for every parameter, and
  ``clip_grad_norm_`` returns 0 and clips nothing. Use ``update_in_backward=False``.
* ``nonfinite="skip"`` (skipping a step needs every gradient first): a NaN/Inf gradient
  raises :class:`grassfx.NonFiniteGradientError` naming the parameter; parameters whose
  hooks ran earlier in that backward were already updated.

At a refresh step a projected weight's rows are committed by the model when its refresh
backward runs; a handle whose gradient arrives before that commit waits for it.
"""

from __future__ import annotations

import weakref

import torch

from grassfx.errors import ConfigError, GrassError, NonFiniteGradientError
from grassfx.instrument import registry

from .checks import finite_flags
from .rows import matrix

__all__ = ["BackwardUpdates"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_single_process(schedules) -> None:
    size = _world_size()
    if size > 1 and any(s.config.data_parallel is not False for s in schedules):
        raise ConfigError(
            "update_in_backward=True cannot train data-parallel: gradients are averaged across "
            f"ranks ({size} here) at the end of backward, and an update inside backward would use "
            "this rank's gradient alone, so the ranks' weights would diverge. Use "
            "update_in_backward=False (or compile(..., data_parallel=False) to train each rank alone)"
        )


class BackwardUpdates:
    """The hooks and bookkeeping of one optimizer's updates inside backward."""

    def __init__(self, opt):
        if opt.defaults.get("nonfinite", "raise") != "raise":
            raise ConfigError(
                "nonfinite='skip' needs every gradient before any update, and update_in_backward=True "
                "updates each parameter as its gradient arrives: use nonfinite='raise'"
            )
        self._opt = weakref.ref(opt)
        self.done = set()  # ids of parameters updated since the last step()
        self.waiting = {}  # (id(schedule), site index) -> handle whose rows are not committed yet
        self.refreshed = False
        self._hooks = []
        self._callbacks = set()  # ids of schedules that call _committed
        self.install()

    @property
    def opt(self):
        return self._opt()

    def install(self) -> None:
        """Hook every trainable parameter (again after ``add_param_group``)."""
        opt = self.opt
        _check_single_process(opt.schedules)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.group_of = {}
        for group in opt.param_groups:
            for p in group["params"]:
                if opt.trains_through_handle(p) or not p.requires_grad:
                    continue  # projected weights are frozen: their handles carry the gradient
                self.group_of[id(p)] = group
                self._hooks.append(p.register_post_accumulate_grad_hook(self._ready))
        me = weakref.ref(self)
        for schedule in opt.schedules:
            if id(schedule) not in self._callbacks:
                self._callbacks.add(id(schedule))
                schedule.on_commit.append(lambda s, i, me=me: me() is not None and me()._committed(s, i))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- inside backward ----------------------------------------------------------------------
    def _ready(self, p: torch.Tensor) -> None:
        if self.opt is None:  # the optimizer is gone: its hooks stop updating
            self.remove()
            return
        if p.grad is None:
            return
        if id(p) in self.done:
            raise GrassError(
                "a second backward() before optimizer.step(): with update_in_backward=True each "
                "backward updates the weights, so gradients cannot be accumulated over micro-batches "
                "(the previous backward's update is already applied). Call step() after every "
                "backward, or use update_in_backward=False to accumulate"
            )
        if not self.done:
            _check_single_process(self.opt.schedules)
        raw = registry.site_of(p)
        if raw is not None and raw.schedule is not None and raw.index in raw.schedule.pending:
            self.waiting[(id(raw.schedule), raw.index)] = p  # its refresh commits the rows first
            return
        self._update(p, matrix(raw))

    def _committed(self, schedule, index: int) -> None:
        p = self.waiting.pop((id(schedule), index), None)
        if p is not None:
            self._update(p, matrix(registry.site_of(p)))

    def _update(self, p: torch.Tensor, site) -> None:
        opt = self.opt
        self.done.add(id(p))
        if not finite_flags([p.grad])[0]:
            name = registry.name_of(p) or f"parameter of shape {tuple(p.shape)}"
            p.grad = None
            raise NonFiniteGradientError(
                f"the gradient of {name} holds NaN or Inf; it was not applied (update_in_backward: "
                "parameters whose gradients arrived earlier in this backward were already updated)"
            )
        with torch.no_grad():
            if opt.update_now(self.group_of[id(p)], p, site):
                self.refreshed = True
        p.grad = None

    # -- step() -----------------------------------------------------------------------------
    def finish(self) -> None:
        """End of the step: update handles whose refresh never committed, reset the bookkeeping."""
        for key in list(self.waiting):
            p = self.waiting.pop(key)
            if p.grad is not None:
                self._update(p, matrix(registry.site_of(p)))
        if self.refreshed:
            for schedule in self.opt.schedules:
                schedule.refresh_seen()
        self.refreshed = False
        self.done.clear()
