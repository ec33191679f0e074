"""compress_allreduce: average compressed gradients across ranks inside the backward graph.

Matches every node that ``sparsify_wgrad`` marked as a compressed gradient
(``meta["grassfx"]["role"] == "compressed_grad"``) when the model trains data-parallel,
and inserts bucketed functional-collective all-reduces::

    before:  c1 = mm(rho1 * dY1ᵀ[idx1], X1)       # (r, n)
             ...                                      # rest of the backward
             return (..., c1, c2, ...)
    after:   flat = cat([c1.view(-1), c2.view(-1)])   # one bucket (<= bucket_bytes)
             ar = all_reduce(flat, "sum", group)      # launched right after the last c_i
             ...                                      # rest of the backward overlaps it
             avg = wait_tensor(ar) / world            # just before the outputs
             return (..., avg[0:k1].view(r, n), ...)

Buckets follow production order (last layers first). Assumes every rank runs the same
graph (checked by grassfx.distributed's configuration fingerprint). Guarantees: each
compressed gradient output equals the mean over ranks of its local value; nothing else
in the graph changes; only r/m of the dense gradient's bytes are communicated.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from grassfx import _compat

from .infra import ALL_REDUCE, Change, PassContext, PassResult, graph_fake_mode, make_node, meta_val

aten = torch.ops.aten
PASS = "compress_allreduce"

__all__ = ["compress_allreduce", "find_compressed_grads"]


def find_compressed_grads(graph: fx.Graph) -> list:
    """Nodes holding a compressed gradient, in graph order (pure)."""
    return [n for n in graph.nodes
            if n.op == "call_function" and (n.meta.get("grassfx") or {}).get("role") == "compressed_grad"]


def _buckets(nodes: list, cap: int) -> list:
    out, cur, size = [], [], 0
    for n in nodes:
        val = meta_val(n)
        cur.append(n)
        size += val.numel() * val.element_size()
        if size >= cap:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def compress_allreduce(graph: fx.Graph, ctx: PassContext) -> PassResult:
    """Insert one all-reduce per bucket of compressed gradients (see module docstring)."""
    result = PassResult(PASS, graph)
    if ctx.group_name is None or ctx.world_size <= 1:
        return result
    nodes = find_compressed_grads(graph)
    if not nodes:
        return result
    fake_mode = graph_fake_mode(graph)
    output = next(n for n in graph.nodes if n.op == "output")
    all_reduce, wait = _compat.functional_all_reduce(), _compat.functional_wait()
    for bucket in _buckets(nodes, ctx.bucket_bytes):
        weights = [n.meta["grassfx"]["weight"] for n in bucket]
        prov = {"pass": PASS, "weight": ",".join(weights)}
        created = []

        def new(target, args, _prov=prov):
            node = make_node(graph, target, args, provenance=_prov, fake_mode=fake_mode)
            created.append(node.name)
            return node

        dtype = meta_val(bucket[0]).dtype
        cursor, pieces = bucket[-1], []
        for n in bucket:  # right after the bucket's last producer, in order
            with graph.inserting_after(cursor):
                cursor = new(aten.reshape.default, (n, [-1]))
            if meta_val(n).dtype != dtype:
                with graph.inserting_after(cursor):
                    cursor = new(torch.ops.prims.convert_element_type.default, (cursor, dtype))
            pieces.append(cursor)
        with graph.inserting_after(cursor):
            flat = new(aten.cat.default, (pieces,))
        with graph.inserting_after(flat):
            reduced = new(all_reduce, (flat, "sum", ctx.group_name))
        with graph.inserting_before(output):
            waited = new(wait, (reduced,))
            mean = new(aten.div.Tensor, (waited, ctx.world_size))
            offset = 0
            for n in bucket:
                val = meta_val(n)
                k = val.numel()
                part = new(aten.slice.Tensor, (mean, 0, offset, offset + k))
                part = new(aten.reshape.default, (part, list(val.shape)))
                if val.dtype != dtype:
                    part = new(torch.ops.prims.convert_element_type.default, (part, val.dtype))
                offset += k
                n.replace_all_uses_with(part, delete_user_cb=lambda user: user.name not in created)
        for w in weights:
            result.changes.append(Change(w, ALL_REDUCE, f"bucket of {len(bucket)} compressed gradient(s)", created))
        result.modified = True
    return result
