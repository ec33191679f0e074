"""Row selectors: which r of m rows a projected weight trains until the next refresh.

Every selector is a pure function of the row norms and of pre-drawn noise, written in
torch ops so that it runs inside a compiled backward graph (the refresh graph) and gives
the same rows in eager mode. The noise comes from a ``torch.Generator`` seeded by
``(seed, site, step)``, so every process that holds the same norms picks the same rows.

======================  =========================  ==============  =================
name                    rows                        rho             noise
======================  =========================  ==============  =================
``top_r``               r largest row norms         1               none
``multinorm``           r i.i.d. draws, q ∝ ‖G_i‖   1/sqrt(r q_i)   r uniforms
``multinorm_nr``        r distinct draws ∝ ‖G_i‖    1               m Gumbels
``uniform``             r i.i.d. uniform draws      sqrt(m / r)     (drawn on host)
======================  =========================  ==============  =================

``multinorm`` and ``uniform`` are unbiased: ``E[P Pᵀ] = I`` with ``P = [rho_j e_idx_j]``.
Indices are returned sorted ascending (rows stay in memory order for the gathers).

**Coverage** (``explore = k > 0``, for ``top_r`` and ``multinorm_nr``): ``r - k`` rows
come from the selector as above and the other ``k`` are the rows left out of it that
went unselected longest (``age``: steps since a row was last selected; never-selected
rows are oldest; ties go to the larger norm). Rows that never have the largest norms
still train once every few windows, instead of staying at their initial values.

**Blocks** (fused weights such as q|k|v, see :mod:`grassfx.instrument.blocks`): ``labels``
(m,) gives each row's block and ``blocks`` one static ``(size, quota, explore)`` per
block (quotas sum to r, see :func:`split_rank`). Every block then gets exactly its quota:
``top_r`` / ``multinorm_nr`` take the best ``quota - explore`` rows of the block and its
``explore`` oldest other rows; ``multinorm`` and ``uniform`` are stratified -- ``quota``
i.i.d. draws within the block, ``q_i`` normalised over the block, ``rho = 1/sqrt(quota q_i)``
(uniform: ``sqrt(size / quota)``), so ``E[P Pᵀ] = I`` still holds block by block.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SELECTORS", "NEEDS_NORMS", "EXPLORING", "UNIT_RHO", "WITH_REPLACEMENT", "select_rows", "draw_noise",
           "draw_uniform", "site_generator", "split_rank"]

SELECTORS = ("top_r", "multinorm", "multinorm_nr", "uniform")
#: selectors that need the dense gradient's row norms at a refresh
NEEDS_NORMS = frozenset({"top_r", "multinorm", "multinorm_nr"})
#: selectors whose rho is always 1, and those that may pick a row more than once
UNIT_RHO = frozenset({"top_r", "multinorm_nr"})
WITH_REPLACEMENT = frozenset({"multinorm", "uniform"})

_MIX = (1_000_003, 998_244_353, (1 << 61) - 1)


def site_generator(seed: int, site: int, step: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, site, step)``: identical in every process."""
    a, b, mod = _MIX
    key = ((int(seed) * a + int(site)) * b + int(step)) % mod
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key)
    return gen


