"""Per-row factors of a projected update, shared by the optimizers and the sharded layer."""

from __future__ import annotations

import torch

from grassfx import select as _select

__all__ = ["row_weights", "overlap_sources", "matrix"]


def matrix(site):
    """What an optimizer updates for ``site`` (:meth:`grassfx.instrument.Site.matrix`); None
    for a parameter that is not projected."""
    return None if site is None else site.matrix()


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
