"""compact_embedding_grad: accumulate a low-precision embedding's gradient over the batch's rows.

Inductor decomposes the backward of a bf16/fp16 ``nn.Embedding`` into a float32
accumulator of the whole table, converted down at the end::

    before:  acc = full([V, h], 0, float32)                          # V x h x 4 bytes
             acc = index_put(acc, [idx], dY.float(), accumulate=True)  # (masked for padding)
             gW  = acc.to(bf16)

At most ``T = idx.numel()`` of the ``V`` rows are nonzero, so the float32 sums are formed
in a ``(T, h)`` buffer instead, one slot per distinct token, and written into the
low-precision gradient once::

    after:   s, perm = sort(idx.view(T))                  # equal tokens become neighbours
             slot = pad(cumsum(s[1:] != s[:-1]), (1, 0))  # the distinct-token number of each
             sums = index_put(zeros(T, h, f32), [slot], dY.view(T, h)[perm], accumulate=True)
             row  = index_put(zeros(T, int64), [slot], s)  # each slot's token (equal writes)
             gW   = index_put(zeros(V, h, bf16), [row], sums.to(bf16), accumulate=True)

Every gradient row is still the float32 sum of its tokens' rows rounded once to the
low-precision dtype, as before (only the order of the float32 additions can differ).
Unused slots keep token 0 and a zero sum, so they add an exact zero to row 0. Tokens the
decomposition masked out (``padding_idx``) get a zero row and token 0. The float32
transient drops from ``V x h`` to about ``T x h`` elements: 250 MiB to a few MiB for a
32000 x 2048 bf16 table at 64 tokens a step.

Matches static shapes, a zero float32 ``full`` used by nothing else, and an accumulating
``index_put`` whose only use is a conversion to bf16 or fp16: by structure, so also the
same ops written by hand or traced again by compiled autograd (the rewrite keeps
``index_put``'s meaning there too: negative indices count from the end).
It leaves alone (with a ``Skip``) the sites where ``3 * T > V`` (the batch's float32
buffers, up to three of ``T x h``, would not be much smaller than the table's), and
those with no indices, indices other than int32/int64, or a mask or values not shaped
one per index. Float32 tables have no such accumulator (their
gradient is the accumulator) and never match. The pass reads nothing but the graph, so
it applies to any model grassfx compiles with Inductor; ``aot_eager`` keeps
``embedding_dense_backward`` whole and has nothing to match.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .infra import Change, PassContext, PassResult, Skip, graph_fake_mode, make_node, meta_val, norm_args

aten = torch.ops.aten
prims = torch.ops.prims
PASS = "compact_embedding_grad"
LOW = (torch.bfloat16, torch.float16)

__all__ = ["compact_embedding_grad", "find_embedding_accumulators"]


def _accumulate_ops() -> dict:
    """``{op: takes a mask}`` of the accumulating index_put forms a decomposition emits."""
    ops = {aten.index_put.default: False, aten._unsafe_index_put.default: False}
    masked = getattr(aten, "_unsafe_masked_index_put_accumulate", None)
    if masked is not None:
        ops[masked.default] = True
    return ops


def _is_zero_f32_full(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.full.default):
        return False
    args = norm_args(node)
    return args.get("fill_value") == 0 and args.get("dtype") == torch.float32 and len(args["size"]) == 2


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def find_embedding_accumulators(graph: fx.Graph) -> list:
    """``(full, index_put, convert)`` triples of the pattern in the module docstring (pure).

    The pattern is matched by structure, not by where it came from (under compiled autograd
    the backward is traced again and loses ``meta["original_aten"]``), so the rewrite keeps
    ``index_put``'s meaning for any such site: negative indices count from the end.
    """
    ops, found = _accumulate_ops(), []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        args = norm_args(node)
        if not ops[node.target] and not args.get("accumulate"):
            continue
        full = args["self"]
        indices = args["indices"]
        if not _is_zero_f32_full(full) or len(full.users) != 1 or len(indices) != 1 or indices[0] is None:
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        conv = users[0]
        if conv.target is not prims.convert_element_type.default or norm_args(conv)["dtype"] not in LOW:
            continue
        found.append((full, node, conv))
    return found


def compact_embedding_grad(graph: fx.Graph, ctx: PassContext) -> PassResult:
    """Rewrite every match (see the module docstring)."""
    result = PassResult(PASS, graph)
    sites = find_embedding_accumulators(graph)
    if not sites:
        return result
    fake_mode = graph_fake_mode(graph)
    ops = _accumulate_ops()
    for full, put, conv in sites:
        args = norm_args(put)
        idx, values = args["indices"][0], args["values"]
        mask = args.get("mask") if ops[put.target] else None
        table, vals, index = meta_val(full), meta_val(values), meta_val(idx)
        name = f"embedding {list(table.shape)}"
        V, h = table.shape
        if not _static(V, h, *index.shape, *vals.shape):
            result.skipped.append(Skip(name, put.name, "dynamic shapes"))
            continue
        T = index.numel()
        if index.dtype not in (torch.int32, torch.int64):
            result.skipped.append(Skip(name, put.name, "indices are not int32 or int64"))
            continue
        if T == 0:
            result.skipped.append(Skip(name, put.name, "no indices"))
            continue
        if tuple(vals.shape) != (*index.shape, h) or vals.dtype != torch.float32:
            result.skipped.append(Skip(name, put.name, "values are not one float32 row per index"))
            continue
        if mask is not None and tuple(meta_val(mask).shape) != (*index.shape, 1):
            result.skipped.append(Skip(name, put.name, "mask is not one flag per index"))
            continue
        if 3 * T > V:
            result.skipped.append(Skip(name, put.name, "batch rows not under a third of the table"))
            continue
        low = norm_args(conv)["dtype"]
        created = []
        prov = {"pass": PASS, "weight": name}

        def new(target, *a, **kw):
            node = make_node(graph, target, a, kw, provenance=prov, fake_mode=fake_mode)
            created.append(node.name)
            return node

        with graph.inserting_before(conv):
            tok = new(aten.reshape.default, idx, [T])
            rows_in = new(aten.reshape.default, values, [T, h])
            if mask is not None:
                keep = new(aten.reshape.default, mask, [T])
                tok = new(aten.where.ScalarOther, keep, tok, 0)
                rows_in = new(aten.where.ScalarOther, new(aten.reshape.default, mask, [T, 1]), rows_in, 0.0)
            tok = new(aten.where.self, new(aten.lt.Scalar, tok, 0), new(aten.add.Tensor, tok, V), tok)  # as index_put
            ordered = new(aten.sort.default, tok)
            s = new(operator.getitem, ordered, 0)
            perm = new(operator.getitem, ordered, 1)
            starts = new(aten.ne.Tensor, new(aten.slice.Tensor, s, 0, 1, T), new(aten.slice.Tensor, s, 0, 0, T - 1))
            slot = new(aten.constant_pad_nd.default, new(aten.cumsum.default, starts, 0, dtype=torch.int64), [1, 0], 0)
            gathered = new(aten.index.Tensor, rows_in, [perm])
            sums = new(aten.index_put.default, _zeros(new, [T, h], torch.float32, table.device), [slot], gathered, True)
            row = new(aten.index_put.default, _zeros(new, [T], index.dtype, table.device), [slot], s, False)
            narrow = new(prims.convert_element_type.default, sums, low)
            out = new(aten.index_put.default, _zeros(new, [V, h], low, table.device), [row], narrow, True)
        conv.replace_all_uses_with(out)
        erased = [conv.name, put.name, full.name]
        for node in (conv, put, full):
            graph.erase_node(node)
        detail = f"float32 accumulator {V}x{h} -> {T}x{h} ({low})"
        result.changes.append(Change(name, "compacted", detail, created, erased))
        result.modified = True
    return result


def _zeros(new, size, dtype, device):
    return new(aten.full.default, size, 0, dtype=dtype, device=device)
