"""The per-expert rules of ``sparsify_wgrad``: MoE expert stacks.

Matches every ``grassfx::expertsel(grad, idx, rho, name)`` node: ``grad`` is the dense
(E, m, n) gradient of an expert stack, ``idx`` / ``rho`` are (E, r) (rows of each
expert). Two ways a stack's gradient reaches the marker are rewritten, one
:class:`~passes.sparsify_wgrad.Rule` each (table ``EXPERT_RULES``)::

    gather (transformers "batched_mm": W[ids] then bmm, one matrix per token-expert pair)
      before: g = index_put(zeros(E, m, n), [ids], bmm(A, B), True)       # (S, m, n) per pair
              c = expertsel(g, idx, rho)
      after:  rows = gather(A, 1, idx[ids])                               # (S, r, k)
              c = index_put(zeros(E, r, n), [ids], bmm(rows, B), True) * rho[..., None]

    one expert (W[e] for a constant e)
      before: g = select_backward(mm(dYᵀ, X), (E, m, n), 0, e)
      after:  select_backward(mm(dYᵀ[idx[e]], X), (E, r, n), 0, e) * rho[..., None]
              (below the select, every 2-D rule of sparsify_wgrad applies with idx[e])

Anything else (a grouped GEMM as an opaque custom op, expert matmuls outside the graph)
becomes the dense fallback -- ``rho * take_along_dim(grad, idx, 1)`` as a ``gather`` --
reported as skipped with its reason. Guarantees: the graph computes exactly
``expertsel(grad, idx, rho)``; created nodes carry ``meta["val"]`` and provenance.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Union

import torch
import torch.fx as fx

from grassfx import _compat

from .infra import Change, PassResult, Skip, meta_val, norm_args
# sparsify_wgrad imports this module after its own rules are defined (at its end)
from .sparsify_wgrad import SAME, Push, Rule, WgradSite, _count_gemms, _Emitter, _erase_dead, _plan

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["expertsel_op", "expert_site", "plan_expert_grad", "rewrite_expert_site", "EXPERT_RULES"]


def expertsel_op():
    import grassfx.instrument.experts  # noqa: F401  (registers grassfx::expertsel)

    return torch.ops.grassfx.expertsel.default


_CASTS = (aten.alias, aten.clone, prims.convert_element_type, aten._to_copy)


def _packet(node):
    return getattr(node.target, "overloadpacket", None) if isinstance(node, fx.Node) and node.op == "call_function" else None


def _shape(node):
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_zeros(node) -> bool:
    pk = _packet(node)
    if pk in (aten.new_zeros, aten.zeros):
        return True
    return pk is aten.full and norm_args(node).get("fill_value") == 0


# -- plans ----------------------------------------------------------------------------------
def _plan_index_put(node, group, args, shape, pk):
    """``index_put(zeros(E, m, n), [ids], V, accumulate=True)``: select rows of each pair of V."""
    indices, values = args["indices"], args["values"]
    if not _is_zeros(args["self"]) or len(args["self"].users) != 1:
        return "expert gradient not accumulated into zeros"
    if not args.get("accumulate") or len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return "expert gradient scattered by more than one index"
    vshape = _shape(values)
    if vshape is None or len(vshape) != 3 or vshape[1:] != shape[1:]:
        return "expert gradient scattered from another layout"
    # the zeros may read the per-pair gradient for its dtype and device (new_zeros)
    if any(user not in (node, args["self"]) for user in values.users):
        return "dense gradient has other users"
    casts, gemm = _pair_gemm(values)
    if len(gemm.users) != (1 if casts else len(values.users)) or _row_operand(gemm) is None:
        name = _compat.op_name(_packet(gemm)) if _packet(gemm) else getattr(gemm, "op", "constant")
        return f"per-pair expert gradient is not a bmm: {name}"
    return Push(node, group, EXPERT_GATHER, [("values", None, (1, 2))])


def _row_operand(gemm):
    """The operand of a per-pair GEMM that carries the rows (dim 1) of its output, or None.

    ``bmm(A, B)``: ``A``. Inductor writes a bmm with inner size 1 (``W[ids] @ x[:, :, None]``'s
    weight gradient, an outer product per pair) as ``mul(A (S, m, 1), B (S, 1, n))``: the
    operand whose dim 1 is not broadcast.
    """
    pk = _packet(gemm)
    if pk is aten.bmm:
        return "self"
    if pk is not aten.mul:
        return None
    args = norm_args(gemm)
    shapes = {k: _shape(args[k]) if isinstance(args[k], fx.Node) else None for k in ("self", "other")}
    if any(sh is None or len(sh) != 3 for sh in shapes.values()):
        return None
    for rows, other in (("self", "other"), ("other", "self")):
        if shapes[other][1] == 1 and shapes[rows][1] != 1:
            return rows
    return None


def _pair_gemm(values) -> tuple:
    """``(casts, producer)``: the dtype casts / aliases above ``values`` and what they wrap."""
    casts, inner = [], values
    while _packet(inner) in _CASTS and (inner is values or len(inner.users) == 1):  # values: users checked
        casts.append(inner)
        inner = norm_args(inner)[_compat.op_schema(inner.target).arguments[0].name]
    return casts, inner


def _plan_select_backward(node, group, args, shape, pk):
    """``select_backward(g, (E, m, n), 0, e)``: rows ``idx[e]`` of the 2-D gradient ``g``."""
    if args["dim"] != 0 or not isinstance(args["index"], int):
        return "expert gradient selected along another dim or by a tensor index"
    sub = _plan(args["grad_output"], (0, 1), False)
    if isinstance(sub, str):
        return sub
    return Push(node, group, EXPERT_SELECT, [("grad_output", sub, (0, 1))])


# -- emits ----------------------------------------------------------------------------------
def _emit_index_put(em, plan, args, inner):
    casts, gemm = _pair_gemm(args["values"])
    gargs = norm_args(gemm)
    which = _row_operand(gemm)
    left = gargs[which]
    k = _shape(left)[2]
    pair_idx = em.node(aten.index.Tensor, (em.site.idx, [args["indices"][0]]))  # (S, r): rows of each pair
    where = em.node(aten.expand.default, (em.node(aten.unsqueeze.default, (pair_idx, 2)), [-1, -1, k]))
    rows = em.node(aten.gather.default, (left, 1, where))  # (S, r, k)
    if _packet(gemm) is aten.bmm:
        value = em.node(aten.bmm.default, (rows, gargs["mat2"]))  # (S, r, n) = (S, r, k) @ (S, k, n)
    else:  # an outer product per pair: (S, r, n) = (S, r, 1) * (S, 1, n)
        operands = {"self": gargs["self"], "other": gargs["other"], which: rows}
        value = em.node(gemm.target, (operands["self"], operands["other"]))
    for cast in reversed(casts):
        value = _replay(em, cast, value)
    zeros = args["self"]
    zargs = norm_args(zeros)
    size = list(zargs.get("size"))
    size[1] = em.r
    kwargs = {key: zeros.kwargs[key] for key in zeros.kwargs if key != "size"}
    if _packet(zeros) is aten.new_zeros:
        new_zeros = em.node(zeros.target, (value, size), kwargs)  # dtype and device of the new value
    elif _packet(zeros) is aten.zeros:
        new_zeros = em.node(zeros.target, (size,), kwargs)
    else:
        new_zeros = em.node(zeros.target, (size, 0), {k: v for k, v in kwargs.items() if k != "fill_value"})
    return em.node(plan.node.target, (new_zeros, [args["indices"][0]], value, True))


def _replay(em, cast, value):
    args = norm_args(cast)
    push = Push(cast, (1, 2), SAME)
    return SAME.emit(em, push, args, {_compat.op_schema(cast.target).arguments[0].name: value})


def _emit_select_backward(em, plan, args, inner):
    size = list(args["input_sizes"])
    size[1] = em.r
    return em.node(plan.node.target, (inner["grad_output"], size, 0, args["index"]))


EXPERT_GATHER = Rule("expert_gather", _plan_index_put, _emit_index_put)
EXPERT_SELECT = Rule("expert_select", _plan_select_backward, _emit_select_backward)

#: How an expert stack's gradient reaches its marker, and the rule that selects rows of each expert.
EXPERT_RULES = {aten.index_put: EXPERT_GATHER, aten.select_backward: EXPERT_SELECT}


def expert_site(node: fx.Node):
    """The ``WgradSite`` of one expertsel node, with its plan or the reason it has none."""
    grad, idx, rho, name = node.args[:4]
    site = WgradSite(node, name, 1, grad, idx, rho, experts=True)
    plan = plan_expert_grad(grad) if len(grad.users) == 1 else "dense gradient has other users"
    if isinstance(plan, str):
        site.reason = plan
    else:
        site.plan = plan
        sub = plan.children[0][1]
        site.gemms = _count_gemms(sub) if sub is not None else 1
    return site


def plan_expert_grad(grad) -> Union[object, str]:
    """The Push of an expert stack's dense gradient ``grad`` (rows of dim 1), or a reason."""
    if not isinstance(grad, fx.Node):
        return "not a graph value"
    if grad.op == "placeholder":
        return ("gradient computed in another graph (graph break: a loop over the experts hit breaks on "
                "data-dependent routing; transformers' experts_implementation='batched_mm' stays in one graph)")
    pk = _packet(grad)
    rule = EXPERT_RULES.get(pk)
    if rule is None:
        return f"expert gradient not from a per-expert GEMM: {_producer(grad)}"
    return rule.plan(grad, (1, 2), norm_args(grad), _shape(grad), pk)


