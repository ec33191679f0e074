"""The compiled path: rewritten graphs agree with eager grassfx and hold no dense wgrad."""

from __future__ import annotations

import copy

import pytest
import torch

import grassfx

import zoo
from conftest import llama_batch, make_gpt2, make_llama


def _pair(net, backend, **kw):
    eager = grassfx.compile(copy.deepcopy(net), backend="eager", **kw)
    compiled = grassfx.compile(net, backend=backend, record=True, refresh="compiled", **kw)  # the refresh graph too
    return eager, compiled


def _grads(model):
    return {s.name: s.handle.grad.clone() for s in model.sites if s.handle.grad is not None}


def _dense_wgrad_gemms(model, frame=None):
    """Backward-graph GEMMs (after the passes) whose output is a projected weight's shape."""
    shapes = {tuple(model.weight_of(s).shape) for s in model.sites if not s.full}
    shapes |= {tuple(reversed(sh)) for sh in shapes}
    found = []
    for rec in model.compile_report.records:
        if rec.kind != "backward" or (frame is not None and not rec.graph_id.startswith(f"g{frame}.")):
            continue
        ops = rec.stages[-1].ops_after
        found += [(rec.graph_id, op, sh) for op, sh, made_by in ops
                  if op in ("mm", "bmm") and made_by is None and sh and tuple(sh[-2:]) in shapes]
    return found


def _normal_frame(model):
    """The frame id of the non-refresh training graph (the one with rowsel sites)."""
    frames = {g.graph_id.split(".")[0][1:] for g in model.compile_report.graphs if g.changes()}
    assert len(frames) == 1, frames
    return frames.pop()


def _run_steps(eager, compiled, batches, loss_fn, opt_kw=None, strict_steps=None):
    """Train both models; compare gradients for ``strict_steps`` steps (all by default)
    and the selected rows at every step. Later steps drift at the ulp level, which
    Adam's normalisation amplifies, so long runs compare loss curves instead."""
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2, **(opt_kw or {})) for m in (eager, compiled)]
    losses = {id(eager): [], id(compiled): []}
    for step, batch in enumerate(batches):
        for m, opt in zip((eager, compiled), opts):
            loss = loss_fn(m, batch)
            loss.backward()
            losses[id(m)].append(loss.item())
        for se, sc in zip(eager.sites, compiled.sites):
            assert torch.equal(se.idx, sc.idx), se.name
        ge, gc = _grads(eager), _grads(compiled)
        assert ge.keys() == gc.keys()
        for k in ge if strict_steps is None or step < strict_steps else ():
            torch.testing.assert_close(gc[k], ge[k], rtol=1e-4, atol=1e-5, msg=k)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return losses[id(eager)], losses[id(compiled)]


def _all_rewritten(model):
    changes = model.compile_report.changes()
    projected = {s.name for s in model.sites if not s.full}
    rewritten = {c.weight for c in changes if c.action == "rewrote"}
    fallback = {c.weight: c.detail for c in changes if c.action != "rewrote"}
    return projected, rewritten, fallback


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_zoo_matches_eager_and_drops_dense_wgrad(backend):
    torch.manual_seed(0)
    eager, compiled = _pair(zoo.Zoo(), backend, rank=4, update_freq=2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, 12, generator=g) for _ in range(3)]  # refresh, normal, refresh
    _run_steps(eager, compiled, batches, lambda m, x: m(x))
    projected, rewritten, fallback = _all_rewritten(compiled)
    assert not fallback, fallback
    assert rewritten == projected
    assert _dense_wgrad_gemms(compiled, _normal_frame(compiled)) == []
    assert compiled.compile_report.frames == 2  # one refresh graph, one normal graph


def test_cols_selection_and_gpt2_conv1d_aot_eager():
    eager, compiled = _pair(make_gpt2(), "aot_eager", rank=8, proj_dim="cols", update_freq=2)
    batches = [llama_batch(i, batch=3, seq=10, vocab=80) for i in range(3)]  # 30 tokens: no size clash
    _run_steps(eager, compiled, batches, lambda m, b: m(**b).loss)
    projected, rewritten, fallback = _all_rewritten(compiled)
    assert rewritten == projected and not fallback
    assert {s.dim for s in compiled.sites} == {1}
    assert _dense_wgrad_gemms(compiled, _normal_frame(compiled)) == []
    assert torch._dynamo.utils.counters["graph_break"] == {}


@pytest.mark.parametrize("backend, selection", [
    ("aot_eager", "top_r"),
    ("aot_eager", "multinorm"),  # rho != 1: applied in float32 after the bf16 GEMM, as eagerly
    pytest.param("inductor", "top_r", marks=pytest.mark.slow),
])
def test_autocast_bf16(backend, selection):
    torch.manual_seed(0)
    eager, compiled = _pair(zoo.Shared(), backend, rank=4, update_freq=2, selection=selection)

    def loss_fn(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().pow(2).mean()

    g = torch.Generator().manual_seed(0)
    _run_steps(eager, compiled, [torch.randn(7, 16, generator=g) for _ in range(3)], loss_fn)
    projected, rewritten, fallback = _all_rewritten(compiled)
    assert rewritten == projected and not fallback


@pytest.mark.parametrize("dynamic", [True, None])
def test_dynamic_sequence_lengths_aot_eager(dynamic):
    torch.manual_seed(0)
    eager, compiled = _pair(zoo.Heads(), "aot_eager", rank=4, update_freq=100, dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, s, 16, generator=g) for s in (5, 5, 7, 9, 11)]
    _run_steps(eager, compiled, batches, lambda m, x: m(x).pow(2).mean())
    projected, rewritten, fallback = _all_rewritten(compiled)
    assert rewritten == projected and not fallback
    # refresh graph + normal graph (+ at most one re-trace when automatic dynamic kicks in)
    assert compiled.compile_report.frames <= 3


