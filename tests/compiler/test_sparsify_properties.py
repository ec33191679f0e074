"""Property test (hypothesis) of the rewrite: over shapes, ranks, bias, dtype and shared
weights, the compiled graph's compressed gradient equals eager grassfx's and no dense
weight-gradient GEMM is left."""

from __future__ import annotations

import copy

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import grassfx


class Block(nn.Module):
    """x -> fc (optionally twice: a shared weight) -> optional head reshaping the output."""

    def __init__(self, d_in, d_out, bias, twice, heads):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)
        self.twice, self.heads = twice, heads

    def forward(self, x):
        y = self.fc(x)
        if self.twice:
            y = y + self.fc(x * 0.5)
        if self.heads:  # (b, s, m) -> (b, s, m / 2, 2): the output gradient comes through a view and transpose
            y = y.view(*y.shape[:-1], 2, -1).transpose(-1, -2)
        return y


@settings(max_examples=8, phases=[Phase.explicit, Phase.generate])  # each example compiles: no shrinking
@given(half_m=st.integers(3, 9), n=st.integers(3, 11), proj_dim=st.sampled_from(["rows", "cols"]), data=st.data(),
       bias=st.booleans(), twice=st.booleans(), heads=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_rewrite_matches_eager_and_drops_the_dense_gemm(half_m, n, proj_dim, data, bias, twice, heads, dtype, seed):
    torch._dynamo.reset()
    m = 2 * half_m
    rank = data.draw(st.integers(1, (m if proj_dim == "rows" else n) - 1))  # fewer than all: a real rewrite
    torch.manual_seed(seed)
    net = Block(n, m, bias, twice, heads).to(dtype)
    kw = dict(rank=rank, proj_dim=proj_dim, selection="multinorm", update_freq=1000, seed=seed)
    eager = grassfx.compile(copy.deepcopy(net), backend="eager", **kw)
    compiled = grassfx.compile(net, backend="aot_eager", record=True, **kw)
    x = torch.randn(2, 7, n, dtype=dtype)  # T = 14: no clash with the weight's dims
    for _ in range(2):  # the refresh step, then the rewritten step
        for model in (eager, compiled):
            model.sites[0].handle.grad = None
            model(x).square().sum().backward()
    (se,), (sc,) = eager.sites, compiled.sites
    assert torch.equal(se.idx, sc.idx)
    torch.testing.assert_close(sc.handle.grad, se.handle.grad)
    changes = compiled.compile_report.changes()
    # compiled normal steps anchor each read of the weight: one rewrite per read
    reads = 2 if twice else 1
    assert [c.action for c in changes] == ["rewrote"] * reads, [(c.action, c.detail) for c in changes]
    weight = {(m, n), (n, m)}
    (backward,) = [r for r in compiled.compile_report.records if r.kind == "backward" and r.stages[0].result.changes]
    dense = [op for op, shape, made_by in backward.stages[-1].ops_after
             if op in ("mm", "bmm") and made_by is None and shape and tuple(shape[-2:]) in weight]
    assert dense == []
