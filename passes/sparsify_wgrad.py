"""sparsify_wgrad: compute only the selected rows of each weight gradient.

Matches every ``grassfx::rowsel(grad, idx, rho, dim, name)`` node and pushes the row
(or column) selection down through layout ops, casts, scalar scaling, adds and sums to
the GEMM that produced ``grad``, then removes the dense GEMM::

    before:  g = mm(dYᵀ, X)            # (m, n) = (m, b) @ (b, n)
             c = rowsel(g, idx, rho, 0)
    after:   c = mm(rho[:, None] * dYᵀ[idx], X)   # (r, n) = (r, b) @ (b, n)

rho scales the gathered operand rows (each rule between the GEMM and the marker is linear
in them): Inductor fuses the ``mul`` into the gather's loop, and no pass over the (r x n)
result is left in the graph. Where a GEMM computes in another dtype than the marker's
(autocast: a bf16 GEMM under an fp32 gradient) or a division rounds, rho scales the
result instead, as eager ``rowsel`` does (:func:`.rowpush.foldable`).

Rows of a GEMM output come from the left operand's rows; columns from the right
operand's columns (HF ``Conv1D``, ``proj_dim="cols"``); a bmm's batch dim from both.

Pushes through: permute / t / transpose, view / reshape / _unsafe_view / squeeze /
unsqueeze, alias / clone, dtype casts, mul / div by a scalar, add / sub (a weight used
twice), sum over other dims: the table ``RULES`` holds one :class:`Rule` per op family,
its analysis (``plan``) next to its rewrite (``emit``), in :mod:`.rowpush`. The selection travels as a contiguous *group* of dims, so
a weight viewed with merged or split head dims (``qkv.view(3, heads, hd, d)``) pushes
through as long as its rows stay contiguous and in order.
Never through elementwise ops with tensor operands (that would duplicate work).

MoE expert stacks (``grassfx::expertsel``, rows of each expert of an (E, m, n) weight)
have their own rules, ``EXPERT_RULES`` of :mod:`.sparsify_experts`: a scatter of per-pair
``bmm`` gradients (``W[ids]``) and a ``select_backward`` (``W[e]``) above the 2-D rules.

Guarantees: the graph computes ``rho * grad.index_select(dim, idx)`` (with rho folded,
up to the order of rounding: rho multiplies before the GEMM, in the marker's dtype). A
site it cannot push becomes an explicit gather + scale on the dense gradient (dense fallback)
and is reported as skipped with its reason. Every created node has ``meta["val"]`` and
``meta["grassfx"] = {"pass": "sparsify_wgrad", "weight": name}``; view shapes reuse the
original (possibly symbolic) size arguments.
"""

from __future__ import annotations

import torch.fx as fx

from grassfx.core.ops import EXPERTSEL, ROWSEL
from grassfx.errors import PassError

from . import sparsify_experts as _experts
from .infra import Change, PassContext, PassResult, Skip, graph_fake_mode, meta_val
from .rowpush import PASS, RULES, Emitter, Push, Rule, WgradSite, count_gemms, erase_dead, foldable, plan_push

__all__ = ["sparsify_wgrad", "find_weight_grad_sites", "WgradSite", "Push", "Rule", "RULES", "ROWSEL"]


def find_weight_grad_sites(graph: fx.Graph) -> list:
    """Every rowsel node with its push plan or the reason it has none (pure)."""
    sites = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is EXPERTSEL:
            sites.append(_experts.expert_site(node))
            continue
        if node.op != "call_function" or node.target is not ROWSEL:
            continue
        grad, idx, rho, dim, name = node.args[:5]
        site = WgradSite(node, name, dim, grad, idx, rho)
        if len(grad.users) != 1:
            site.reason = "dense gradient has other users"
        else:
            plan = plan_push(grad, (dim, dim + 1), True)
            if isinstance(plan, str):
                site.reason = plan
            else:
                site.plan, site.gemms = plan, count_gemms(plan)
        sites.append(site)
    return sites


def sparsify_wgrad(graph: fx.Graph, ctx: PassContext) -> PassResult:
    """Rewrite every rowsel site (see the module docstring)."""
    result = PassResult(PASS, graph)
    sites = find_weight_grad_sites(graph)
    if not sites:
        return result
    fake_mode = graph_fake_mode(graph)
    for site in sites:
        try:
            result.changes.append(_rewrite(graph, site, fake_mode, result))
        except Exception as exc:
            raise PassError(PASS, site.rowsel.name, f"{type(exc).__name__}: {exc}", graph=ctx.graph_id) from exc
        result.modified = True
    return result


def _rewrite(graph: fx.Graph, site: WgradSite, fake_mode, result: PassResult) -> Change:
    """Replace one rowsel node by its selected computation (or the dense fallback)."""
    if site.experts:
        return _experts.rewrite_expert_site(graph, site, fake_mode, result)
    fold = site.plan is None or foldable(site.plan, meta_val(site.grad).dtype)
    emitter = Emitter(graph, site, fake_mode, fold_rho=fold)
    with graph.inserting_before(site.rowsel):
        if site.plan is not None:
            out = emitter.emit(site.plan)
            if not fold:
                out = emitter.times_rho(out, site.dim)
            action, detail = "rewrote", f"{site.gemms} dense GEMM(s) -> {site.gemms} selected GEMM(s)"
        else:
            out = emitter.gather(site.grad, site.dim, scaled=True)
            action, detail = "fallback", site.reason
            result.skipped.append(Skip(site.weight, site.rowsel.name, site.reason))
    out.meta["grassfx"]["role"] = "compressed_grad"  # compress_allreduce looks for this
    site.rowsel.replace_all_uses_with(out)
    erased = erase_dead(graph, site.rowsel)
    return Change(site.weight, action, detail, emitter.created, erased)
