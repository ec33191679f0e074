"""Decoupled weight decay of projected weights: the one home of its rules.

Selected rows decay every step (O(rn)); rows outside the selection owe the product of
the decay factors, kept as one float64 scalar per weight (``Site.decay_pending``) and
applied once at the next refresh (one O(mn) pass per ``update_freq`` steps) and by
``grassfx.unwrap``. Rows are therefore exact at every refresh and lag by at most
``update_freq`` steps between.

Three rules, one function each:

* :func:`decay_rows` — multiply the selected rows by the factor *once each*, even when a
  selector with replacement drew a row twice (used by the AdamW kernel, eager or compiled);
* :func:`decay_selected` — that, plus recording the debt of the other rows (eager optimizers);
* :func:`settle` — pay the debt of every row outside a given selection, and clear it.
"""

from __future__ import annotations

import torch

from grassfx import fsdp

from .rows import broadcast_along

__all__ = ["decay_rows", "decay_selected", "owe", "settle"]


def decay_rows(weight: torch.Tensor, idx: torch.Tensor, dim: int, factor) -> None:
    """``weight[idx] *= factor`` along ``dim``, each distinct row once (duplicates in ``idx`` ok).

    Every copy of a repeated row is written with the same value, read before any write.
    ``factor`` is a number or a 0-d tensor; this traces and compiles (no data-dependent shapes).
    """
    weight.index_copy_(dim, idx, weight.index_select(dim, idx) * factor)


def owe(site, factor) -> None:
    """Rows outside ``site.idx`` owe one more ``factor`` (settled by :func:`settle`)."""
    site.decay_pending.mul_(factor)


@torch.no_grad()
def decay_selected(site, factor: float) -> None:
    """Decoupled decay of one step: the selected rows now, the others owe ``factor``."""
    if factor == 1.0:
        return
    weight = site.weight
    if site.full:
        weight.mul_(factor)
        return
    decay_rows(weight, site.idx, site.dim, factor)
    owe(site, factor)


@torch.no_grad()
def settle(site, kept) -> None:
    """Apply the decay owed by every row outside ``kept`` (rows that decayed every step).

    Called with the rows selected before a refresh (by the optimizer, when it sees the
    refresh) and with the current rows (by ``grassfx.unwrap``). ``kept=None`` drops the debt.
    """
    factor = float(site.decay_pending)
    if factor != 1.0 and kept is not None:
        weight = fsdp.sharded_weight(site) if site.sharded else site.weight
        scale = torch.full((site.rows,), factor, dtype=weight.dtype, device=weight.device)
        scale[kept] = 1.0
        if site.sharded:  # FSDP2: this rank's rows of the weight
            rows = fsdp.chunk_of(weight.shape[0], weight.device_mesh.size(), weight.device_mesh.get_local_rank())
            weight = fsdp.local(weight)
            if site.dim == 0:
                scale = scale[rows.start:rows.stop]
        weight.mul_(broadcast_along(scale, weight.dim(), site.dim))
    site.decay_pending.fill_(1.0)
