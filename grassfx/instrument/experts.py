"""Grass for MoE expert stacks: r rows of each expert's matrix.

An expert stack ``W`` (E, m, n) holds one (m, n) matrix per expert (found by
:mod:`.expert_targets`). Its site selects ``r`` of the ``m`` rows *of every expert*:

* ``idx`` (E, r) int64 -- row ``idx[e, j]`` of expert ``e``, sorted ascending per expert;
* ``rho`` (E, r) float32 -- the scales (1 for the supported selectors);
* ``handle`` (E, r, n) -- its ``.grad`` receives ``C[e] = rho[e, :, None] * G[e, idx[e]]``;
* ``last_seen`` (E, m) -- the step each row of each expert was last selected.

Rows are always rows of each expert matrix (dim 1 of ``W``); ``proj_dim`` applies to
2-D weights only. Selectors: ``top_r`` and ``multinorm_nr`` pick per expert from the
(E, m) row norms of the dense gradient (``topk`` over dim 1); the others, and
``explore``, raise :class:`grassfx.ConfigError` for expert stacks until supported.

The marker op ``grassfx::expertsel(grad, idx, rho, name)`` (:mod:`grassfx.core.ops`) plays ``rowsel``'s role: eagerly
it gathers the rows of each expert from the dense (E, m, n) gradient (the dense
fallback); the ``sparsify_wgrad`` pass pushes it into the expert GEMMs where the graph
allows. An optimizer sees an expert site through ``site.matrix()`` (a :class:`MatrixFace`): the same state as a
2-D site of ``E * m`` rows (the stack viewed as (E*m, n), ``idx`` offset by
``e * m``), so every 2-D rule (updates, decay, moments at a refresh) applies unchanged.
"""

from __future__ import annotations

import math

import torch

from grassfx import _compat
from grassfx import select as _select
from grassfx.config import GrassConfig
from grassfx.core.ops import expertsel
from grassfx.core.rows import select_experts, squared_norms
from grassfx.errors import ConfigError

from .blocks import LayoutChoice
from .site import Site
from .targets import TargetSpec

__all__ = ["ExpertSite", "EXPERT_SELECTORS", "expertsel", "select_experts", "select_expert_rows",
           "ExpertAnchor", "ExpertRefreshAnchor", "make_site", "make_expert_anchor", "MatrixFace"]

#: selectors that work on expert stacks (per-expert selection over dim 1 of the (E, m) norms)
EXPERT_SELECTORS = ("top_r", "multinorm_nr")


def select_expert_rows(sq_norms: torch.Tensor, noise: torch.Tensor, r: int, method: str):
    """Pick ``r`` rows of each expert from squared row norms ``sq_norms`` (E, m).

    ``top_r``: the r largest norms of each expert; ``multinorm_nr``: r distinct draws per
    expert with probability proportional to the norm (Gumbel-top-k on ``noise``, (E, m)).
    Returns ``(idx, rho)``: int64 (E, r) sorted ascending per expert, float32 ones (E, r).

    Example:
        >>> idx, rho = select_expert_rows(torch.tensor([[1.0, 9.0, 4.0], [5.0, 0.0, 2.0]]), torch.zeros(0), 2, "top_r")
        >>> idx.tolist()
        [[1, 2], [0, 2]]
    """
    if method == "top_r":
        scores = sq_norms.float()
    elif method == "multinorm_nr":
        norms = sq_norms.to(torch.float64).clamp_min(0).sqrt()
        # an expert whose rows are all zero (no token routed to it) draws uniformly
        norms = torch.where(norms.sum(dim=1, keepdim=True) > 0, norms, torch.ones_like(norms))
        keys = torch.where(norms > 0, torch.log(norms.clamp_min(1e-300)), torch.full_like(norms, -math.inf))
        scores = keys + noise.to(keys)
    else:
        raise ConfigError(f"selection={method!r} is not supported for expert stacks; use one of {EXPERT_SELECTORS}")
    idx = torch.topk(scores, r, dim=1, sorted=False).indices
    return idx.sort(dim=1).values, torch.ones(idx.shape, dtype=torch.float32, device=sq_norms.device)


