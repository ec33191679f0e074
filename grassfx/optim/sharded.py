"""Optimizer steps for projected weights sharded by FSDP2 (see :mod:`grassfx.fsdp`).

The handle's gradient ``C`` arrives averaged and whole on every rank. Each rank keeps the
state of its chunk of the handle's first dimension (``torch.chunk``'s rule, a ``Shard(0)``
DTensor on FSDP2's mesh) and does the same arithmetic as :func:`grassfx.optim.adamw.adamw_step`
on it:

* columns selected (handle (m x r)): the chunk is this rank's rows of the weight; the
  update goes straight into its shard;
* rows selected (handle (r x n)): the chunk is a slice of the r selection slots; the
  (r x n) update is all-gathered and each rank writes the selected rows that fall in its
  shard (decoupled decay included, once per row);
* every row kept (``rank >= rows``): a dense AdamW step on the local shard.

The optimizer's base makes one :class:`ShardedRows` when it trains sharded projected weights
and calls it for their state, their step and the remap at a refresh; which optimizers may
(AdamW, not Muon) and with which settings is each optimizer's answer
(``GrassOptimizer._sharding_refusal``).

At a refresh, kept rows' moments (``moments="keep_overlap"``) may move to a slot owned by
another rank, so the slot-sharded state is gathered for the remap, one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grassfx import _compat, fsdp
from grassfx import select as _select
from grassfx.core.decay import owe
from grassfx.core.rows import broadcast_along
from grassfx.errors import ConfigError

from .kernel import moments, row_factors
from .rounding import add_to_rows, first_copies
from .rows import overlap_sources, row_weights

__all__ = ["ShardedRows", "Layout", "layout_of"]


@dataclass(frozen=True)
class Layout:
    """Where one projected weight's pieces live on this rank."""

    group: object  # FSDP2's process group
    rows: fsdp.Chunk  # this rank's rows of the weight (FSDP2's shard)
    slots: fsdp.Chunk  # this rank's chunk of the handle's first dim (its optimizer state)


def layout_of(site) -> Layout:
    """The :class:`Layout` of ``site`` on this rank (its weight is a ``Shard(0)`` DTensor)."""
    weight = fsdp.sharded_weight(site)
    mesh = weight.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = fsdp.chunk_of(weight.shape[0], world, rank)
    if fsdp.local(weight).shape[0] != rows.length:  # FSDP2 changed how it splits rows
        raise ConfigError(f"{site.name!r}: FSDP2's shard has {fsdp.local(weight).shape[0]} rows, "
                          f"grassfx expected {rows.length} (torch.chunk's rule)")
    return Layout(mesh.get_group(), rows, fsdp.chunk_of(site.handle.shape[0], world, rank))


