"""The per-expert rules of ``sparsify_wgrad``: MoE expert stacks.

Matches every ``grassfx::expertsel(grad, idx, rho, name)`` node: ``grad`` is the dense
(E, m, n) gradient of an expert stack, ``idx`` / ``rho`` are (E, r) (rows of each
expert). Three ways a stack's gradient reaches the marker are rewritten, one
:class:`~passes.sparsify_wgrad.Rule` each (table ``EXPERT_RULES``)::

    bmm over the stack (Llama 4: bmm(x (E, T, k), W (E, k, n)))
      before: c = expertsel(bmm(A, B), idx, rho)                          # (E, m, n)
      after:  c = bmm(gather(A, 1, idx), B) * rho[..., None]              # (E, r, n) = (E, r, T) @ (E, T, n)

    gather (transformers "batched_mm": W[ids] then bmm, one matrix per token-expert pair)
      before: g = index_put(zeros(E, m, n), [ids], bmm(A, B), True)       # (S, m, n) per pair
              c = expertsel(g, idx, rho)
      after:  rows = gather(A, 1, idx[ids])                               # (S, r, k)
              c = index_put(zeros(E, r, n), [ids], bmm(rows, B), True) * rho[..., None]

    Both batched forms also match through dtype casts and transposes of the last two dims
    (rows of the weight = columns of the bmm's ``mat2``), and Inductor's form of a bmm
    with inner size 1, ``mul(A (b, m, 1), B (b, 1, n))``.

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
from typing import Optional, Union

import torch
import torch.fx as fx

from grassfx import _compat

from .infra import Change, PassResult, Skip, meta_val, norm_args
from .rowpush import SAME, Emitter, Push, Rule, WgradSite, count_gemms, erase_dead, plan_push

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["expert_site", "plan_expert_grad", "rewrite_expert_site", "EXPERT_RULES"]


_CASTS = (aten.alias, aten.clone, prims.convert_element_type, aten._to_copy)
_SWAPS = (aten.transpose, aten.permute)


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


# -- batched GEMMs: one matrix per batch entry, rows picked per entry ------------------------
def _swapped(node) -> Optional[bool]:
    """For a transpose/permute of a 3-D value: True if it swaps dims 1 and 2 (keeping dim 0),
    False if it changes nothing, None for any other reordering."""
    args = norm_args(node)
    if _packet(node) is aten.permute:
        perm = [d % 3 for d in args["dims"]]
        return {(0, 2, 1): True, (0, 1, 2): False}.get(tuple(perm))
    pair = {args["dim0"] % 3, args["dim1"] % 3}
    return True if pair == {1, 2} else False if len(pair) == 1 else None


def _gemm_operand(gemm, dim: int) -> Optional[tuple]:
    """``(operand, its dim)`` of a batched GEMM that carries ``dim`` (1 or 2) of its output.

    ``bmm(A, B)``: rows come from ``A``, columns from ``B``. Inductor writes a bmm with inner
    size 1 (an outer product per batch entry) as ``mul(A (b, m, 1), B (b, 1, n))``: the
    operand whose ``dim`` is not broadcast.
    """
    pk = _packet(gemm)
    if pk is aten.bmm:
        return ("self", 1) if dim == 1 else ("mat2", 2)
    if pk is not aten.mul:
        return None
    args = norm_args(gemm)
    shapes = {k: _shape(args[k]) if isinstance(args[k], fx.Node) else None for k in ("self", "other")}
    if any(sh is None or len(sh) != 3 for sh in shapes.values()):
        return None
    for mine, other in (("self", "other"), ("other", "self")):
        if shapes[other][dim] == 1 and shapes[mine][dim] != 1:
            return mine, dim
    return None


def _batched_chain(node, allowed_users: int = 1):
    """``(chain, gemm, dim)``: the casts and 1<->2 transposes from ``node`` down to a batched
    GEMM, and which dim of the GEMM's output the selected dim 1 of ``node`` is; or a reason."""
    chain, dim, inner = [], 1, node
    while True:
        users = allowed_users if inner is node else 1
        if len(inner.users) != users:
            return "dense gradient has other users"
        pk = _packet(inner)
        if pk in _CASTS:
            chain.append(inner)
        elif pk in _SWAPS and _swapped(inner) is not None:
            chain.append(inner)
            dim = 3 - dim if _swapped(inner) else dim
        elif _gemm_operand(inner, dim) is not None:
            return chain, inner, dim
        else:
            return f"expert gradient not from a per-expert GEMM: {_producer(inner)}"
        inner = norm_args(inner)[_compat.op_schema(inner.target).arguments[0].name]
        if _shape(inner) is None or len(_shape(inner)) != 3:
            return "per-expert gradient from another layout"


def _emit_batched(em, top, rows_of, allowed_users: int = 1):
    """``top`` with dim 1 of each batch entry ``b`` narrowed to rows ``rows_of[b]`` (a (b, r) node)."""
    chain, gemm, dim = _batched_chain(top, allowed_users)
    args = norm_args(gemm)
    name, _ = _gemm_operand(gemm, dim)
    x = args[name]
    other = 3 - dim  # gather's index is rows_of broadcast over the operand's other matrix dim
    size = [-1, -1, -1]
    size[other] = _shape(x)[other]
    where = em.node(aten.expand.default, (em.node(aten.unsqueeze.default, (rows_of, other)), size))
    new = {k: args[k] for k in ("self", "mat2", "other") if k in args}
    new[name] = em.node(aten.gather.default, (x, dim, where))  # (b, r, k) or (b, k, r)
    order = ("self", "mat2") if _packet(gemm) is aten.bmm else ("self", "other")
    value = em.node(gemm.target, tuple(new[k] for k in order))  # (b, r, n) = (b, r, k) @ (b, k, n)
    for node in reversed(chain):
        value = _replay(em, node, value)
    return value


