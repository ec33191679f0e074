"""compact_embedding_grad: a bf16/fp16 embedding's gradient without a float32 table.

Oracle: the float64 sum of each token's upstream rows, rounded once to the embedding's
dtype (what Inductor's float32 accumulator computes, up to the order of its additions).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import grassfx
from grassfx import _compat
from grassfx.debug.memory import track_memory
from grassfx.passes import PassContext, compact_embedding_grad, settings
from grassfx.passes.compact_embedding_grad import find_embedding_accumulators

from conftest import llama_batch, make_llama


class _Pass(_compat.custom_graph_pass_base()):
    """Runs the pass on each post-grad graph of a plain torch.compile and keeps its results."""

    def __init__(self, enabled=True):
        self.enabled, self.results, self.matches = enabled, [], 0

    def __call__(self, graph):
        self.matches += len(find_embedding_accumulators(graph))
        if self.enabled:
            self.results.append(compact_embedding_grad(graph, PassContext("test", "backward", settings())))

    def uuid(self):
        return f"compact-embedding-grad-test-{self.enabled}"


def _compiled_loss(emb, upstream, pass_):
    """``ids -> (emb(ids).float() * upstream).sum()``, compiled with ``pass_`` after grad."""
    torch._dynamo.reset()

    def loss(x):
        return (emb(x).float() * upstream).sum()

    return torch.compile(loss, options={"post_grad_custom_pre_pass": pass_, "fx_graph_cache": False})


def _embedding_grad(emb, ids, upstream, pass_):
    """The compiled gradient of ``(emb(ids).float() * upstream).sum()`` w.r.t. the table."""
    emb.weight.grad = None
    _compiled_loss(emb, upstream, pass_)(ids).backward()
    return emb.weight.grad


def _oracle(V, ids, upstream, dtype, padding_idx=None):
    acc = torch.zeros(V, upstream.shape[-1], dtype=torch.float64)
    flat, rows = ids.reshape(-1), upstream.reshape(-1, upstream.shape[-1]).double()
    keep = flat != padding_idx if padding_idx is not None else torch.ones_like(flat, dtype=torch.bool)
    acc.index_add_(0, flat[keep].long(), rows[keep])
    return acc.to(dtype)


def _ulps_apart(got, want):
    """Largest distance in units of the dtype's spacing at ``want``'s magnitude."""
    eps = torch.finfo(want.dtype).eps
    scale = want.double().abs().clamp_min(torch.finfo(want.dtype).tiny) * eps
    return ((got.double() - want.double()).abs() / scale).max().item()


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype, id_dtype", [(torch.bfloat16, torch.int64), (torch.float16, torch.int64),
                                             (torch.bfloat16, torch.int32)])
@pytest.mark.parametrize("padding_idx", [None, 0, 5])
def test_matches_float64_oracle(dtype, id_dtype, padding_idx, device):
    torch.manual_seed(0)
    V, h = 400, 8
    emb = nn.Embedding(V, h, padding_idx=padding_idx).to(device, dtype)
    ids = torch.randint(0, V, (3, 11), dtype=id_dtype)
    ids[0, :6] = 5  # a token seen many times
    ids[1, 0] = 0  # token 0 present (unused slots also point at row 0)
    ids[2, -3:] = V - 1
    upstream = torch.randn(3, 11, h)
    pass_ = _Pass()
    got = _embedding_grad(emb, ids.to(device), upstream.to(device), pass_).cpu()
    changes = [c for r in pass_.results for c in r.changes]
    assert len(changes) == 1 and changes[0].action == "compacted"
    assert f"{V}x{h} -> {ids.numel()}x{h}" in changes[0].detail
    want = _oracle(V, ids, upstream, dtype, padding_idx)
    assert got.dtype == dtype
    assert torch.equal(got != 0, want != 0)  # untouched rows (and the padding row) stay zero
    assert _ulps_apart(got, want) <= 1.0  # rounded once from a float32 sum


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_equals_the_uncompacted_graph(scale_grad_by_freq):
    """Inductor's own float32 table and the compacted sums agree bit for bit where the float32
    sums are exact (dyadic values); with ``scale_grad_by_freq`` within one bf16 spacing."""
    torch.manual_seed(1)
    emb = nn.Embedding(300, 16, scale_grad_by_freq=scale_grad_by_freq).to(torch.bfloat16)
    ids = torch.randint(0, 40, (4, 16))  # many repeats
    upstream = torch.randint(-64, 64, (4, 16, 16)) * 2.0**-6
    ours = _embedding_grad(emb, ids, upstream, _Pass()).clone()
    plain = _Pass(enabled=False)
    theirs = _embedding_grad(emb, ids, upstream, plain)
    assert plain.matches == 1  # the pattern is what Inductor emits
    if scale_grad_by_freq:
        assert _ulps_apart(ours, theirs) <= 1.0
    else:
        assert torch.equal(ours, theirs)


def test_hand_written_accumulation_keeps_index_puts_meaning():
    """The same ops written by hand match too (compiled autograd re-traces the backward without
    provenance); negative indices count from the end, as in index_put: -1 and V-1 are one row,
    its float32 sum rounded once."""
    V, h = 400, 8

    def f(vals, idx):
        return torch.zeros(V, h, dtype=torch.float32).index_put((idx,), vals, accumulate=True).to(torch.bfloat16)

    idx = torch.tensor([-1, V - 1, 3, 5])
    vals = torch.tensor([1 + 2.0**-8, 2.0**-8, 1.0, 1.0])[:, None].expand(4, h).contiguous()
    pass_ = _Pass()
    got = torch.compile(f, options={"post_grad_custom_pre_pass": pass_, "fx_graph_cache": False})(vals, idx)
    assert sum(len(r.changes) for r in pass_.results) == 1
    want = f(vals, idx)
    assert torch.equal(got, want)
    assert (want[V - 1] == 1 + 2.0**-7).all()  # 1 + 2^-8 + 2^-8 rounded once; twice would give 1.0


def test_an_empty_batch_is_skipped():
    emb = nn.Embedding(300, 8).to(torch.bfloat16)
    ids = torch.zeros(2, 0, dtype=torch.long)
    pass_ = _Pass()
    got = _embedding_grad(emb, ids, torch.randn(2, 0, 8), pass_)
    assert [s.reason for r in pass_.results for s in r.skipped] == ["no indices"]
    assert torch.equal(got, torch.zeros_like(got))


def test_leaves_fp32_and_large_batches_alone():
    torch.manual_seed(0)
    emb32 = nn.Embedding(300, 8)
    ids = torch.randint(0, 300, (2, 8))
    pass32 = _Pass()
    _embedding_grad(emb32, ids, torch.randn(2, 8, 8), pass32)
    assert pass32.matches == 0 and not any(r.modified for r in pass32.results)

    emb = nn.Embedding(30, 8).to(torch.bfloat16)  # 3 * 16 tokens > 30 rows
    ids = torch.randint(0, 30, (2, 8))
    pass_ = _Pass()
    got = _embedding_grad(emb, ids, torch.randn(2, 8, 8), pass_)
    skips = [s for r in pass_.results for s in r.skipped]
    assert [s.reason for s in skips] == ["batch rows not under a third of the table"]
    assert not any(r.modified for r in pass_.results)
    assert got.dtype == torch.bfloat16


def test_no_float32_table_is_allocated():
    """Allocation accounting: the largest buffer of the step is no longer V x h float32."""
    torch.manual_seed(0)
    V, h = 20000, 64
    emb = nn.Embedding(V, h).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 16))
    upstream = torch.randn(2, 16, h)
    largest = {}
    for enabled in (False, True):
        compiled = _compiled_loss(emb, upstream, _Pass(enabled))
        compiled(ids).backward()  # compile outside the count
        emb.weight.grad = None
        with track_memory() as mem:
            compiled(ids).backward()
        largest[enabled] = max(n for _, n in mem.events)
        emb.weight.grad = None
    assert largest[False] >= V * h * 4  # Inductor's own decomposition: the float32 table
    assert largest[True] == V * h * 2  # only the bf16 gradient itself


def test_grassfx_model_in_bf16_uses_the_pass():
    """A bf16 Llama through grassfx.compile: compacted, same gradient as with the pass disabled."""
    model = make_llama(vocab_size=600).to(torch.bfloat16)
    batch = llama_batch(batch=2, seq=16, vocab=600)
    grads = {}
    for disabled in (False, True):
        copy_ = copy.deepcopy(model)
        m = grassfx.compile(copy_, rank=8, update_freq=100)
        with pytest.MonkeyPatch.context() as mp:
            if disabled:
                mp.setenv("GRASSFX_DISABLE", "compact_embedding_grad")
            settings.cache_clear()
            for _ in range(2):  # the first step refreshes eagerly; the second is compiled
                m.zero_grad(set_to_none=True)
                m(**batch).loss.backward()
        settings.cache_clear()
        grads[disabled] = copy_.model.embed_tokens.weight.grad.clone()
        compacted = [c for c in m.compile_report.changes() if c.action == "compacted"]
        assert len(compacted) == (0 if disabled else 1)
        torch._dynamo.reset()
    assert _ulps_apart(grads[False], grads[True]) <= 1.0
