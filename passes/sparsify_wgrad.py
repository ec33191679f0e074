"""sparsify_wgrad: compute only the selected rows of each weight gradient.

Matches every ``grassfx::rowsel(grad, idx, rho, dim, name)`` node and pushes the row
(or column) selection down through layout ops, casts, scalar scaling, adds and sums to
the GEMM that produced ``grad``, then removes the dense GEMM::

    before:  g = mm(dYᵀ, X)            # (m, n) = (m, b) @ (b, n)
             c = rowsel(g, idx, rho, 0)
    after:   c = mm(dYᵀ[idx], X) * rho[:, None]   # (r, n) = (r, b) @ (b, n)

Rows of a GEMM output come from the left operand's rows; columns from the right
operand's columns (HF ``Conv1D``, ``proj_dim="cols"``); a bmm's batch dim from both.

Pushes through: permute / t / transpose, view / reshape / _unsafe_view / squeeze /
unsqueeze (when the selected dim survives as one dim), alias / clone, dtype casts,
mul / div by a scalar, add / sub (a weight used twice), sum over other dims.
Never through elementwise ops with tensor operands (that would duplicate work).

Guarantees: the graph computes exactly ``rho * grad.index_select(dim, idx)``. A site it
cannot push becomes an explicit gather + scale on the dense gradient (dense fallback)
and is reported as skipped with its reason. Every created node has ``meta["val"]`` and
``meta["grassfx"] = {"pass": "sparsify_wgrad", "weight": name}``; view shapes reuse the
original (possibly symbolic) size arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx

from .infra import PassContext, PassResult, Change, Skip, make_node, meta_val, norm_args, prod, same_size

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["sparsify_wgrad", "find_weight_grad_sites", "WgradSite", "Push", "ROWSEL"]

PASS = "sparsify_wgrad"


def _rowsel_op():
    import grassfx.ops  # noqa: F401  (registers grassfx::rowsel)

    return torch.ops.grassfx.rowsel.default


ROWSEL = None  # resolved lazily: no import-time work

_VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.squeeze, aten.unsqueeze}
_SAME = {aten.alias, aten.clone, prims.convert_element_type, aten._to_copy}
_SCALE = {aten.mul, aten.div}
_ADD = {aten.add, aten.sub}


@dataclass
class Push:
    """How to produce ``node.index_select(dim, idx)`` without computing ``node`` densely."""

    node: fx.Node
    dim: int
    kind: str  # "gemm" | "layout" | "view" | "same" | "scale" | "add" | "sum"
    children: list = field(default_factory=list)  # (operand name, Push) pairs


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


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _shape(node) -> Optional[tuple]:
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _view_in_dim(in_shape, out_shape, out_dim) -> Optional[int]:
    """The input dim that becomes ``out_dim`` unchanged through a view, if any."""
    want_before = prod(out_shape[:out_dim])
    for d in range(len(in_shape)):
        if same_size(in_shape[d], out_shape[out_dim]) and same_size(prod(in_shape[:d]), want_before):
            return d
    return None


def _is_scalar(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    val = meta_val(x)
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _plan(node, dim: int, root: bool) -> Union[Push, str]:
    """Analyse ``node`` selected along ``dim``: a Push tree, or a short reason."""
    if not isinstance(node, fx.Node):
        return "not a graph value"
    if not root and len(node.users) != 1:
        return "dense gradient has other users"
    pk = _packet(node)
    if pk is None:
        return f"not a GEMM: {node.op} {node.target}"
    args = norm_args(node)
    shape = _shape(node)
    if pk is aten.mm:
        child = ("self", None) if dim == 0 else ("mat2", None)
        return Push(node, dim, "gemm", [child])
    if pk is aten.bmm:
        if dim == 0:
            return Push(node, dim, "gemm", [("self", None), ("mat2", None)])
        return Push(node, dim, "gemm", [("self", None)] if dim == 1 else [("mat2", None)])
    if pk is aten.permute:
        dims = [d % len(shape) for d in args["dims"]]
        sub = _plan(args["self"], dims[dim], False)
        return sub if isinstance(sub, str) else Push(node, dim, "layout", [("self", sub)])
    if pk is aten.t:
        sub = _plan(args["self"], 1 - dim if len(shape) == 2 else dim, False)
        return sub if isinstance(sub, str) else Push(node, dim, "layout", [("self", sub)])
    if pk is aten.transpose:
        d0, d1 = args["dim0"] % len(shape), args["dim1"] % len(shape)
        in_dim = d1 if dim == d0 else d0 if dim == d1 else dim
        sub = _plan(args["self"], in_dim, False)
        return sub if isinstance(sub, str) else Push(node, dim, "layout", [("self", sub)])
    if pk in _VIEWS:
        in_dim = _view_in_dim(_shape(args["self"]), shape, dim)
        if in_dim is None:
            return "selected dim merged or split by a reshape"
        sub = _plan(args["self"], in_dim, False)
        return sub if isinstance(sub, str) else Push(node, dim, "view", [("self", sub)])
    if pk in _SAME:
        sub = _plan(args["self"], dim, False)
        return sub if isinstance(sub, str) else Push(node, dim, "same", [("self", sub)])
    if pk in _SCALE:
        if not _is_scalar(args["other"]) or _shape(args["self"]) != shape:
            return "elementwise op with a tensor operand"
        sub = _plan(args["self"], dim, False)
        return sub if isinstance(sub, str) else Push(node, dim, "scale", [("self", sub)])
    if pk in _ADD:
        kids = []
        for name in ("self", "other"):
            if _shape(args[name]) != shape:
                return "add with broadcasting"
            sub = _plan(args[name], dim, False)
            if isinstance(sub, str):
                return sub
            kids.append((name, sub))
        return Push(node, dim, "add", kids)
    if pk is aten.sum and args.get("dim") is not None:
        in_shape = _shape(args["self"])
        reduced = sorted(d % len(in_shape) for d in args["dim"])
        if args.get("keepdim"):
            in_dim = dim
        else:
            kept = [d for d in range(len(in_shape)) if d not in reduced]
            in_dim = kept[dim]
        if in_dim in reduced:
            return "selected dim is reduced"
        sub = _plan(args["self"], in_dim, False)
        return sub if isinstance(sub, str) else Push(node, dim, "sum", [("self", sub)])
    return f"not a GEMM: {pk._qualified_op_name if hasattr(pk, '_qualified_op_name') else pk}"


def _count_gemms(plan: Push) -> int:
    own = 1 if plan.kind == "gemm" else 0
    return own + sum(_count_gemms(c) for _, c in plan.children if c is not None)


def find_weight_grad_sites(graph: fx.Graph) -> list:
    """Every rowsel node with its push plan or the reason it has none (pure)."""
    rowsel = _rowsel_op()
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not rowsel:
            continue
        grad, idx, rho, dim, name = node.args[:5]
        site = WgradSite(node, name, dim, grad, idx, rho)
        if len(grad.users) != 1:
            site.reason = "dense gradient has other users"
        else:
            plan = _plan(grad, dim, True)
            if isinstance(plan, str):
                site.reason = plan
            else:
                site.plan, site.gemms = plan, _count_gemms(plan)
        sites.append(site)
    return sites


class _Emitter:
    """Builds the selected computation for one site, just before its rowsel node."""

    def __init__(self, graph, site: WgradSite, fake_mode):
        self.graph, self.site, self.fake_mode = graph, site, fake_mode
        self.prov = {"pass": PASS, "weight": site.weight}
        self.created = []
        self.r = _shape(site.idx)[0]

    def node(self, target, args, kwargs=None):
        n = make_node(self.graph, target, args, kwargs, provenance=self.prov, fake_mode=self.fake_mode)
        self.created.append(n.name)
        return n

    def gather(self, x: fx.Node, dim: int) -> fx.Node:
        return self.node(aten.index.Tensor, (x, [None] * dim + [self.site.idx]))

    def emit(self, plan: Push) -> fx.Node:
        node, args = plan.node, norm_args(plan.node)
        if plan.kind == "gemm":
            new = {"self": args["self"], "mat2": args["mat2"]}
            for operand, _ in plan.children:
                # mm rows come from self's dim 0, columns from mat2's dim 1; a bmm's
                # dim d (0: batch, 1: rows, 2: cols) lives at dim d of its operand(s).
                new[operand] = self.gather(args[operand], plan.dim)
            return self.node(node.target, (new["self"], new["mat2"]))
        inner = {name: self.emit(child) for name, child in plan.children}
        if plan.kind == "view":
            size = list(args.get("size", args.get("shape", [])) or [])
            if node.target.overloadpacket in (aten.view, aten.reshape, aten._unsafe_view):
                size[plan.dim] = self.r
                return self.node(node.target, (inner["self"], size))
        new_args = [inner.get(a.name, args.get(a.name)) for a in node.target._schema.arguments
                    if a.name in args and not a.kwarg_only]
        new_kwargs = {a.name: args[a.name] for a in node.target._schema.arguments
                      if a.kwarg_only and a.name in node.kwargs}
        return self.node(node.target, tuple(new_args), new_kwargs)

    def scale(self, x: fx.Node) -> fx.Node:
        site = self.site
        rho = site.rho
        dtype = meta_val(x).dtype
        if meta_val(rho).dtype != dtype:
            rho = self.node(prims.convert_element_type.default, (rho, dtype))
        ndim = meta_val(x).dim()
        for d in range(ndim):
            if d != site.dim:
                rho = self.node(aten.unsqueeze.default, (rho, d))
        return self.node(aten.mul.Tensor, (x, rho))


def _erase_dead(graph: fx.Graph, start: fx.Node) -> list:
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


def _fake_mode(graph: fx.Graph):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def sparsify_wgrad(graph: fx.Graph, ctx: PassContext) -> PassResult:
    """Rewrite every rowsel site (see the module docstring)."""
    result = PassResult(PASS, graph)
    sites = find_weight_grad_sites(graph)
    if not sites:
        return result
    fake_mode = _fake_mode(graph)
    for site in sites:
        emitter = _Emitter(graph, site, fake_mode)
        with graph.inserting_before(site.rowsel):
            if site.plan is not None:
                picked = emitter.emit(site.plan)
                action, detail = "rewrote", f"{site.gemms} dense GEMM(s) -> {site.gemms} selected GEMM(s)"
            else:
                picked = emitter.gather(site.grad, site.dim)
                action, detail = "fallback", site.reason
                result.skipped.append(Skip(site.weight, site.rowsel.name, site.reason))
            out = emitter.scale(picked)
        site.rowsel.replace_all_uses_with(out)
        erased = _erase_dead(graph, site.rowsel)
        result.changes.append(Change(site.weight, action, detail, emitter.created, erased))
        result.modified = True
    return result