class ExpertSite(Site):
    """Grass state of one expert stack (E, m, n): r rows of each expert (module docstring)."""

    per_expert = True

    def __init__(self, spec: TargetSpec, index: int, weight: torch.Tensor, config: GrassConfig):
        if weight.dim() != 3:
            raise ConfigError(f"{spec.name!r}: an expert stack is 3-D (experts, rows, cols), got {tuple(weight.shape)}")
        # rows are selected per expert; fused blocks inside an expert (gate|up) are not split
        super().__init__(spec, index, weight, config, LayoutChoice(None, "expert stack: r rows of each expert"))

    def _geometry(self, weight: torch.Tensor, config: GrassConfig):
        experts, rows, cols = (int(s) for s in weight.shape)
        self.experts = experts
        self.dim = 0  # rows of each expert matrix (dim 1 of the stack)
        self.rows = rows
        self.rank = config.rows_kept(rows)
        self.full = self.rank >= rows
        if not self.full and self.method not in EXPERT_SELECTORS:
            raise ConfigError(
                f"selection={self.method!r} is not supported for the expert stack {self.name!r} yet: use "
                f"one of {EXPERT_SELECTORS}, or exclude=[{self.name!r}] to train it densely"
            )
        if config.explore and not self.full:
            raise ConfigError(f"explore={config.explore} is not supported for the expert stack {self.name!r} "
                              f"yet: use explore=0, or exclude=[{self.name!r}]")
        self.explore = 0
        self.sharded = False  # grassfx.fsdp refuses sharded expert stacks
        return (experts, self.rank, cols), (experts, self.rank), (experts, rows)

    def matrix(self):
        """The stack as the optimizer's 2-D rules see it: its :class:`MatrixFace` (every row
        kept: the stack itself, updated whole)."""
        return self if self.full else MatrixFace(self)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.experts} experts x rows {self.rank}/{self.rows}, selection={self.method}"

    def commit(self, idx: torch.Tensor, rho: torch.Tensor, step: int) -> None:
        """Install a new selection ((E, r) rows and scales) at optimizer step ``step``."""
        if not self.refreshed:
            self.prev_idx = self.idx.clone()
        with torch.no_grad():
            self.idx.copy_(idx.to(self.idx.device))
            self.rho.copy_(rho.to(self.rho.device))
            self.last_seen.scatter_(1, self.idx, step)
        self.refreshed = True

    def refresh_inputs(self, gen: torch.Generator, step: int):
        """``(noise, age, probe)`` of a refresh forward: (E, m) Gumbels for ``multinorm_nr``."""
        dev = self.idx.device
        if self.method == "multinorm_nr":
            noise = _select.draw_noise(self.method, self.experts * self.rows, self.rank, gen).view(self.experts, -1)
        else:
            noise = torch.zeros(0, dtype=torch.float64)
        age = torch.zeros(0, dtype=torch.float64, device=dev)
        probe = torch.zeros(2, self.experts, self.rank, dtype=torch.float64, device=dev, requires_grad=True)
        return noise.to(dev), age, probe

    def flat_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """(E, r) per-expert rows as rows of the (E*m, n) view: ``idx[e] + e * m``, (E*r,)."""
        offsets = torch.arange(self.experts, device=idx.device).unsqueeze(1) * self.rows
        return (idx + offsets).reshape(-1)


def make_site(spec: TargetSpec, index: int, weight: torch.Tensor, config: GrassConfig, layout=None) -> Site:
    """The site of one target: :class:`ExpertSite` for an expert stack, else :class:`Site`
    (with ``layout``, the block layout of a fused weight)."""
    if weight.dim() == 3:
        return ExpertSite(spec, index, weight, config)
    return Site(spec, index, weight, config, layout)