def draw_noise(method: str, m: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """Noise that :func:`select_rows` turns into rows; shape depends on ``method``."""
    if method == "top_r":
        return torch.zeros(0)
    if method == "multinorm":
        return torch.rand(r, generator=gen, dtype=torch.float64)
    if method == "multinorm_nr":
        u = torch.rand(m, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0 - 1e-16)
        return -torch.log(-torch.log(u))  # standard Gumbel
    raise ValueError(f"selector {method!r} draws no noise")


def draw_uniform(m: int, r: int, gen: torch.Generator, labels: torch.Tensor | None = None,
                 blocks: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``uniform``: r i.i.d. uniform rows (with replacement), rho = sqrt(m / r).

    With ``labels``/``blocks``: ``quota`` uniform draws within each block, rho = sqrt(size / quota).
    """
    if labels is None:
        idx = torch.randint(m, (r,), generator=gen).sort().values
        return idx, torch.full((r,), math.sqrt(m / r))
    members = torch.argsort(labels.cpu(), stable=True)  # the rows of block 0, then of block 1, ...
    parts, scales, start = [], [], 0
    for size, quota, _ in blocks:
        parts.append(members[start + torch.randint(size, (quota,), generator=gen)])
        scales.append(torch.full((quota,), math.sqrt(size / quota)))
        start += size
    idx, order = torch.cat(parts).sort()
    return idx, torch.cat(scales)[order]


def split_rank(total: int, sizes) -> list[int]:
    """``total`` split in proportion to ``sizes`` (largest remainders), each >= 1 when ``total >= len(sizes)``.

    Example:
        >>> split_rank(24, [64, 32, 32]), split_rank(3, [1000, 10, 10])
        ([12, 6, 6], [1, 1, 1])
    """
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    shares = [int(math.floor(e)) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda b: (shares[b] - exact[b], b))
    for b in by_remainder[: total - sum(shares)]:
        shares[b] += 1
    if total >= len(sizes):
        for b in range(len(sizes)):
            if shares[b] == 0:  # take one from the largest share
                shares[max(range(len(sizes)), key=lambda c: (shares[c], -c))] -= 1
                shares[b] = 1
    return shares


def _probabilities(sq_norms: torch.Tensor) -> torch.Tensor:
    """q_i ∝ ‖G_i‖₂, falling back to uniform when every row is zero (float64)."""
    norms = sq_norms.to(torch.float64).clamp_min(0).sqrt()
    total = norms.sum()
    uniform = torch.full_like(norms, 1.0 / norms.shape[0])
    return torch.where(total > 0, norms / total.clamp_min(1e-300), uniform)


#: selectors that can reserve part of the rank for coverage (``explore``)
EXPLORING = frozenset({"top_r", "multinorm_nr"})


def _age_key(scores: torch.Tensor, picked: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """Rows outside ``picked`` keyed by ``age`` (ties: larger ``scores``); picked rows: -inf."""
    m = scores.shape[0]
    taken = torch.zeros(m, dtype=torch.bool, device=scores.device).index_fill_(0, picked, True)
    # ranks of the scores in [0, 1) break ties between equal ages without reordering ages
    order = torch.argsort(torch.argsort(scores)).to(torch.float64) / m
    key = torch.where(taken, torch.full_like(order, -math.inf), age.to(order) + order)
    return key


def _oldest_rest(scores: torch.Tensor, picked: torch.Tensor, age: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows outside ``picked`` with the largest ``age`` (ties: largest ``scores``)."""
    return torch.topk(_age_key(scores, picked, age), k, sorted=False).indices


def _top_per_block(key: torch.Tensor, labels: torch.Tensor, blocks: tuple, column: int) -> torch.Tensor:
    """Per block, the ``blocks[b][column]`` rows with the largest ``key`` (ties: lower row first).

    Sorting by key (descending), then stably by block, lines the rows up block by block,
    best first; block sizes are static, so each block's first rows are a static slice.
    """
    order = torch.argsort(key, descending=True, stable=True)
    grouped = order[torch.argsort(labels[order], stable=True)]
    parts, start = [], 0
    for block in blocks:
        if block[column]:
            parts.append(grouped[start:start + block[column]])
        start += block[0]
    return torch.cat(parts)


def _pick_best(scores: torch.Tensor, r: int, explore: int, age, labels, blocks) -> torch.Tensor:
    """``top_r``-style picks: the best ``r - explore`` rows plus ``explore`` oldest (per block with ``labels``)."""
    if labels is None:
        idx = torch.topk(scores, r - explore, sorted=False).indices
        if explore:
            idx = torch.cat([idx, _oldest_rest(scores, idx, age, explore)])
        return idx
    best = tuple((size, quota - extra, extra) for size, quota, extra in blocks)
    idx = _top_per_block(scores, labels, best, 1)
    if explore:
        idx = torch.cat([idx, _top_per_block(_age_key(scores, idx, age), labels, best, 2)])
    return idx


def _stratified_multinorm(sq_norms: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor, blocks: tuple):
    """``multinorm`` within each block: ``quota`` draws, q_i ∝ ‖G_i‖ over the block's rows."""
    members = torch.argsort(labels, stable=True)
    grouped = sq_norms[members]
    picks, rhos, start, used = [], [], 0, 0
    for size, quota, _ in blocks:
        q = _probabilities(grouped[start:start + size])
        cdf = torch.cumsum(q, 0)
        local = torch.searchsorted(cdf, noise[used:used + quota].to(cdf) * cdf[-1], right=True).clamp_max(size - 1)
        picks.append(members[start + local])
        rhos.append(torch.rsqrt(quota * q[local]))
        start, used = start + size, used + quota
    idx, order = torch.cat(picks).sort()
    return idx, torch.cat(rhos)[order].float()


def select_rows(sq_norms: torch.Tensor, noise: torch.Tensor, r: int, method: str,
                age: torch.Tensor | None = None, explore: int = 0, labels: torch.Tensor | None = None,
                blocks: tuple | None = None):
    """Pick ``r`` rows from squared row norms ``sq_norms`` (m,).

    ``explore = k`` (with ``age``, (m,)) reserves ``k`` of the ``r`` rows for the rows
    unselected longest (see the module docstring). ``labels`` (m,) int64 and ``blocks``
    (``(size, quota, explore)`` per block) select per block.

    Returns ``(idx, rho)``: int64 (r,) sorted ascending, float32 (r,).

    Example:
        >>> idx, rho = select_rows(torch.tensor([1.0, 9.0, 4.0]), torch.zeros(0), 2, "top_r")
        >>> idx.tolist(), rho.tolist()
        ([1, 2], [1.0, 1.0])
    """
    if explore and method not in EXPLORING:
        raise ValueError(f"select_rows: explore is supported by {sorted(EXPLORING)}, not {method!r}")
    if method == "top_r":
        idx = _pick_best(sq_norms.float(), r, explore, age, labels, blocks)
        return idx.sort().values, torch.ones(r, dtype=torch.float32, device=sq_norms.device)
    if method == "multinorm" and labels is not None:
        return _stratified_multinorm(sq_norms, noise, labels, blocks)
    if method == "multinorm":
        q = _probabilities(sq_norms)
        cdf = torch.cumsum(q, 0)
        picks = torch.searchsorted(cdf, noise.to(cdf) * cdf[-1], right=True)
        idx = picks.clamp_max(q.shape[0] - 1).sort().values
        rho = torch.rsqrt(r * q[idx])
        return idx, rho.float()
    if method == "multinorm_nr":
        q = _probabilities(sq_norms)
        keys = torch.where(q > 0, torch.log(q.clamp_min(1e-300)), torch.full_like(q, -math.inf))
        idx = _pick_best(keys + noise.to(keys), r, explore, age, labels, blocks)
        return idx.sort().values, torch.ones(r, dtype=torch.float32, device=sq_norms.device)
    raise ValueError(f"select_rows: unknown selector {method!r}; choose one of {SELECTORS}")