class ShardedRows:
    """The sharding layer of one optimizer: the state, step and refresh remap of its
    FSDP2-sharded projected weights, and the rows each selection puts on this rank."""

    def __init__(self):
        self._my_rows = {}  # (id(site), version of its idx) -> (slots, rows) on this rank

    @staticmethod
    def state(state: dict, handle, site, dtype=None) -> dict:
        """AdamW state of a sharded projected weight (``state``: the optimizer's dict for
        ``handle``, filled when empty): this rank's chunk, as DTensors of the handle's shape,
        in ``dtype`` (None: the handle's)."""
        if state:
            return state
        lay = layout_of(site)
        weight, dtype = fsdp.sharded_weight(site), dtype or handle.dtype
        shape = (lay.slots.length, *handle.shape[1:])
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = fsdp.shard_like(torch.zeros(shape, dtype=dtype, device=handle.device), weight, handle.shape)
        if site.full:
            state["step"] = 0
        elif site.dim == 0:  # one step count per slot, sharded with the slots
            state["row_step"] = fsdp.shard_like(torch.zeros(lay.slots.length, dtype=torch.float32,
                                                            device=handle.device), weight, (site.rank,))
        else:  # per selected column: every rank advances all r of them alike
            state["row_step"] = torch.zeros(site.rank, dtype=torch.float32, device=handle.device)
        return state

    def adamw_step(self, state: dict, group, handle, site, beta1: float, beta2: float, eps: float, *,
                   mode: str, rho_scaling: str, rewarmup: int, dtype=None) -> None:
        """One AdamW step of a sharded projected weight (the arithmetic of ``adamw_step``);
        ``mode``: the weight's update rounding."""
        lay = layout_of(site)
        state = self.state(state, handle, site, dtype)
        exp_avg, exp_avg_sq = fsdp.local(state["exp_avg"]), fsdp.local(state["exp_avg_sq"])
        grad = handle.grad[lay.slots.start:lay.slots.stop]
        weight = fsdp.local(fsdp.sharded_weight(site))
        lr, scale = group["lr"], site.scale
        decay = 1 - lr * group["weight_decay"]
        if site.full:  # every row kept: dense AdamW on this rank's rows
            state["step"] += 1
            t = state["step"]
            denom = moments(exp_avg, exp_avg_sq, grad, beta1, beta2, math.sqrt(1 - beta2**t), eps)
            update = exp_avg * (-lr * scale / (1 - beta1**t)) / denom
            rows = torch.arange(weight.shape[0], device=weight.device)
            add_to_rows(weight, 0, rows, update, mode, None, None, decay if decay != 1.0 else None)
            return
        dim = site.dim
        row_step = fsdp.local(state["row_step"])
        row_step.add_(1)
        w = row_weights(site, rho_scaling)
        if w is not None and dim == 0:
            w = w[lay.slots.start:lay.slots.stop]
        factor, bc2 = row_factors(row_step, -lr * scale, beta1, beta2, rewarmup, w)
        denom = moments(exp_avg, exp_avg_sq, grad, beta1, beta2, bc2.unsqueeze(1 - dim), eps)
        update = exp_avg / denom * factor.unsqueeze(1 - dim)
        drawn_twice = mode != "nearest" and site.method in _select.WITH_REPLACEMENT
        if dim == 1:  # this rank's rows of the (m x r) update, into its rows of the weight
            firsts = first_copies(site.idx, site.rows) if drawn_twice else None
            add_to_rows(weight, 1, site.idx, update, mode, None, firsts, decay if decay != 1.0 else None)
        else:  # every slot's update, then the selected rows this rank stores
            whole = fsdp.all_gather_rows(update.contiguous(), lay.slots, lay.group)
            slots, rows = self._rows_here(site, lay)
            part = whole.index_select(0, slots)
            firsts = first_copies(rows, weight.shape[0]) if drawn_twice else None
            add_to_rows(weight, 0, rows, part, mode, None, firsts, decay if decay != 1.0 else None)
        if decay != 1.0:
            owe(site, decay)

    def _rows_here(self, site, lay: Layout):
        """``(slots, rows)``: the selection slots whose rows this rank stores, and those rows in
        its shard. Found once per selection (a boolean mask syncs a GPU with its host), cached
        by the selection's version."""
        cache = self._my_rows
        key = (id(site), _compat.version(site.idx))
        if key not in cache:
            mine = (site.idx >= lay.rows.start) & (site.idx < lay.rows.stop)
            slots = mine.nonzero().flatten()
            for stale in [k for k in cache if k[0] == id(site)]:
                del cache[stale]
            cache[key] = slots, site.idx.index_select(0, slots) - lay.rows.start
        return cache[key]

    @staticmethod
    @torch.no_grad()
    def remap(state: dict, site) -> None:
        """``moments="keep_overlap"`` at a refresh: keep the state of rows selected before and
        after (wherever their slot now lives), zero the rest; in place."""
        lay = layout_of(site)
        src = overlap_sources(site)
        keep, take = src >= 0, src.clamp_min(0)
        for value in state.values():
            if not torch.is_tensor(value):
                continue
            part = fsdp.local(value)
            if site.dim == 0:  # slots sharded: gather them, move, keep this rank's chunk
                whole = fsdp.all_gather_rows(part.contiguous(), lay.slots, lay.group)
                moved = whole.index_select(0, take)
                moved = torch.where(broadcast_along(keep, moved.dim(), 0), moved, torch.zeros_like(moved))
                part.copy_(moved[lay.slots.start:lay.slots.stop])
            else:  # columns: every rank holds all r of its rows' columns
                axis = part.dim() - 1
                moved = part.index_select(axis, take)
                part.copy_(torch.where(broadcast_along(keep, moved.dim(), axis), moved, torch.zeros_like(moved)))