class ExpertAnchor(torch.autograd.Function):
    """Forward: a view of the stack. Backward: ``expertsel`` of its gradient -> ``handle``."""

    @staticmethod
    def forward(ctx, weight, handle, idx, rho, name: str):
        ctx.save_for_backward(idx, rho)
        ctx.name, ctx.handle_dtype = name, handle.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        idx, rho = ctx.saved_tensors
        return None, expertsel(grad, idx, rho, ctx.name).to(ctx.handle_dtype), None, None, None


class ExpertRefreshAnchor(torch.autograd.Function):
    """Refresh step of an expert stack: per-expert row norms pick the new rows.

    Backward: (E, m) squared row norms, new ``(idx, rho)`` (E, r) by
    :func:`select_expert_rows`, the compressed gradient for them, and
    ``stack([idx, rho])`` (2, E, r) as the gradient of ``probe``.
    """

    @staticmethod
    def forward(ctx, weight, handle, probe, noise, rank: int, method: str, group: str, world: int):
        ctx.save_for_backward(noise)
        ctx.rank, ctx.method, ctx.group, ctx.world = rank, method, group, world
        ctx.handle_dtype = handle.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (noise,) = ctx.saved_tensors
        if ctx.world > 1:
            grad = _compat.all_reduce_mean(grad, ctx.group, ctx.world)
        sq_norms = squared_norms(grad, 2, 1)  # (E, m)
        idx, rho = select_expert_rows(sq_norms, noise, ctx.rank, ctx.method)
        poison = sq_norms.sum().to(torch.float64) * 0.0  # NaN iff any norm is NaN/Inf
        compressed = select_experts(grad, idx, rho + poison.to(rho.dtype))  # refused refresh: NaN (as RefreshAnchor)
        record = torch.stack([idx.to(torch.float64), rho.to(torch.float64) + poison])  # (2, E, r)
        return None, compressed.to(ctx.handle_dtype), record, None, None, None, None, None


def make_expert_anchor(site: ExpertSite, plan, group: str, size: int) -> torch.Tensor:
    """The anchored view of an expert stack for this forward (``plan``: a refresh's inputs or None)."""
    w = site.weight
    if plan is not None:
        probe, noise, _age = plan
        return ExpertRefreshAnchor.apply(w, site.handle, probe, noise, site.rank, site.method, group, size)
    return ExpertAnchor.apply(w, site.handle, site.idx, site.rho, site.name)


# -- what an optimizer sees ------------------------------------------------------------------
class MatrixFace:
    """An expert site seen as a 2-D site of ``E * m`` rows (rows selected, dim 0).

    ``weight`` is the (E*m, n) view of the stack, ``idx`` / ``prev_idx`` / ``rho`` are
    flat (E*r,), ``rows`` / ``rank`` count over all experts; :meth:`flat` views a
    handle-shaped tensor (E, r, n) as (E*r, n) and an (E, r) one as (E*r,). Everything
    else (``refreshed``, ``decay_pending``, ``method``, ...) is the site's own.
    """

    def __init__(self, site: ExpertSite):
        object.__setattr__(self, "site", site)

    def __getattr__(self, name):
        return getattr(self.site, name)

    def __setattr__(self, name, value):
        setattr(self.site, name, value)

    @property
    def weight(self) -> torch.Tensor:
        w = self.site.weight
        return w.view(-1, w.shape[-1])  # (E*m, n)

    @property
    def idx(self) -> torch.Tensor:
        return self.site.flat_idx(self.site.idx)

    @property
    def prev_idx(self):
        prev = self.site.prev_idx
        return None if prev is None else self.site.flat_idx(prev)

    @property
    def rho(self) -> torch.Tensor:
        return self.site.rho.reshape(-1)

    @property
    def rows(self) -> int:
        return self.site.experts * self.site.rows

    @property
    def rank(self) -> int:
        return self.site.experts * self.site.rank

    def matrix(self):
        return self

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        site = self.site
        if t.dim() == 3:
            return t.view(-1, t.shape[-1])
        if tuple(t.shape) == (site.experts, site.rank):
            return t.view(-1)
        return t
