"""How a row selection moves down a backward graph to the GEMM that makes it.

The machinery ``sparsify_wgrad`` and ``sparsify_experts`` share: :class:`Rule` (one per op
family: its analysis ``plan`` next to its rewrite ``emit``), the table :data:`RULES`,
:func:`plan_push` (the pure analysis: a :class:`Push` tree or a short reason),
:class:`Emitter` (builds the selected computation) and :func:`erase_dead`. See
:mod:`.sparsify_wgrad` for what is matched and guaranteed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from grassfx import _compat

from .infra import make_node, meta_val, norm_args, prod, same_size

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["Rule", "Push", "WgradSite", "RULES", "GEMM", "SAME", "SCALE", "plan_push", "foldable", "count_gemms",
           "Emitter", "erase_dead", "PASS"]

PASS = "sparsify_wgrad"  # the provenance of every node the emitter makes


@dataclass(frozen=True)
class Rule:
    """How a row selection moves through one family of ops: the analysis and its rewrite.

    ``plan(node, group, args, shape, pk)`` returns a :class:`Push` (the selection can move
    to the node's operands) or a short reason; ``emit(emitter, push, args, inner)`` builds
    the selected node from ``inner``, the already selected operands by schema name.
    """

    kind: str
    plan: Callable
    emit: Callable


@dataclass
class Push:
    """How to produce ``node`` with the dims ``group`` (a contiguous range, flattened)
    selected by ``idx`` without computing ``node`` densely. The result has ``node``'s
    shape with ``group`` replaced by one dim of size r."""

    node: fx.Node
    group: tuple  # (start, end) of the selected, flattened dims of node's output
    rule: Rule
    children: list = field(default_factory=list)  # (operand name, Push or None, operand group)
    eaten: tuple = ()  # permute only: size-1 input dims swallowed by the group

    @property
    def kind(self) -> str:
        return self.rule.kind


@dataclass
class WgradSite:
    """One rowsel node and what the analysis found for it."""

    rowsel: fx.Node
    weight: str
    dim: int
    grad: fx.Node
    idx: fx.Node
    rho: fx.Node
    plan: Optional[Push] = None
    reason: Optional[str] = None  # why it cannot be pushed (None when plan is set)
    gemms: int = 0  # dense GEMMs the plan removes
    experts: bool = False  # an expertsel node: idx/rho are (E, r), rows of each expert (sparsify_experts)


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _shape(node) -> Optional[tuple]:
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _view_in_group(in_shape, out_shape, group) -> Optional[tuple]:
    """The input dims that flatten to the same elements as ``group`` of the output."""
    s, e = group
    before, size = prod(out_shape[:s]), prod(out_shape[s:e])
    for a in range(len(in_shape)):
        if not same_size(prod(in_shape[:a]), before):
            continue
        for b in range(a + 1, len(in_shape) + 1):
            if same_size(prod(in_shape[a:b]), size):
                return (a, b)
    return None


def _is_scalar(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    val = meta_val(x)
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _wrap(node, group, rule, operand, sub_group) -> Union[Push, str]:
    sub = plan_push(operand[1], sub_group, False)
    return sub if isinstance(sub, str) else Push(node, group, rule, [(operand[0], sub, sub_group)])


def _as_perm(pk, args, ndim) -> list:
    if pk is aten.permute:
        return [d % ndim for d in args["dims"]]
    perm = list(range(ndim))
    if pk is aten.t:
        return perm[::-1] if ndim == 2 else perm
    d0, d1 = args["dim0"] % ndim, args["dim1"] % ndim
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _collapse(ndim: int, group: tuple) -> list:
    """Map each old dim to its index once ``group`` is collapsed into one dim."""
    s, e = group
    return [d if d < s else s if d < e else d - (e - s - 1) for d in range(ndim)]


# -- the rules: one plan and one emit per op family ----------------------------------------
def _plan_gemm(node, group, args, shape, pk) -> Union[Push, str]:
    if pk is aten.mm:
        if group == (0, 1):
            return Push(node, group, GEMM, [("self", None, (0, 1))])
        if group == (1, 2):
            return Push(node, group, GEMM, [("mat2", None, (1, 2))])
        return "selected rows span both GEMM dims"
    if group == (0, 1):
        return Push(node, group, GEMM, [("self", None, (0, 1)), ("mat2", None, (0, 1))])
    if group == (1, 2):
        return Push(node, group, GEMM, [("self", None, (1, 2))])
    if group == (2, 3):
        return Push(node, group, GEMM, [("mat2", None, (2, 3))])
    if group == (0, 2) and same_size(shape[0], 1):
        return Push(node, group, GEMM, [("self", None, (1, 2))])  # a bmm of batch 1: an mm
    return "selected rows span a batched GEMM's batch dim"


def _emit_gemm(em, plan, args, inner) -> fx.Node:
    node = plan.node
    if node.target.overloadpacket is aten.bmm and plan.group == (0, 2):  # batch-1 bmm: an mm on rows
        left = em.gather(em.node(aten.squeeze.dim, (args["self"], 0)), 0, scaled=True)
        right = em.node(aten.squeeze.dim, (args["mat2"], 0))
        return em.node(aten.mm.default, (left, right))  # (r, n) = (r, k) @ (k, n)
    new = {"self": args["self"], "mat2": args["mat2"]}
    for i, (operand, _, (start, _end)) in enumerate(plan.children):
        # rho scales the selected rows once: a batch-dim selection gathers both operands
        new[operand] = em.gather(args[operand], start, scaled=i == 0)
    return em.node(node.target, (new["self"], new["mat2"]))  # (r, n) = (r, k) @ (k, n)


def _plan_permute(node, group, args, shape, pk) -> Union[Push, str]:
    s, e = group
    perm = _as_perm(pk, args, len(shape))
    in_shape = _shape(args["self"])
    src = perm[s:e]
    lo, hi = min(src), max(src) + 1
    # size-1 input dims inside [lo, hi) that are not in the group do not change the
    # flattened order; they are "eaten" and restored by a reshape
    eaten = tuple(d for d in range(lo, hi) if d not in src)
    big = [d for d in src if not same_size(in_shape[d], 1)]
    if any(not same_size(in_shape[d], 1) for d in eaten) or big != sorted(big):
        return "selected dims reordered by a permute"
    if eaten and not all(isinstance(x, int) for x in shape):
        return "permute with symbolic shape"
    push = _wrap(node, group, PERMUTE, ("self", args["self"]), (lo, hi))
    if not isinstance(push, str):
        push.eaten = eaten
    return push


def _emit_permute(em, plan, args, inner) -> fx.Node:
    node, (s, e) = plan.node, plan.group
    (_, _, in_group), = plan.children
    out_shape = _shape(node)
    ndim = len(out_shape)
    perm = _as_perm(node.target.overloadpacket, args, ndim)
    in_map = _collapse(ndim, in_group)
    new_perm = [in_map[perm[j]] for j in range(ndim) if not (s < j < e) and perm[j] not in plan.eaten]
    out = em.node(aten.permute.default, (inner["self"], new_perm))
    if plan.eaten:  # put the swallowed size-1 dims back where they were
        size = [int(d) for d in out_shape[:s]] + [em.r] + [int(d) for d in out_shape[e:]]
        out = em.node(aten.reshape.default, (out, size))
    return out


def _plan_view(node, group, args, shape, pk) -> Union[Push, str]:
    s, e = group
    in_group = _view_in_group(_shape(args["self"]), shape, group)
    if in_group is None:
        return "selected dims mixed with others by a reshape"
    if pk in (aten.squeeze, aten.unsqueeze) and (in_group[1] - in_group[0]) != (e - s):
        return "squeeze inside the selected dims"
    return _wrap(node, group, VIEW, ("self", args["self"]), in_group)


def _emit_view(em, plan, args, inner) -> fx.Node:
    node, (s, e) = plan.node, plan.group
    pk, x = node.target.overloadpacket, inner["self"]
    out_shape = _shape(node)
    if pk in (aten.view, aten.reshape, aten._unsafe_view):
        size = list(args.get("size", args.get("shape")))
        return em.node(node.target, (x, size[:s] + [em.r] + size[e:]))
    (_, _, in_group), = plan.children
    dim_arg = args["dim"]
    if pk is aten.unsqueeze:
        return em.node(aten.unsqueeze.default, (x, _collapse(len(out_shape), plan.group)[dim_arg % len(out_shape)]))
    in_nd = len(_shape(args["self"]))
    in_map = _collapse(in_nd, in_group)
    dims = dim_arg if isinstance(dim_arg, (list, tuple)) else [dim_arg]
    return em.node(aten.squeeze.dims, (x, [in_map[d % in_nd] for d in dims]))


def _plan_same(node, group, args, shape, pk) -> Union[Push, str]:
    first = _compat.op_schema(node.target).arguments[0].name  # "self", or "a" for prims casts
    return _wrap(node, group, SAME, (first, args[first]), group)


def _emit_same(em, plan, args, inner) -> fx.Node:
    """The same op on the selected operands (every other argument unchanged)."""
    node = plan.node
    schema = _compat.op_schema(node.target)
    new_args = [inner.get(a.name, args.get(a.name)) for a in schema.arguments if a.name in args and not a.kwarg_only]
    new_kwargs = {a.name: args[a.name] for a in schema.arguments if a.kwarg_only and a.name in node.kwargs}
    return em.node(node.target, tuple(new_args), new_kwargs)


def _plan_scale(node, group, args, shape, pk) -> Union[Push, str]:
    if not _is_scalar(args["other"]) or _shape(args["self"]) != shape:
        return "elementwise op with a tensor operand"
    return _wrap(node, group, SCALE, ("self", args["self"]), group)


def _plan_add(node, group, args, shape, pk) -> Union[Push, str]:
    kids = []
    for name in ("self", "other"):
        if _shape(args[name]) != shape:
            return "add with broadcasting"
        sub = plan_push(args[name], group, False)
        if isinstance(sub, str):
            return sub
        kids.append((name, sub, group))
    return Push(node, group, ADD, kids)


def _emit_add(em, plan, args, inner) -> fx.Node:
    extra = {"alpha": args["alpha"]} if args.get("alpha", 1) != 1 else None
    return em.node(plan.node.target, (inner["self"], inner["other"]), extra)


def _plan_sum(node, group, args, shape, pk) -> Union[Push, str]:
    s, e = group
    if not args.get("dim"):
        return f"not a GEMM: {_compat.op_name(pk)}"
    in_shape = _shape(args["self"])
    reduced = sorted(d % len(in_shape) for d in args["dim"])
    kept = list(range(len(in_shape))) if args.get("keepdim") else [d for d in range(len(in_shape)) if d not in reduced]
    src = kept[s:e]
    if any(d in reduced for d in src) or any(src[i] != src[0] + i for i in range(len(src))):
        return "selected dims are reduced"
    return _wrap(node, group, SUM, ("self", args["self"]), (src[0], src[-1] + 1))


def _emit_sum(em, plan, args, inner) -> fx.Node:
    (_, _, in_group), = plan.children
    in_nd = len(_shape(args["self"]))
    in_map = _collapse(in_nd, in_group)
    dims = sorted({in_map[d % in_nd] for d in args["dim"]})
    kwargs = {"dtype": args["dtype"]} if args.get("dtype") is not None else None
    return em.node(aten.sum.dim_IntList, (inner["self"], dims, bool(args.get("keepdim"))), kwargs)


GEMM = Rule("gemm", _plan_gemm, _emit_gemm)
PERMUTE = Rule("permute", _plan_permute, _emit_permute)
VIEW = Rule("view", _plan_view, _emit_view)
SAME = Rule("same", _plan_same, _emit_same)
SCALE = Rule("scale", _plan_scale, _emit_same)
ADD = Rule("add", _plan_add, _emit_add)
SUM = Rule("sum", _plan_sum, _emit_sum)

#: Every op the selection moves through, and the rule that moves it (overload packets).
RULES = {
    aten.mm: GEMM, aten.bmm: GEMM,
    aten.permute: PERMUTE, aten.t: PERMUTE, aten.transpose: PERMUTE,
    aten.view: VIEW, aten.reshape: VIEW, aten._unsafe_view: VIEW, aten.squeeze: VIEW, aten.unsqueeze: VIEW,
    aten.alias: SAME, aten.clone: SAME, prims.convert_element_type: SAME, aten._to_copy: SAME,
    aten.mul: SCALE, aten.div: SCALE,
    aten.add: ADD, aten.sub: ADD,
    aten.sum: SUM,
}


# -- find ---------------------------------------------------------------------------------
def plan_push(node, group: tuple, root: bool) -> Union[Push, str]:
    """Analyse ``node`` with dims ``group`` selected: a Push tree, or a short reason."""
    if not isinstance(node, fx.Node):
        return "not a graph value"
    if not root and len(node.users) != 1:
        return "dense gradient has other users"
    pk = _packet(node)
    if node.op == "placeholder":
        return "gradient computed in another graph (graph break)"
    if pk is None:
        return f"not a GEMM: {node.op} {node.target}"
    rule = RULES.get(pk)
    if rule is None:
        return f"not a GEMM: {_compat.op_name(pk)}"
    return rule.plan(node, group, norm_args(node), _shape(node), pk)


def foldable(plan: Push, dtype: torch.dtype) -> bool:
    """Whether rho can scale the gathered operand rows instead of the result: every GEMM
    computes in the marker's dtype (no cast, e.g. autocast's bf16 GEMM under an fp32
    gradient, would round rho and the scaled rows to a lower precision than eager's
    ``rowsel``) and every op between is linear (no division with a rounding mode)."""
    if plan.rule is GEMM and meta_val(plan.node).dtype != dtype:
        return False
    if plan.rule is SCALE and norm_args(plan.node).get("rounding_mode") is not None:
        return False
    return all(foldable(c, dtype) for _, c, _ in plan.children if c is not None)


def count_gemms(plan: Push) -> int:
    own = 1 if plan.rule is GEMM else 0
    return own + sum(count_gemms(c) for _, c, _ in plan.children if c is not None)


class Emitter:
    """Builds the selected computation for one site, just before its rowsel node."""

    def __init__(self, graph, site: WgradSite, fake_mode, *, fold_rho: bool):
        self.graph, self.site, self.fake_mode = graph, site, fake_mode
        self.prov = {"pass": PASS, "weight": site.weight}
        self.created = []
        self.r = _shape(site.idx)[0]
        # fold_rho: rho scales the rows gathered for each selected GEMM (once per path to
        # the output: every rule between is linear in them); else the caller scales the result
        self.fold_rho = fold_rho

    def node(self, target, args, kwargs=None):
        n = make_node(self.graph, target, args, kwargs, provenance=self.prov, fake_mode=self.fake_mode)
        self.created.append(n.name)
        return n

    def gather(self, x: fx.Node, dim: int, scaled: bool = False) -> fx.Node:
        """Rows ``idx`` of ``x`` along ``dim`` (``index``), times rho when ``scaled`` and folding rho."""
        picked = self.node(aten.index.Tensor, (x, [None] * dim + [self.site.idx]))
        return self.times_rho(picked, dim) if scaled and self.fold_rho else picked

    def emit(self, plan: Push) -> fx.Node:
        """The selected value of ``plan.node``: operands first, then the node's own rule."""
        inner = {name: self.emit(child) for name, child, _ in plan.children if child is not None}
        return plan.rule.emit(self, plan, norm_args(plan.node), inner)

    def times_rho(self, x: fx.Node, dim: int) -> fx.Node:
        """``x * rho`` with rho broadcast along ``dim`` of ``x``."""
        rho = self.site.rho
        dtype = meta_val(x).dtype
        if meta_val(rho).dtype != dtype:
            rho = self.node(prims.convert_element_type.default, (rho, dtype))
        for d in range(meta_val(x).dim()):
            if d != dim:
                rho = self.node(aten.unsqueeze.default, (rho, d))
        return self.node(aten.mul.Tensor, (x, rho))


def erase_dead(graph: fx.Graph, start: fx.Node) -> list:
    """Erase ``start`` and its now-unused producers (only call_function nodes)."""
    erased, stack = [], [start]
    while stack:
        node = stack.pop()
        if node.op != "call_function" or node.users or node.graph is not graph:
            continue
        inputs = [a for a in node.all_input_nodes]
        erased.append(node.name)
        graph.erase_node(node)
        stack.extend(inputs)
    return erased