def _replay(em, node, value):
    """``node`` (a cast or a transpose/permute) applied to ``value`` instead of its input."""
    args = norm_args(node)
    push = Push(node, (1, 2), SAME)
    return SAME.emit(em, push, args, {_compat.op_schema(node.target).arguments[0].name: value})


# -- plans and emits ---------------------------------------------------------------------------
def _plan_index_put(node, group, args, shape, pk):
    """``index_put(zeros(E, m, n), [ids], V, accumulate=True)``: rows ``idx[ids[b]]`` of each V[b]."""
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
    found = _batched_chain(values, len(values.users))
    if isinstance(found, str):
        return found
    return Push(node, group, EXPERT_GATHER, [("values", None, (1, 2))])


def _emit_index_put(em, plan, args, inner):
    ids, values = args["indices"][0], args["values"]
    pair_rows = em.node(aten.index.Tensor, (em.site.idx, [ids]))  # (S, r): rows of each pair's expert
    value = _emit_batched(em, values, pair_rows, len(values.users))  # (S, r, n)
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
    return em.node(plan.node.target, (new_zeros, [ids], value, True))  # (E, r, n)


def _plan_batched(node, group, args, shape, pk):
    """A batched GEMM over the experts (``bmm(x, W)`` with W (E, k, n)), under casts and transposes."""
    found = _batched_chain(node)
    return found if isinstance(found, str) else Push(node, group, EXPERT_BATCHED, [])


def _emit_batched_rule(em, plan, args, inner):
    return _emit_batched(em, plan.node, em.site.idx)  # (E, r, n)


def _plan_select_backward(node, group, args, shape, pk):
    """``select_backward(g, (E, m, n), 0, e)``: rows ``idx[e]`` of the 2-D gradient ``g``."""
    if args["dim"] != 0 or not isinstance(args["index"], int):
        return "expert gradient selected along another dim or by a tensor index"
    sub = plan_push(args["grad_output"], (0, 1), False)
    if isinstance(sub, str):
        return sub
    return Push(node, group, EXPERT_SELECT, [("grad_output", sub, (0, 1))])


def _emit_select_backward(em, plan, args, inner):
    size = list(args["input_sizes"])
    size[1] = em.r
    return em.node(plan.node.target, (inner["grad_output"], size, 0, args["index"]))


EXPERT_GATHER = Rule("expert_gather", _plan_index_put, _emit_index_put)
EXPERT_BATCHED = Rule("expert_batched", _plan_batched, _emit_batched_rule)
EXPERT_SELECT = Rule("expert_select", _plan_select_backward, _emit_select_backward)

#: How an expert stack's gradient reaches its marker, and the rule that selects rows of each expert.
EXPERT_RULES = {
    aten.index_put: EXPERT_GATHER,  # W[ids] per token-expert pair (transformers "batched_mm")
    aten.select_backward: EXPERT_SELECT,  # W[e] with a constant e
    aten.bmm: EXPERT_BATCHED, aten.mul: EXPERT_BATCHED,  # bmm over the experts (e.g. Llama 4)
    aten.transpose: EXPERT_BATCHED, aten.permute: EXPERT_BATCHED,
    prims.convert_element_type: EXPERT_BATCHED, aten._to_copy: EXPERT_BATCHED,
    aten.alias: EXPERT_BATCHED, aten.clone: EXPERT_BATCHED,
}


def expert_site(node: fx.Node):
    """The ``WgradSite`` of one expertsel node, with its plan or the reason it has none."""
    grad, idx, rho, name = node.args[:4]
    site = WgradSite(node, name, 1, grad, idx, rho, experts=True)
    plan = plan_expert_grad(grad) if len(grad.users) == 1 else "dense gradient has other users"
    if isinstance(plan, str):
        site.reason = plan
    else:
        site.plan = plan
        sub = plan.children[0][1] if plan.children else None
        site.gemms = count_gemms(sub) if sub is not None else 1
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
    em = Emitter(graph, site, fake_mode, fold_rho=False)  # rho scales the (E, r, n) result below
    em.r = _shape(site.idx)[1]
    with graph.inserting_before(site.rowsel):
        if site.plan is not None and site.plan.rule is EXPERT_SELECT:
            # below the select: the 2-D rules, gathering rows idx[e] of this expert
            idx_e = em.node(aten.select.int, (site.idx, 0, norm_args(site.plan.node)["index"]))
            inner = Emitter(graph, dataclasses.replace(site, idx=idx_e), fake_mode, fold_rho=False)
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
    erased = erase_dead(graph, site.rowsel)
    return Change(site.weight, action, detail, em.created, erased)


def _scale(em, x, rho):
    dtype = meta_val(x).dtype
    if meta_val(rho).dtype != dtype:
        rho = em.node(prims.convert_element_type.default, (rho, dtype))
    return em.node(aten.mul.Tensor, (x, em.node(aten.unsqueeze.default, (rho, 2))))  # (E, r, n) * (E, r, 1)
