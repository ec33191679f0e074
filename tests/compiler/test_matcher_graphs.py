"""The weight-gradient matcher on small ``make_fx`` graphs: what it pushes, and why it skips.

Graph-only: no compilation, no model. Each function computes a "dense weight gradient"
and hands it to ``grassfx::rowsel`` as the anchors' backward does.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import grassfx.instrument.anchors  # noqa: F401 - registers grassfx::rowsel
from passes.sparsify_wgrad import find_weight_grad_sites

IDX, RHO = torch.tensor([0, 2]), torch.ones(2)


def _rowsel(grad, dim=0):
    return torch.ops.grassfx.rowsel(grad, IDX, RHO, dim, "w")


def _sites(fn, *args):
    graph = make_fx(fn)(*args).graph
    sites = find_weight_grad_sites(graph)
    assert len(sites) == 1
    return sites[0]


G, X = torch.randn(5, 4), torch.randn(5, 3)  # dW = G^T X: (4, 3) = (4, 5) @ (5, 3)


def test_plain_gemm_is_pushed():
    site = _sites(lambda g, x: _rowsel(g.t() @ x), G, X)
    assert site.reason is None and site.gemms == 1


def test_columns_of_a_gemm_are_pushed():
    site = _sites(lambda g, x: _rowsel(g.t() @ x, dim=1), G, X)
    assert site.reason is None and site.gemms == 1


def test_sum_of_two_gemms_is_pushed_into_both():
    site = _sites(lambda g, x: _rowsel(g.t() @ x + g.t() @ (2 * x)), G, X)
    assert site.reason is None and site.gemms == 2


@pytest.mark.parametrize(
    "fn, reason",
    [
        (lambda g, x: (_rowsel(g.t() @ x), (g.t() @ x).sum()), None),  # two GEMMs: not shared
        (lambda g, x: _rowsel(torch.exp(g.t() @ x)), "not a GEMM: "),
        (lambda g, x: _rowsel((g.t() @ x) * (g.t() @ x)), "elementwise op with a tensor operand"),
        (lambda g, x: _rowsel((g.t() @ x) + x[:1]), "add with broadcasting"),
        (lambda g, x: _rowsel((x.t() @ g).t()), None),  # (4, 3) = ((3, 5) @ (5, 4))^T
        (lambda g, x: _rowsel((g.t() @ x).reshape(3, 4)), "selected dims mixed with others by a reshape"),
        (lambda g, x: _rowsel(torch.bmm(g.t()[None].expand(2, 4, 5), x[None].expand(2, 5, 3)).sum(0)), None),
    ],
    ids=["gemm-computed-twice", "not-a-gemm", "elementwise", "broadcast-add", "transpose-view", "reshape",
         "batched-sum"],
)
def test_push_or_reason(fn, reason):
    site = _sites(fn, G, X)
    if reason is None:
        assert site.reason is None, site.reason
    else:
        assert site.reason is not None and site.reason.startswith(reason), site.reason


def test_dense_gradient_with_other_users_is_skipped():
    def fn(g, x):
        grad = g.t() @ x
        return _rowsel(grad), grad.sum()

    assert _sites(fn, G, X).reason == "dense gradient has other users"


def test_gradient_from_another_graph_is_skipped():
    site = _sites(lambda grad: _rowsel(grad), torch.randn(4, 3))
    assert site.reason == "gradient computed in another graph (graph break)"


def test_a_broadcast_between_gemm_and_rowsel_is_skipped():
    def fn(g, x):  # a reduced GEMM output broadcast back: no GEMM produces the selected rows
        return _rowsel(torch.bmm(g.t()[None].expand(2, 4, 5), x[None].expand(2, 5, 3)).sum(1, keepdim=True)
                       .expand(2, 4, 3).sum(0))

    assert _sites(fn, G, X).reason == "not a GEMM: aten.expand"


def test_every_reason_is_short_and_fixed():
    fns = [lambda g, x: _rowsel(torch.exp(g.t() @ x)), lambda g, x: _rowsel((g.t() @ x).reshape(3, 4))]
    for fn in fns:
        reason = _sites(fn, G, X).reason
        assert reason and len(reason) < 60 and "\n" not in reason


# -- the rewrite: rho applied once per selected GEMM -------------------------------------------
RHO2 = torch.tensor([0.5, -3.0])
A3, B3 = torch.randn(5, 4, 2), torch.randn(5, 2, 3)  # a bmm's batch dim selected: both operands gathered


def _sel(grad, idx, rho, dim=0):
    return torch.ops.grassfx.rowsel(grad, idx, rho, dim, "w")


def _bmm_rows(g, x):  # a batched GEMM's rows, summed over its batch: group (1, 2)
    return torch.bmm(g.t()[None].expand(2, 4, 5), x[None].expand(2, 5, 3)).sum(0)


@pytest.mark.parametrize("fn, args, gemms, gathers", [
    (lambda g, x, i, r: _sel(g.t() @ x, i, r), (G, X), 1, 1),
    (lambda g, x, i, r: _sel(g.t() @ x, i, r, 1), (G, X), 1, 1),
    (lambda g, x, i, r: _sel((x.t() @ g).t(), i, r), (G, X), 1, 1),
    (lambda g, x, i, r: _sel(g.t() @ x + g.t() @ (2 * x), i, r), (G, X), 2, 2),
    (lambda g, x, i, r: _sel(g.t() @ x - g.t() @ (2 * x), i, r), (G, X), 2, 2),
    (lambda g, x, i, r: _sel((g.t() @ x) / 4.0, i, r), (G, X), 1, 1),
    (lambda g, x, i, r: _sel(_bmm_rows(g, x), i, r), (G, X), 1, 1),
    (lambda g, x, i, r: _sel(torch.bmm(g.t()[None], x[None]).view(4, 3), i, r), (G, X), 1, 1),
    (lambda a, b, i, r: _sel(torch.bmm(a, b), i, r), (A3, B3), 1, 2),
], ids=["rows", "cols", "transposed", "two-gemms", "sub", "div", "bmm-rows", "bmm-batch-1", "bmm-batch"])
def test_rewrite_applies_rho_once_per_selected_gemm(fn, args, gemms, gathers):
    from grassfx.passes import PassContext, settings, sparsify_wgrad

    args = args + (IDX, RHO2)
    gm = make_fx(fn, tracing_mode="fake")(*args)
    muls_before = sum(n.target is torch.ops.aten.mul.Tensor for n in gm.graph.nodes)
    result = sparsify_wgrad(gm.graph, PassContext("g0.backward0", "backward", settings()))
    gm.recompile()
    assert [c.action for c in result.changes] == ["rewrote"]
    torch.testing.assert_close(gm(*args), fn(*args))  # the marker's meaning: rho * grad.index_select(dim, idx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # one mul by rho per selected GEMM, on a gathered operand (the other operand of a
    # batch-dim gather is not scaled); none on the results
    assert sum(t is torch.ops.aten.index.Tensor for t in targets) == gathers
    assert sum(t is torch.ops.aten.mul.Tensor for t in targets) == muls_before + gemms
    gathered = {n for n in gm.graph.nodes if n.target is torch.ops.aten.index.Tensor}
    scaled = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor
              and n.meta.get("grassfx", {}).get("pass") == "sparsify_wgrad"]
    assert len(scaled) == gemms and all(n.args[0] in gathered for n in scaled)
    assert torch.ops.grassfx.rowsel.default not in targets


@pytest.mark.parametrize("fn, args", [
    # autocast's form: a bf16 GEMM under an fp32 gradient; rho must not be rounded to bf16
    (lambda g, x, i, r: _sel((g.t().bfloat16() @ x.bfloat16()).float(), i, r), (G, X)),
    # a division that rounds is not linear in rho
    (lambda g, x, i, r: _sel((g.t() @ x).div(0.3, rounding_mode="floor"), i, r), (G, X)),
    # no plan (a non-linear op before the marker): the dense fallback scales its gather
    (lambda g, x, i, r: _sel(torch.exp(g.t() @ x), i, r), (G, X)),
], ids=["bf16-gemm-fp32-grad", "floor-div", "fallback"])
def test_rho_scales_the_result_where_it_cannot_move_into_the_gemm(fn, args):
    from grassfx.passes import PassContext, settings, sparsify_wgrad

    args = args + (IDX, RHO2 * 1.001)  # not representable in bf16
    gm = make_fx(fn, tracing_mode="fake")(*args)
    sparsify_wgrad(gm.graph, PassContext("g0.backward0", "backward", settings()))
    gm.recompile()
    assert torch.equal(gm(*args), fn(*args))  # rho applied in the marker's dtype, after everything else
    (scaled,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor
                 and n.meta.get("grassfx", {}).get("pass") == "sparsify_wgrad"]
    assert scaled.meta["val"].dtype == torch.float32 and scaled.users and all(u.op == "output" for u in scaled.users)
