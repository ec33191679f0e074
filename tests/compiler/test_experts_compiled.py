"""Expert stacks compiled: the expert GEMMs' weight gradients rewritten, or reported."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import grassfx
from grassfx.instrument.experts import ExpertSite
from grassfx.passes.sparsify_wgrad import find_weight_grad_sites

from moe_zoo import make_llama4, make_loop_experts, make_mixtral, mixtral_batch


def _train_pair(net, batches, loss_fn, backend="aot_eager", **kw):
    """Eager and compiled grassfx models trained side by side; gradients compared every step."""
    eager = grassfx.compile(copy.deepcopy(net), backend="eager", **kw)
    compiled = grassfx.compile(net, backend=backend, record=True, **kw)
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in (eager, compiled)]
    seen = []
    for batch in batches:
        for m in (eager, compiled):
            loss_fn(m, batch).backward()
        for se, sc in zip(eager.sites, compiled.sites):
            assert torch.equal(se.idx, sc.idx), se.name
            torch.testing.assert_close(sc.handle.grad, se.handle.grad, rtol=1e-4, atol=1e-6, msg=se.name)
        seen.append({s.name: s.idx.clone() for s in compiled.sites if isinstance(s, ExpertSite)})
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # ulp drift, amplified by Adam
    return eager, compiled, seen


def _expert_changes(model):
    names = {s.name for s in model.sites if isinstance(s, ExpertSite)}
    return {c.weight: c for c in model.compile_report.changes() if c.weight in names}


def _dense_expert_grads(model):
    """Backward-graph ops (after the passes) that form a per-expert dense (.., m, n) gradient."""
    shapes = {tuple(s.weight.shape[1:]) for s in model.sites if isinstance(s, ExpertSite) and not s.full}
    # the frame the rewrites happened in (the refresh frame forms dense gradients on purpose)
    frames = {g.graph_id.split(".")[0] for g in model.compile_report.graphs if g.changes()}
    assert len(frames) == 1, frames
    found = []
    for rec in model.compile_report.records:
        if rec.kind != "backward" or rec.graph_id.split(".")[0] not in frames:
            continue
        found += [(rec.graph_id, op, sh) for op, sh, made_by in rec.stages[-1].ops_after
                  if op in ("mm", "bmm", "index_put", "select_backward") and made_by is None
                  and sh and tuple(sh[-2:]) in shapes]
    return found


def test_mixtral_batched_mm_compiled_matches_eager_with_expert_gemms_rewritten():
    batches = [mixtral_batch(i) for i in range(5)]  # refreshes at steps 0, 2 and 4
    _, compiled, seen = _train_pair(make_mixtral(experts_implementation="batched_mm"), batches,
                                    lambda m, b: m(**b).loss, rank=8, update_freq=2)
    changes = _expert_changes(compiled)
    assert len(changes) == 4 and all(c.action == "rewrote" for c in changes.values()), changes
    assert _dense_expert_grads(compiled) == []
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(seen[1][name], seen[2][name]) or not torch.equal(seen[3][name], seen[4][name])
    assert torch._dynamo.utils.counters["graph_break"] == {}


@pytest.mark.slow
def test_mixtral_batched_mm_inductor_rewrites_the_outer_product_form():
    # Inductor writes the per-pair weight gradient (a bmm with inner size 1) as a broadcast mul
    batches = [mixtral_batch(i) for i in range(3)]
    _, compiled, _ = _train_pair(make_mixtral(experts_implementation="batched_mm", layers=1), batches,
                                 lambda m, b: m(**b).loss, backend="inductor", rank=8, update_freq=2,
                                 targets=["*experts*"])
    changes = _expert_changes(compiled)
    assert len(changes) == 2 and all(c.action == "rewrote" for c in changes.values()), changes


def test_mixtral_grouped_mm_falls_back_densely_with_its_reason():
    batches = [mixtral_batch(i) for i in range(3)]
    _, compiled, _ = _train_pair(make_mixtral(experts_implementation=None, layers=1), batches,
                                 lambda m, b: m(**b).loss, rank=8, update_freq=2, targets=["*experts*"])
    changes = _expert_changes(compiled)
    assert len(changes) == 2 and all(c.action == "fallback" for c in changes.values())
    assert all("grouped_mm_fallback_backward" in c.detail for c in changes.values()), changes
    skipped = [s.reason for g in compiled.compile_report.graphs for r in g.results for s in r.skipped]
    assert len(skipped) == 2 and all("per-expert GEMM" in s for s in skipped)


def test_llama4_expert_bmm_over_the_stack_is_rewritten():
    batches = [mixtral_batch(i) for i in range(3)]
    _, compiled, _ = _train_pair(make_llama4(), batches, lambda m, b: m(**b).loss, rank=8, update_freq=2)
    changes = _expert_changes(compiled)
    assert len(changes) == 4 and all(c.action == "rewrote" for c in changes.values()), changes
    assert _dense_expert_grads(compiled) == []
    assert all(not c.action == "fallback" for c in compiled.compile_report.changes())


def test_static_expert_loop_rewrites_each_select_backward():
    net = make_loop_experts(experts=3, d_in=6, d_out=10)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 6, generator=g) for _ in range(3)]
    _, compiled, _ = _train_pair(net, batches, lambda m, x: m(x).pow(2).mean(), rank=4, update_freq=2,
                                 targets=["w"])
    changes = [c for c in compiled.compile_report.changes() if c.weight == "w"]
    assert len(changes) == 3 and all(c.action == "rewrote" for c in changes)  # one read of w per expert
    assert _dense_expert_grads(compiled) == []


def test_find_weight_grad_sites_explains_an_unpushable_expert_gradient():
    from grassfx.instrument.experts import expertsel

    graph = fx.Graph()
    grad = graph.placeholder("grad")
    idx, rho = graph.placeholder("idx"), graph.placeholder("rho")
    grad.meta["val"] = torch.zeros(2, 5, 3)
    cum = graph.call_function(torch.ops.aten.cumsum.default, (grad, 1))
    cum.meta["val"] = torch.zeros(2, 5, 3)
    graph.output(graph.call_function(torch.ops.grassfx.expertsel.default, (cum, idx, rho, "w")))
    (site,) = find_weight_grad_sites(graph)
    assert site.experts and site.plan is None and site.reason == "expert gradient not from a per-expert GEMM: aten.cumsum"
    assert expertsel(torch.ones(2, 5, 3), torch.tensor([[0, 4], [1, 2]]), torch.ones(2, 2), "w").shape == (2, 2, 3)


def test_explain_lists_expert_stacks_with_their_reason():
    model = grassfx.compile(make_mixtral(layers=1), rank=8, backend="aot_eager", targets=["*experts*"])
    report = grassfx.explain(model, **mixtral_batch(0))
    rows = {w.name: w for w in report.weights}
    up = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert up.shape == (4, 96, 32) and up.dim == "rows/expert" and up.rewritten
    assert up.detail.startswith("expert stack of MixtralExperts (4 experts)")
    assert up.grad_bytes_grassfx * 12 == up.grad_bytes_dense  # 8 of 96 rows of each expert
    assert up.flops() == (2 * 16 * 2 * 96 * 32, 2 * 16 * 2 * 8 * 32)  # T = 16 tokens, 2 experts each
    text = str(report)
    assert "4 x 96 x 32" in text and "expert stack of MixtralExperts" in text



S, E, M, N = 7, 3, 5, 4
IDS = torch.tensor([0, 2, 2, 1, 0, 2, 1])  # the expert of each of the S token-expert pairs
EIDX = torch.tensor([[0, 3], [1, 4], [2, 3]])
ERHO = torch.tensor([[1.0, 2.0], [0.5, 1.0], [1.0, 3.0]])


def _scatter(values, ids, idx, rho):
    dense = values.new_zeros(E, M, N).index_put((ids,), values, accumulate=True)
    return torch.ops.grassfx.expertsel(dense, idx, rho, "w")


@pytest.mark.parametrize("pair_grad", [
    lambda a, b: torch.bmm(a, b),  # (S, m, n) = (S, m, 1) @ (S, 1, n)
    lambda a, b: a * b,  # Inductor's form of a bmm with inner size 1: an outer product
    lambda a, b: b * a,
    lambda a, b: torch.bmm(a.double(), b.double()).float(),  # a cast between
], ids=["bmm", "outer-mul", "outer-mul-swapped", "cast"])
def test_per_pair_expert_gradients_are_rewritten_exactly(pair_grad):
    from torch.fx.experimental.proxy_tensor import make_fx

    from grassfx.passes.infra import PassContext, settings
    from grassfx.passes.sparsify_wgrad import sparsify_wgrad

    def fn(a, b, ids, idx, rho):
        return _scatter(pair_grad(a, b), ids, idx, rho)

    args = (torch.randn(S, M, 1), torch.randn(S, 1, N), IDS, EIDX, ERHO)
    gm = make_fx(fn, tracing_mode="fake")(*args)
    result = sparsify_wgrad(gm.graph, PassContext("g0.backward0", "backward", settings()))
    gm.recompile()
    assert [c.action for c in result.changes] == ["rewrote"] and not result.skipped
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.grassfx.expertsel.default not in ops
    shapes = [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_function"]
    assert (S, M, N) not in shapes and (E, M, N) not in shapes  # no dense per-pair or per-expert gradient
    torch.testing.assert_close(gm(*args), fn(*args))


@pytest.mark.parametrize("expert_grad", [
    lambda x, dy: torch.bmm(x.transpose(1, 2), dy),  # W (E, k, n) used as bmm(x, W): rows from x
    lambda x, dy: torch.bmm(dy.transpose(1, 2), x).transpose(1, 2),  # W used transposed: columns of mat2
    lambda x, dy: torch.bmm(dy.transpose(1, 2), x).permute(0, 2, 1).double().float(),
], ids=["bmm", "transposed", "permute-cast"])
def test_batched_expert_gemms_are_rewritten_exactly(expert_grad):
    from torch.fx.experimental.proxy_tensor import make_fx

    from grassfx.passes.infra import PassContext, settings
    from grassfx.passes.sparsify_wgrad import sparsify_wgrad

    def fn(x, dy, idx, rho):  # x (E, T, m), dy (E, T, n): the stack's gradient is (E, m, n)
        return torch.ops.grassfx.expertsel(expert_grad(x, dy), idx, rho, "w")

    args = (torch.randn(E, 6, M), torch.randn(E, 6, N), EIDX, ERHO)
    gm = make_fx(fn, tracing_mode="fake")(*args)
    result = sparsify_wgrad(gm.graph, PassContext("g0.backward0", "backward", settings()))
    gm.recompile()
    assert [c.action for c in result.changes] == ["rewrote"] and not result.skipped
    shapes = [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_function"]
    assert (E, M, N) not in shapes and (E, N, M) not in shapes
    torch.testing.assert_close(gm(*args), fn(*args))
