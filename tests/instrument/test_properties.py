"""Property tests (hypothesis) of the eager reference: compressed gradients, selectors, decay."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import grassfx
from grassfx import select as sel
from grassfx.optim.decay import decay_rows

from conftest import dense_grads

SELECTORS = st.sampled_from(["top_r", "multinorm", "multinorm_nr", "uniform"])


class TwoUses(nn.Module):
    """A Linear, optionally read twice (a shared weight: its gradient is a sum of two GEMMs)."""

    def __init__(self, d_in, d_out, bias, twice):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)
        self.twice = twice

    def forward(self, x):
        y = self.fc(x)
        return y + self.fc(x.flip(0)) if self.twice else y


@settings(max_examples=25)
@given(m=st.integers(2, 12), n=st.integers(2, 12), rank=st.integers(1, 14), proj_dim=st.sampled_from(["rows", "cols"]),
       bias=st.booleans(), twice=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       selection=SELECTORS, seed=st.integers(0, 2**16))
def test_compressed_grad_is_rho_times_selected_dense_rows(m, n, rank, proj_dim, bias, twice, dtype, selection, seed):
    torch.manual_seed(seed)
    net = TwoUses(n, m, bias, twice).to(dtype)
    x = torch.randn(5, n, dtype=dtype)
    dense = dense_grads(net, lambda mod: mod(x).square().sum())
    model = grassfx.compile(copy.deepcopy(net), rank=rank, proj_dim=proj_dim, selection=selection, backend="eager")
    model(x).square().sum().backward()  # the refresh step: rows from this gradient
    (site,) = model.sites
    assert site.handle.grad.dtype == dtype and site.handle.grad.shape == site.handle.shape
    if site.full:
        torch.testing.assert_close(site.handle.grad, dense["fc.weight"])
        return
    shape = [1, 1]
    shape[site.dim] = -1
    expect = dense["fc.weight"].index_select(site.dim, site.idx) * site.rho.to(dtype).reshape(shape)
    torch.testing.assert_close(site.handle.grad, expect)


@settings(max_examples=60)
@given(m=st.integers(1, 40), data=st.data(), selection=st.sampled_from(["top_r", "multinorm", "multinorm_nr"]),
       zeros=st.booleans())
def test_selectors_return_r_sorted_rows_in_range_with_positive_scales(m, data, selection, zeros):
    r = data.draw(st.integers(1, m))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    norms = torch.zeros(m) if zeros else torch.rand(m, generator=gen) * 10
    idx, rho = sel.select_rows(norms, sel.draw_noise(selection, m, r, gen), r, selection)
    assert idx.shape == rho.shape == (r,) and idx.dtype == torch.int64
    assert bool((idx[1:] >= idx[:-1]).all()) and 0 <= int(idx.min()) and int(idx.max()) < m
    assert bool((rho > 0).all()) and bool(torch.isfinite(rho).all())
    if selection != "multinorm":  # without replacement: distinct rows
        assert len(set(idx.tolist())) == r
    if selection == "top_r" and not zeros:
        assert set(idx.tolist()) == set(torch.topk(norms, r).indices.tolist())


@settings(max_examples=60)
@given(m=st.integers(1, 10), n=st.integers(1, 6), dim=st.integers(0, 1), data=st.data(),
       factor=st.floats(0.5, 1.0))
def test_decay_hits_each_selected_row_once_even_when_drawn_twice(m, n, dim, data, factor):
    rows = (m, n)[dim]
    idx = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=8)))
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))))
    got = w.clone()
    decay_rows(got, idx, dim, factor)
    expect = w.clone()
    for i in set(idx.tolist()):
        if dim == 0:
            expect[i] = w[i] * factor
        else:
            expect[:, i] = w[:, i] * factor
    assert torch.equal(got, expect)
