"""Eager Grass (backend="eager"): the reference every compiled rewrite is checked against."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import grassfx
from grassfx import select as sel

from conftest import dense_grads, llama_batch, make_gpt2, make_llama, make_mlp


def _step(model, opt, x):
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


# -- oracle 2: compressed gradient == rho * dense rows -------------------------------------
@pytest.mark.parametrize("selection", ["top_r", "multinorm", "multinorm_nr", "uniform"])
@pytest.mark.parametrize("proj_dim", ["rows", "cols"])
def test_compressed_grad_is_selected_dense_rows(selection, proj_dim):
    net = make_mlp()
    x = torch.randn(8, 12)
    dense = dense_grads(net, lambda m: m(x).pow(2).mean())
    model = grassfx.compile(net, rank=5, selection=selection, proj_dim=proj_dim, backend="eager")
    model(x).pow(2).mean().backward()
    for site in model.sites:
        assert model.weight_of(site).grad is None  # never a dense .grad
        g = dense[site.name]
        expect = g.index_select(site.dim, site.idx) * (site.rho.unsqueeze(1 - site.dim))
        torch.testing.assert_close(site.handle.grad, expect, rtol=1e-6, atol=1e-7)
        if selection in ("top_r", "multinorm_nr"):
            assert site.idx.unique().numel() == site.rank


def test_top_r_picks_largest_rows_and_only_they_change():
    net = make_llama()
    batch = llama_batch(3)
    dense = dense_grads(net, lambda m: m(**batch).loss)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    model = grassfx.compile(net, rank=4, selection="top_r", proj_dim="rows", backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    for site in model.sites:
        g = dense[site.name]
        expect = torch.topk(g.norm(dim=1), site.rank).indices.sort().values
        assert site.idx.tolist() == expect.tolist(), site.name
        changed = (model.weight_of(site) != before[site.name]).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= set(site.idx.tolist()), site.name
        assert changed.numel() > 0


def test_refresh_schedule_and_refresh_step_uses_new_rows():
    net = make_mlp()
    model = grassfx.compile(net, rank=4, selection="top_r", update_freq=3, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    refreshed_at = []
    for step in range(7):
        x = torch.randn(8, 12, generator=g)
        before = int(model.grass_refreshed_at)
        dense = dense_grads(net, lambda m: m(x).pow(2).mean())
        model(x).pow(2).mean().backward()
        if int(model.grass_refreshed_at) != before:
            refreshed_at.append(step)
            site = model.sites[0]
            expect = torch.topk(dense[site.name].norm(dim=1 - site.dim), site.rank).indices.sort().values
            assert site.idx.tolist() == expect.tolist()
        opt.step()
        opt.zero_grad()
    assert refreshed_at == [0, 3, 6]


# -- Monte Carlo: multinorm and uniform are unbiased ------------------------------------------
@pytest.mark.parametrize("selection", ["multinorm", "uniform"])
def test_selector_is_unbiased(selection):
    torch.manual_seed(0)
    m, n, r, draws = 12, 5, 4, 20000
    G = torch.randn(m, n, dtype=torch.float64) * torch.linspace(0.1, 3.0, m, dtype=torch.float64)[:, None]
    sq = (G * G).sum(1)
    total = torch.zeros_like(G)
    gen = torch.Generator().manual_seed(1)
    for _ in range(draws):
        if selection == "uniform":
            idx, rho = sel.draw_uniform(m, r, gen)
        else:
            idx, rho = sel.select_rows(sq, sel.draw_noise("multinorm", m, r, gen), r, "multinorm")
        est = torch.zeros_like(G)
        est.index_add_(0, idx, G[idx] * rho.double()[:, None] ** 2)  # P Pᵀ G
        total += est
    mean = total / draws
    rel = (mean - G).norm() / G.norm()
    assert rel < 0.03, rel
    # a biased selector is far off: top_r keeps r rows with rho = 1
    idx, rho = sel.select_rows(sq, torch.zeros(0), r, "top_r")
    biased = torch.zeros_like(G)
    biased[idx] = G[idx]
    assert (biased - G).norm() / G.norm() > 0.3


def test_selection_is_identical_for_same_seed_and_norms():
    runs = []
    for _ in range(2):
        model = grassfx.compile(make_mlp(), rank=4, selection="multinorm", seed=7, backend="eager")
        model(torch.ones(3, 12)).sum().backward()
        runs.append([s.idx.clone() for s in model.sites])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    other = grassfx.compile(make_mlp(), rank=4, selection="multinorm", seed=8, backend="eager")
    other(torch.ones(3, 12)).sum().backward()
    assert any(not torch.equal(a, s.idx) for a, s in zip(runs[0], other.sites))


# -- targets ----------------------------------------------------------------------------------
class EinsumBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Parameter(torch.randn(16, 8))
        self.pos = nn.Parameter(torch.randn(4, 8))  # added, not multiplied: not a target

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        return torch.einsum("bsd,ed->bse", h, self.proj)


def test_targets_found_automatically():
    names = [s.name for s in grassfx.compile(EinsumBlock(), rank=2, backend="eager").sites]
    assert names == ["proj"]
    llama = grassfx.compile(make_llama(), rank=4, backend="eager")
    assert not any("embed" in s.name or "norm" in s.name for s in llama.sites)
    gpt2 = grassfx.compile(make_gpt2(), rank=4, backend="eager")
    kinds = {s.kind for s in gpt2.sites}
    assert kinds == {"conv1d"}  # lm_head is tied to wte and stays dense
    assert len(gpt2.sites) == 2 * 4


def test_targets_and_exclude_globs_and_predicates():
    m = grassfx.compile(make_llama(), rank=4, targets="*mlp*", backend="eager")
    assert {s.name.split(".")[-2] for s in m.sites} == {"gate_proj", "up_proj", "down_proj"}
    m = grassfx.compile(make_llama(), rank=4, exclude=["*v_proj", lambda n, p: "q_proj" in n], backend="eager")
    assert not any("v_proj" in s.name or "q_proj" in s.name for s in m.sites)
    assert len(m.sites) == 10


def test_untied_lm_head_is_not_projected_by_default_but_can_be_asked_for():
    net = make_llama()
    assert net.lm_head.weight is not net.model.embed_tokens.weight  # untied
    m = grassfx.compile(net, rank=4, backend="eager")
    assert len(m.sites) == 14 and not any("lm_head" in s.name for s in m.sites)
    assert m.module.lm_head.weight.requires_grad  # trained densely by the same optimizer
    opt = grassfx.optim.AdamW(m.parameters(), lr=1e-2)
    before = m.module.lm_head.weight.detach().clone()
    m(**llama_batch(0)).loss.backward()
    opt.step()
    assert (m.module.lm_head.weight != before).all()  # every vocabulary row moves, not r of them
    asked = grassfx.compile(make_llama(), rank=4, backend="eager", targets=["*_proj", "lm_head"])
    assert "lm_head.weight" in {s.name for s in asked.sites}


def test_eager_gpt2_conv1d_compressed_grad():
    net = make_gpt2()
    batch = llama_batch(0, vocab=80)
    dense = dense_grads(net, lambda m: m(**batch).loss)
    model = grassfx.compile(net, rank=8, backend="eager")
    model(**batch).loss.backward()
    for site in model.sites:
        expect = dense[site.name].index_select(site.dim, site.idx)
        torch.testing.assert_close(site.handle.grad, expect, rtol=1e-5, atol=1e-7)


# -- unwrap and state_dict --------------------------------------------------------------------
def test_unwrap_returns_original_module_and_keys():
    net = make_llama()
    keys = list(net.state_dict().keys())
    model = grassfx.compile(net, rank=4, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = llama_batch(0)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = {s.name: s.weight.detach().clone() for s in model.sites}  # owed decay not yet applied
    inner = grassfx.unwrap(model)
    assert inner is net
    assert list(inner.state_dict().keys()) == keys
    assert all(p.requires_grad for p in inner.parameters())
    site = model.sites[0]
    w = inner.get_parameter(site.name)
    outside = torch.ones(site.rows, dtype=torch.bool)
    outside[site.idx] = False
    # owed weight decay was applied to the unselected rows, selected rows untouched
    factor = (1 - 1e-2 * 0.1) ** 2
    torch.testing.assert_close(w[outside], trained[site.name][outside] * factor)
    torch.testing.assert_close(w[~outside], trained[site.name][~outside])


def test_proj_dim_auto_keeps_the_smallest_state_and_smaller_the_widest_coverage():
    net = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 8), nn.Tanh(), nn.Linear(8, 8))
    dims = {}
    for proj_dim in ("auto", "smaller"):
        m = grassfx.compile(copy.deepcopy(net), rank=4, proj_dim=proj_dim, backend="eager")
        dims[proj_dim] = [(s.dim, tuple(s.handle.shape)) for s in m.sites]
    # (24, 8): auto keeps 4 of 24 rows, state (4, 8); smaller keeps 4 of 8 columns, state (24, 4)
    assert dims["auto"] == [(0, (4, 8)), (1, (8, 4)), (0, (4, 8))]
    assert dims["smaller"] == [(1, (24, 4)), (0, (4, 24)), (0, (4, 8))]
