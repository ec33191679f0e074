"""MoE expert stacks, eager: discovery, per-expert selection, compressed gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import grassfx
from grassfx.instrument.experts import ExpertSite, select_expert_rows
from grassfx.instrument.targets import plan_targets

from moe_zoo import make_loop_experts, make_mixtral, mixtral_batch

EXPERT_NAMES = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}


def _picked(dense, site):
    """The reference compressed gradient: rows idx[e] of expert e, times rho."""
    return torch.take_along_dim(dense, site.idx.unsqueeze(-1), dim=1) * site.rho.unsqueeze(-1)


def test_mixtral_expert_stacks_are_found_and_projected():
    model = make_mixtral(experts_implementation="eager")
    decisions = {d.name: d for d in plan_targets(model)}
    assert {n for n, d in decisions.items() if d.target is not None and d.target.kind == "experts"} == EXPERT_NAMES
    gm = grassfx.compile(model, rank=8, backend="eager")
    sites = {s.name: s for s in gm.sites if isinstance(s, ExpertSite)}
    assert set(sites) == EXPERT_NAMES
    up = sites["model.layers.0.mlp.experts.gate_up_proj"]  # (4, 96, 32): 8 of 96 rows of each expert
    assert tuple(up.idx.shape) == (4, 8) and tuple(up.rho.shape) == (4, 8)
    assert tuple(up.handle.shape) == (4, 8, 32) and up.rows == 96 and up.experts == 4
    assert not up.weight.requires_grad and up.handle.requires_grad


def test_targets_glob_selects_expert_stacks_and_exclude_drops_them():
    gm = grassfx.compile(make_mixtral(), rank=8, backend="eager", targets=["*experts*"])
    assert {s.name for s in gm.sites} == EXPERT_NAMES
    decisions = {d.name: d for d in plan_targets(make_mixtral(), exclude=["*experts.down_proj"])}
    assert decisions["model.layers.0.mlp.experts.down_proj"].reason == "excluded by filter"
    assert decisions["model.layers.0.mlp.experts.gate_up_proj"].target.kind == "experts"


def test_a_named_3d_parameter_is_projected_and_4d_is_refused():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 5, 3))
            self.k = nn.Parameter(torch.randn(2, 2, 3, 3))

        def forward(self, x):
            return torch.einsum("bi,eoi->beo", x, self.w).sum() + self.k.sum()

    assert grassfx.compile(Stack(), rank=2, targets=["w"], backend="eager").sites[0].handle.shape == (2, 2, 3)
    with pytest.raises(grassfx.ConfigError, match="3-D expert stacks"):
        grassfx.compile(Stack(), rank=2, targets=["k"], backend="eager")


@pytest.mark.parametrize("selection", ["top_r", "multinorm_nr"])
def test_eager_compressed_gradients_are_the_selected_rows_of_each_expert(selection):
    net = make_mixtral(experts_implementation="eager")
    ref = copy.deepcopy(net)
    gm = grassfx.compile(net, rank=8, selection=selection, backend="eager", update_freq=100)
    batch = mixtral_batch(0)
    gm(**batch).loss.backward()  # the refresh step picks the rows from the dense gradient
    for p in gm.parameters():
        p.grad = None
    gm(**batch).loss.backward()  # a normal step: the compressed gradient only
    ref(**batch).loss.backward()
    for site in gm.sites:
        if not isinstance(site, ExpertSite):
            continue
        dense = ref.get_parameter(site.name).grad
        assert not torch.equal(site.idx, torch.arange(8).repeat(4, 1)), site.name  # a refresh did pick rows
        assert bool((site.idx.diff(dim=1) > 0).all())  # distinct, ascending per expert
        torch.testing.assert_close(site.handle.grad, _picked(dense, site), rtol=0, atol=0)
        if selection == "top_r":  # the r largest row norms of each expert
            norms = dense.pow(2).sum(-1)
            kth = norms.topk(8, dim=1).values[:, -1:]
            assert bool((torch.take_along_dim(norms, site.idx, 1) >= kth).all())


def test_full_rank_expert_stack_receives_the_dense_gradient():
    net = make_loop_experts(experts=2, d_in=4, d_out=5)
    ref = copy.deepcopy(net)
    gm = grassfx.compile(net, rank=5, backend="eager")
    x = torch.randn(2, 7, 4)
    gm(x).sum().backward()
    ref(x).sum().backward()
    assert gm.sites[0].full
    torch.testing.assert_close(gm.sites[0].handle.grad, ref.w.grad, rtol=0, atol=0)


def test_select_expert_rows_per_expert():
    norms = torch.tensor([[1.0, 9.0, 4.0, 0.0], [5.0, 0.0, 2.0, 7.0]])
    idx, rho = select_expert_rows(norms, torch.zeros(0), 2, "top_r")
    assert idx.tolist() == [[1, 2], [0, 3]] and rho.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    gumbel = torch.zeros(2, 4, dtype=torch.float64)
    idx, _ = select_expert_rows(norms, gumbel, 3, "multinorm_nr")  # zero noise: the top norms
    assert idx.tolist() == [[0, 1, 2], [0, 2, 3]]
    idx, _ = select_expert_rows(torch.zeros(2, 4), gumbel + torch.arange(4.0), 2, "multinorm_nr")
    assert idx.tolist() == [[2, 3], [2, 3]]  # an expert with no gradient draws by its noise alone
    with pytest.raises(grassfx.ConfigError, match="expert stacks"):
        select_expert_rows(norms, torch.zeros(0), 2, "multinorm")


@pytest.mark.parametrize("kw, match", [({"selection": "multinorm"}, "selection='multinorm'"),
                                       ({"selection": "uniform"}, "selection='uniform'"),
                                       ({"explore": 0.25}, "explore=0.25")])
def test_unsupported_settings_for_expert_stacks_are_refused(kw, match):
    with pytest.raises(grassfx.ConfigError, match=match):
        grassfx.compile(make_loop_experts(), rank=2, backend="eager", **kw)
    grassfx.compile(make_loop_experts(), rank=2, backend="eager", exclude=["w"], **kw)  # the way out works


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_refused_expert_refresh_changes_no_weight(value):
    # issue 27 item 4 for expert stacks: a NaN/Inf in a row multinorm_nr does not select
    # kept the old rows, and the drawn rows' gradient was applied to them
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 6, 3))

        def forward(self, x):
            return torch.einsum("bi,eoi->beo", x, self.w)

    torch.manual_seed(0)
    gm = grassfx.compile(Stack(), rank=2, targets=["w"], selection="multinorm_nr", update_freq=1, backend="eager")
    opt = grassfx.optim.AdamW(gm.parameters(), lr=1e-2, nonfinite="skip")
    gm(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    site = gm.sites[0]
    row = next(r for r in range(6) if r not in site.idx[0].tolist())
    before, idx = gm.module.w.detach().clone(), site.idx.clone()
    y = gm(torch.randn(4, 3))
    bad = (torch.arange(2)[:, None] == 0) & (torch.arange(6) == row)  # (e, o): row `row` of expert 0
    y.register_hook(lambda g: torch.where(bad, value, g))
    y.pow(2).mean().backward()
    assert torch.equal(site.idx, idx)  # the refresh was refused
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(gm.module.w, before)