def _producer(node) -> str:
    """The op behind ``node``, looking through layout ops and tuple outputs (for reasons)."""
    seen = node
    while isinstance(seen, fx.Node) and seen.op == "call_function":
        pk = _packet(seen)
        if pk in (aten.transpose, aten.permute, aten.t, aten.view, aten.reshape, aten.alias, aten.clone) or (
                pk is None and seen.target is operator.getitem):
            seen = seen.args[0]
            continue
        break
    if not isinstance(seen, fx.Node) or seen.op != "call_function":
        return str(getattr(seen, "op", seen))
    pk = _packet(seen)
    name = _compat.op_name(pk) if pk is not None else str(seen.target)
    return name if name.startswith("aten.") else f"{name} (an opaque op)"


# -- rewrite --------------------------------------------------------------------------------
def rewrite_expert_site(graph: fx.Graph, site, fake_mode, result: PassResult) -> Change:
    """Replace one expertsel node by its per-expert computation (or the dense fallback)."""
    em = _Emitter(graph, site, fake_mode)
    em.r = _shape(site.idx)[1]
    with graph.inserting_before(site.rowsel):
        if site.plan is not None and site.plan.rule is EXPERT_SELECT:
            # below the select: the 2-D rules, gathering rows idx[e] of this expert
            idx_e = em.node(aten.select.int, (site.idx, 0, norm_args(site.plan.node)["index"]))
            inner = _Emitter(graph, dataclasses.replace(site, idx=idx_e), fake_mode)
            picked_e = inner.emit(site.plan.children[0][1])
            em.created += inner.created
            picked = _emit_select_backward(em, site.plan, norm_args(site.plan.node), {"grad_output": picked_e})
        elif site.plan is not None:
            picked = em.emit(site.plan)
        else:
            n = _shape(site.grad)[2]
            where = em.node(aten.expand.default, (em.node(aten.unsqueeze.default, (site.idx, 2)), [-1, -1, n]))
            picked = em.node(aten.gather.default, (site.grad, 1, where))  # (E, r, n)
            result.skipped.append(Skip(site.weight, site.rowsel.name, site.reason))
        out = _scale(em, picked, site.rho)
    if site.plan is not None:
        action, detail = "rewrote", f"{site.gemms} dense expert GEMM(s) -> selected rows of each expert"
    else:
        action, detail = "fallback", site.reason
    out.meta["grassfx"]["role"] = "compressed_grad"
    site.rowsel.replace_all_uses_with(out)
    erased = _erase_dead(graph, site.rowsel)
    return Change(site.weight, action, detail, em.created, erased)


def _scale(em, x, rho):
    dtype = meta_val(x).dtype
    if meta_val(rho).dtype != dtype:
        rho = em.node(prims.convert_element_type.default, (rho, dtype))
    return em.node(aten.mul.Tensor, (x, em.node(aten.unsqueeze.default, (rho, 2))))  # (E, r, n) * (E, r, 1)