def test_changing_idx_never_recompiles():
    torch.manual_seed(0)
    model = grassfx.compile(zoo.Shared(), rank=4, update_freq=2, selection="multinorm", backend="aot_eager",
                            refresh="compiled")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    seen = []
    for step in range(8):
        model(torch.randn(5, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        seen.append(model.sites[0].idx.clone())
    assert len({tuple(s.tolist()) for s in seen}) > 1  # rows did change
    assert model.compile_report.frames == 2


@pytest.mark.slow
@pytest.mark.parametrize("refresh", ["eager", "compiled"])
def test_refresh_windows_on_a_compiled_tiny_llama_never_recompile(refresh):
    """Through three refresh windows: the library's default (refresh steps eager) compiles one
    training graph; ``refresh="compiled"`` (what ``grassfx train`` runs) a refresh graph at the
    first step and the training graph at the second; nothing after either."""
    from grassfx import _compat

    torch.manual_seed(0)
    model = grassfx.compile(make_llama(), rank=4, update_freq=2, backend="inductor", refresh=refresh)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    rows, graphs = [], []
    for step in range(7):  # refreshes at steps 0, 2, 4, 6
        b = llama_batch(step)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        rows.append(tuple(model.sites[0].idx.tolist()))
        graphs.append(_compat.compiled_graph_count())
    assert len(set(rows)) > 1  # the rows did change
    assert graphs[1] == graphs[-1]  # nothing compiled after the first normal step
    assert model.compile_report.frames == (1 if refresh == "eager" else 2)


def test_unpushable_use_is_reported_and_correct():
    torch.manual_seed(0)
    eager, compiled = _pair(zoo.Sliced(), "aot_eager", rank=4, targets=["w", "fc.weight"], update_freq=2)
    g = torch.Generator().manual_seed(0)
    _run_steps(eager, compiled, [torch.randn(5, 8, generator=g) for _ in range(2)], lambda m, x: m(x))
    projected, rewritten, fallback = _all_rewritten(compiled)
    assert rewritten == {"fc.weight"}
    assert "w" in fallback and "not a GEMM" in fallback["w"]


@pytest.mark.slow
def test_tiny_llama_inductor_20_steps_matches_eager():
    eager, compiled = _pair(make_llama(), "inductor", rank=8, update_freq=5, selection="multinorm",
                            targets=["*_proj", "lm_head"])  # the head too, on request
    batches = [llama_batch(i, batch=3, seq=10) for i in range(20)]  # 30 tokens: no size clash
    le, lc = _run_steps(eager, compiled, batches, lambda m, b: m(**b).loss, strict_steps=6)
    assert max(abs(a - b) for a, b in zip(le, lc)) < 1e-4
    projected, rewritten, fallback = _all_rewritten(compiled)
    assert len(projected) == 15 and rewritten == projected and not fallback
    assert _dense_wgrad_gemms(compiled, _normal_frame(compiled)) == []
    assert compiled.compile_report.frames == 2  # 4 refreshes, still two graphs
    assert torch._dynamo.utils.counters["graph_break"] == {}


# 0 decay: the compiled step leaves decay out; keep_overlap + rewarmup: per-row step counts
# that differ between rows; "twice": rho in the update
@pytest.mark.parametrize("weight_decay, moments, rewarmup, rho_scaling",
                         [(0.1, "reset", 0, "once"), (0.0, "keep_overlap", 2, "twice")])
def test_compiled_adamw_step_matches_eager_loop_without_recompiles(weight_decay, moments, rewarmup, rho_scaling):
    import torch._dynamo.utils as dyn_utils

    torch.manual_seed(0)
    net = zoo.Shared()
    models = [grassfx.compile(copy.deepcopy(net), rank=4, selection="multinorm", update_freq=3, moments=moments,
                              backend="eager") for _ in range(2)]
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=weight_decay, compiled=c,
                                rewarmup=rewarmup, rho_scaling=rho_scaling)
            for m, c in zip(models, (False, True))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in opts]
    g = torch.Generator().manual_seed(0)
    dyn_utils.counters.clear()
    for _ in range(8):  # refreshes at 0, 3, 6; the learning rate changes every step
        x = torch.randn(5, 16, generator=g)
        for m, o, sc in zip(models, opts, scheds):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
            sc.step()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert dyn_utils.counters["stats"]["unique_graphs"] == 1


def test_explore_and_kept_moments_compiled_match_eager():
    """Coverage selection runs inside the compiled refresh graph and picks the eager rows."""
    torch.manual_seed(0)
    eager, compiled = _pair(zoo.Zoo(), "aot_eager", rank=4, update_freq=2, explore=0.5, moments="keep_overlap")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, 12, generator=g) for _ in range(5)]  # refreshes at 0, 2, 4
    _run_steps(eager, compiled, batches, lambda m, x: m(x).pow(2).mean(), opt_kw={"rewarmup": 3})
    assert all((s.last_seen >= 0).sum() > s.rank for s in compiled.sites if not s.full)
    assert compiled.compile_report.frames == 2
