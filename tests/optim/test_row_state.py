"""Projected AdamW's per-row state: each row's own step count, re-warmup, and rho applied once."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import grassfx
from grassfx.optim import row_factors

from conftest import make_linear

BETAS, EPS = (0.9, 0.999), 1e-8


class RowAdam:
    """Reference subspace AdamW, kept row by row: each row has its own moments and age.

    ``keep=True``: at a refresh, rows selected before and after keep (m, v, t), new rows
    start from zero. ``keep=False``: every selected row starts from zero at a refresh.
    """

    def __init__(self, weight, lr, keep):
        self.w = weight.detach().clone().double()
        self.lr, self.keep, self.rows, self.sel = lr, keep, {}, None

    def step(self, grad, idx):
        b1, b2 = BETAS
        idx = idx.tolist()
        if idx != self.sel:  # a refresh
            old = self.rows if self.keep else {}
            self.rows = {j: old.get(j, [0.0 * grad[0].double(), 0.0 * grad[0].double(), 0]) for j in idx}
            self.sel = idx
        for j in idx:
            m, v, t = self.rows[j]
            g = grad[j].double()
            t += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            self.rows[j] = [m, v, t]
            self.w[j] -= self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)


@pytest.mark.parametrize("moments", ["keep_overlap", "reset"])
def test_per_row_adam_matches_row_by_row_reference(moments):
    """Kept rows continue their Adam state (own bias correction); new rows start fresh."""
    base = make_linear()
    model = grassfx.compile(copy.deepcopy(base), rank=5, selection="multinorm_nr", update_freq=3,
                            moments=moments, proj_dim="rows", backend="eager", seed=3)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, betas=BETAS, eps=EPS)
    site = model.sites[0]
    ref = RowAdam(base.weight, 1e-2, keep=moments == "keep_overlap")
    g = torch.Generator().manual_seed(0)
    kept = fresh = 0
    prev = None
    for _ in range(12):
        x = torch.randn(6, 8, generator=g)
        w = model.weight_of(site).detach().clone().requires_grad_(True)
        (x @ w.t()).pow(2).mean().backward()  # the dense gradient, outside grassfx
        model(x).pow(2).mean().backward()
        idx = site.idx.clone()
        if prev is not None and not torch.equal(prev, idx):
            kept += len(set(prev.tolist()) & set(idx.tolist()))
            fresh += len(set(idx.tolist()) - set(prev.tolist()))
        prev = idx
        opt.step()
        opt.zero_grad()
        ref.step(w.grad, idx)
        torch.testing.assert_close(model.weight_of(site).double(), ref.w, rtol=1e-5, atol=1e-6)
    assert kept > 0 and fresh > 0  # both kinds of rows were exercised


def test_row_factors_by_hand():
    t = torch.tensor([1.0, 2.0, 5.0])
    factor, bc2 = row_factors(t, -0.1, 0.9, 0.99, rewarmup=4)
    expect_f = [-0.1 * min(1, k / 4) / (1 - 0.9**k) for k in (1, 2, 5)]
    expect_b = [math.sqrt(1 - 0.99**k) for k in (1, 2, 5)]
    torch.testing.assert_close(factor, torch.tensor(expect_f))
    torch.testing.assert_close(bc2, torch.tensor(expect_b))


def test_rewarmup_ramps_new_rows():
    model = grassfx.compile(make_linear(), rank=4, update_freq=100, proj_dim="rows", backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, rewarmup=4)
    site = model.sites[0]
    moved = []
    for _ in range(5):
        before = model.weight_of(site).detach().clone()
        model(torch.randn(3, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        moved.append((model.weight_of(site) - before).abs().max().item())
    # Adam's first step moves each coordinate by ~lr; a 4-step re-warmup makes it lr / 4
    assert moved[0] == pytest.approx(1e-2 / 4, rel=1e-3)
    assert moved[0] < moved[1] < moved[3]


@pytest.mark.parametrize("rho_scaling, factor", [("once", 1.0), ("twice", math.sqrt(16 / 2))])
def test_rho_enters_adam_once_by_default(rho_scaling, factor):
    """uniform (rho = sqrt(m / r)) moves a row as far as top_r unless asked for the paper's form."""
    model = grassfx.compile(make_linear(), rank=2, selection="uniform", update_freq=100, proj_dim="rows",
                            backend="eager", seed=1)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3, rho_scaling=rho_scaling)
    site = model.sites[0]
    before = model.weight_of(site).detach().clone()
    model(torch.randn(3, 8)).pow(2).mean().backward()
    opt.step()
    step = (model.weight_of(site) - before).abs()
    counts = torch.bincount(site.idx, minlength=site.rows)
    for row in site.idx.unique().tolist():  # a row drawn k times moves one step (k * factor in the paper's form)
        k = int(counts[row]) if rho_scaling == "twice" else 1
        assert step[row].max().item() == pytest.approx(1e-3 * factor * k, rel=1e-3)


def test_row_step_stays_float32_through_a_bfloat16_checkpoint():
    model = grassfx.compile(make_linear().to(torch.bfloat16), rank=4, update_freq=1000, proj_dim="rows",
                            backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(257):  # 257: the first count bfloat16 cannot hold
        model(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
    row_step = opt.state[model.sites[0].handle]["row_step"]
    assert row_step.dtype == torch.float32 and (row_step == 257).all()
