"""grassfx.optim.Muon: orthogonalized momentum of the selected rows, AdamW for the rest.

Oracles: a per-row reference that keeps one momentum vector per row of the dense weight
(what the optimizer must be equivalent to, refreshes included); the Newton-Schulz
iteration against the SVD; torch.optim.AdamW for the parameters that are not projected.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import grassfx
from grassfx import _compat
from grassfx.errors import ConfigError
from grassfx.optim.muon import NS_COEFFICIENTS, orthogonalize, orthogonalize_many

from conftest import make_mlp
from moe_zoo import make_loop_experts

LR, MOMENTUM, RMS = 1e-2, 0.9, 0.2


class RowMuon:
    """Muon on the selected rows of one dense (m, n) weight, one momentum vector per row.

    Every row decays every step (grassfx settles the others' debt at a refresh, and the
    model's ``state_dict`` shows settled weights); at a refresh ``reset`` forgets every
    row's momentum and ``keep_overlap`` keeps the rows selected before and after.
    """

    def __init__(self, weight, moments, weight_decay=0.0, rewarmup=0):
        self.w = weight.detach().clone()
        self.moments, self.wd, self.rewarmup = moments, weight_decay, rewarmup
        self.buf, self.age = {}, {}

    def step(self, idx, grad_rows, refreshed):
        rows = [int(i) for i in idx]
        if refreshed:
            keep = set(rows) if self.moments == "keep_overlap" else set()
            self.buf = {i: b for i, b in self.buf.items() if i in keep}
            self.age = {i: a for i, a in self.age.items() if i in keep}
        direction = []
        for i, g in zip(rows, grad_rows):
            self.buf[i] = MOMENTUM * self.buf.get(i, torch.zeros_like(g)) + g
            self.age[i] = self.age.get(i, 0) + 1
            direction.append(g + MOMENTUM * self.buf[i])
        ortho = orthogonalize(torch.stack(direction))
        self.w *= 1 - LR * self.wd
        size = RMS * math.sqrt(max(ortho.shape))
        for j, i in enumerate(rows):
            ramp = min(1.0, self.age[i] / self.rewarmup) if self.rewarmup else 1.0
            self.w[i] -= LR * size * ramp * ortho[j]


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (3, 5, 40)])
def test_orthogonalize_approximates_the_polar_factor(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(x)
    assert o.shape == x.shape and o.dtype == torch.float32
    sv = torch.linalg.svdvals(o)  # the quintic iteration lands every singular value in ~[0.7, 1.2]
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    polar = u @ vh  # same singular vectors: o is close to U V^T (cosine over all entries)
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.97, cos


def _newton_schulz_float64(x, steps=5):
    """The quintic iteration written out directly, in float64: the oracle of both code paths."""
    a, b, c = NS_COEFFICIENTS
    y = x.double()
    y = y.mT if y.shape[-2] > y.shape[-1] else y
    y = y / torch.linalg.matrix_norm(y, keepdim=True)
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.mT if x.shape[-2] > x.shape[-1] else y


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 16, 200), (8, 15), (20, 24)])
@pytest.mark.parametrize("low_rank", [False, True])
def test_orthogonalize_matches_the_direct_iteration(shape, low_rank):
    # wide matrices (l >= 2s) take the Gram-space path, the others the direct one; both are
    # the same iterates, so both match the iteration run in float64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    if low_rank:  # a gradient of few tokens: rank 4 plus a little noise
        x = torch.randn(*shape[:-1], 4, generator=g) @ torch.randn(*shape[:-2], 4, shape[-1], generator=g)
        x = x + 1e-3 * torch.randn(*shape, generator=g)
    want = _newton_schulz_float64(x)
    got = orthogonalize(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # float32 rounding, amplified along the near-null directions of a low-rank input: the
    # Gram path's products of (s x s) polynomials lose ~4x more there (1.6e-4 of the largest
    # entry at most on these inputs, 3.7e-5 for the direct path)
    gram_path = max(shape[-2:]) >= 2 * min(shape[-2:])
    tol = 5e-4 if gram_path else 1e-4
    assert (got.double() - want).abs().max() < tol * want.abs().max()


@pytest.mark.parametrize("max_elements", [1 << 24, 3000])  # one batch per shape; chunks of a few matrices
def test_orthogonalize_many_equals_one_matrix_at_a_time(max_elements):
    torch.manual_seed(0)
    xs = [torch.randn(16, 40), torch.randn(40, 16), torch.randn(16, 40), torch.randn(3, 16, 40),
          torch.randn(8, 24).double(), torch.randn(40, 16), torch.randn(12, 12)]
    got = orthogonalize_many(xs, max_elements=max_elements)
    assert len(got) == len(xs)
    for x, y in zip(xs, got):
        want = orthogonalize(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert orthogonalize_many([]) == []


@pytest.mark.parametrize("kind", ["floats", "one float", "tensors"])
def test_orthogonalize_many_scales_each_result(kind):
    """``scales`` (the optimizer's step sizes, folded into Newton-Schulz's last small factor):
    each result is its scale times the unscaled one, on the Gram path (wide, tall, an expert
    stack of three) and the direct one (square)."""
    torch.manual_seed(0)
    xs = [torch.randn(16, 40), torch.randn(40, 16), torch.randn(3, 16, 40), torch.randn(12, 12), torch.randn(12, 12)]
    scales = [-0.125] * 5 if kind == "one float" else [-0.5, 2.0, 3e-3, -7.0, 0.25]
    given = [torch.tensor(f) for f in scales] if kind == "tensors" else scales
    got = orthogonalize_many(xs, scales=given)
    for x, f, y in zip(xs, scales, got):
        assert y.shape == x.shape and y.dtype == torch.float32
        torch.testing.assert_close(y, f * orthogonalize(x), rtol=1e-5, atol=1e-5 * abs(f))
    torch.testing.assert_close(orthogonalize(xs[0], scale=-3.0), -3.0 * orthogonalize(xs[0]))


def test_orthogonalize_of_a_norm_past_float32_range_is_finite():
    """A momentum whose norm overflows float32 gives a zero direction, never NaN (the finite
    check passed its finite entries, so a NaN here would reach the weights)."""
    huge = torch.randn(16, 40) * 1e19
    for got in (orthogonalize(huge), orthogonalize(huge.mT), orthogonalize(torch.randn(12, 12) * 1e19),
                orthogonalize_many([huge, torch.randn(16, 40)], scales=[0.5, 2.0])[0]):
        assert torch.isfinite(got).all()


def _stack(width=256, layers=12):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width, bias=False), nn.Tanh())])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])  # the plain path (_rows_step) and the general one
def test_steps_in_chunks_equal_one_batch_and_keep_temporaries_to_a_chunk(weight_decay, monkeypatch):
    """The optimizer finishes each chunk of same-shape weights before the next: the same weights
    as one batch of all, and a step's temporaries bounded by a few chunks, not the model's."""
    from grassfx.debug.memory import track_memory
    from grassfx.optim import muon

    rank, width, layers = 32, 256, 12
    results = {}
    for batch in (1 << 30, rank * width):  # one batch of all 12; one weight per chunk
        monkeypatch.setattr(muon, "BATCH_ELEMENTS", batch)
        model = grassfx.compile(_stack(width, layers), rank=rank, update_freq=100, backend="eager")
        opt = grassfx.optim.Muon(model.parameters(), lr=1e-2, weight_decay=weight_decay)
        peaks = []
        for step in range(3):
            model(torch.randn(64, width, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            with track_memory() as mem:
                opt.step()
            peaks.append(mem.peak)
            opt.zero_grad()
        # from the second step: the first also creates the momentum buffers
        results[batch] = ([p.detach().clone() for p in model.module.parameters()], max(peaks[1:]))
    (one_batch, peak_all), (chunked, peak_chunked) = results.values()
    for a, b in zip(one_batch, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    compressed = rank * width * 4  # one weight's (r x n) float32 direction
    assert peak_all > 3 * layers * compressed  # directions, the stacked batch, its result: all weights
    assert peak_chunked < 8 * compressed, (peak_chunked, compressed)


# the first two take the general path (_update_rows), the last two the plain one (_rows_step)
@pytest.mark.parametrize("moments, weight_decay, rewarmup", [("reset", 0.1, 0), ("keep_overlap", 0.0, 3),
                                                             ("reset", 0.0, 0), ("keep_overlap", 0.0, 0)])
def test_projected_rows_follow_a_per_row_reference(moments, weight_decay, rewarmup):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 40, bias=False), nn.Tanh(), nn.Linear(40, 3, bias=False))
    model = grassfx.compile(net, rank=6, update_freq=2, moments=moments, explore=0.5, backend="eager",
                            targets=["0"])
    site = model.sites[0]
    opt = grassfx.optim.Muon(model.parameters(), lr=LR, momentum=MOMENTUM, rms=RMS, weight_decay=weight_decay,
                             rewarmup=rewarmup)
    ref = RowMuon(site.weight, moments, weight_decay, rewarmup)
    g = torch.Generator().manual_seed(1)
    kept_some = False
    for step in range(7):  # refreshes at steps 0, 2, 4, 6
        before = site.idx.clone()
        model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
        refreshed = step % 2 == 0
        if refreshed and step:
            common = set(before.tolist()) & set(site.idx.tolist())
            kept_some |= 0 < len(common) < site.rank
        ref.step(site.idx, site.handle.grad, refreshed)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(model.state_dict()["module.0.weight"], ref.w, rtol=1e-5, atol=1e-6,
                                   msg=f"step {step}")
    state = opt.state[site.handle]
    assert set(state) == {"row_step", "momentum_buffer"} and tuple(state["momentum_buffer"].shape) == (6, 6)
    if moments == "keep_overlap":
        assert kept_some  # the policy was exercised
        assert state["row_step"].tolist() == [ref.age[int(i)] for i in site.idx]


def test_parameters_that_are_not_projected_get_torch_adamw():
    net = make_mlp()
    model = grassfx.compile(net, rank=3, backend="eager")
    projected = {id(s.weight) for s in model.sites}
    dense = [p for p in net.parameters() if id(p) not in projected]
    shadow = [p.detach().clone().requires_grad_() for p in dense]  # torch's AdamW fed the same gradients
    opt = grassfx.optim.Muon(model.parameters(), lr=LR, weight_decay=0.1)
    ropt = torch.optim.AdamW(shadow, lr=LR, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(torch.randn(8, 12, generator=g)).pow(2).mean().backward()
        for p, q in zip(dense, shadow):
            q.grad = p.grad.clone()
        opt.step()
        ropt.step()
        opt.zero_grad()
    assert len(dense) >= 2 and projected
    for p, q in zip(dense, shadow):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_full_rank_weight_is_orthogonalized_whole():
    torch.manual_seed(0)
    net = nn.Linear(12, 5, bias=False)
    w0 = net.weight.detach().clone()
    model = grassfx.compile(net, rank=1.0, backend="eager")
    opt = grassfx.optim.Muon(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=False)
    model(torch.randn(4, 12)).sum().backward()
    grad = model.sites[0].handle.grad.clone()
    opt.step()
    expected = w0 - LR * RMS * math.sqrt(12) * orthogonalize(grad)
    torch.testing.assert_close(net.weight.detach(), expected, rtol=1e-5, atol=1e-7)


def test_expert_stacks_are_orthogonalized_per_expert():
    gm = grassfx.compile(make_loop_experts(), rank=4, update_freq=100, backend="eager", targets=["w"])
    site = gm.sites[0]
    opt = grassfx.optim.Muon(gm.parameters(), lr=LR, momentum=MOMENTUM, nesterov=False)
    before = site.weight.detach().clone()
    gm(torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0))).pow(2).mean().backward()
    grad = site.handle.grad.clone()  # (E, r, n)
    opt.step()
    ortho = orthogonalize(grad)
    for e in range(site.experts):
        moved = site.weight.detach()[e] - before[e]
        rows = site.idx[e]
        expected = -LR * RMS * math.sqrt(max(grad.shape[-2:])) * ortho[e]
        torch.testing.assert_close(moved[rows], expected, rtol=1e-5, atol=1e-7)
        others = torch.ones(site.rows, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(moved[others], torch.zeros_like(moved[others]))


def test_state_dict_round_trip_resumes_bit_exactly():
    def make(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3))
        gm = grassfx.compile(net, rank=4, update_freq=2, moments="keep_overlap", backend="eager")
        return gm, grassfx.optim.Muon(gm.parameters(), lr=LR, weight_decay=0.1, rewarmup=2)

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(5, 6, generator=g) for _ in range(7)]
    gm, opt = make(0)
    for x in batches[:3]:
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"model": gm.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    gm2, opt2 = make(1)
    gm2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x in batches[3:]:
        for m, o in ((gm, opt), (gm2, opt2)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    for (k, a), b in zip(gm.state_dict().items(), gm2.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kw, words", [
    (dict(momentum=1.0), "momentum"), (dict(ns_steps=0), "ns_steps"), (dict(rms=0.0), "rms"),
    (dict(nesterov="yes"), "nesterov"), (dict(rewarmup=-1), "rewarmup"), (dict(lr=-1.0), "lr"),
])
def test_bad_settings_raise_config_errors(kw, words):
    model = grassfx.compile(nn.Linear(8, 8), rank=2, backend="eager")
    with pytest.raises(grassfx.ConfigError, match=words):
        grassfx.optim.Muon(model.parameters(), **kw)


@pytest.mark.parametrize("selection", ["top_r", "multinorm"])
def test_pure_bf16_rows_keep_updates_below_bf16_resolution(selection):
    """Steps below half of bf16's spacing: nearest loses them all; kahan and stochastic
    rounding follow the float32 run (stochastic with its rounding noise, unbiased)."""
    def run(dtype, rounding):
        torch.manual_seed(0)
        net = nn.Linear(16, 32, bias=False)
        nn.init.uniform_(net.weight, 0.5, 1.0)  # bf16 spacing 2^-8 here; a step is ~8e-4 < 2e-3
        net = net.to(dtype)
        model = grassfx.compile(net, rank=8, update_freq=1000, selection=selection, seed=0, backend="eager")
        opt = grassfx.optim.Muon(model.parameters(), lr=1e-3, update_rounding=rounding)
        start = net.weight.detach().float().clone()
        # a full-rank gradient: Newton-Schulz would lift a rank-deficient one's bf16 noise
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
        for _ in range(100):
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return net.weight.detach().float() - start, model.sites[0].idx

    exact, rows = run(torch.float32, "nearest")
    moved = exact[rows].abs().mean()
    errors = {}
    for rounding in ("nearest", "kahan", "stochastic"):
        got, got_rows = run(torch.bfloat16, rounding)
        assert torch.equal(got_rows, rows)
        errors[rounding] = float((got[rows] - exact[rows]).abs().mean() / moved)
    assert errors["nearest"] > 0.9, errors  # every step rounded away
    assert errors["kahan"] < 0.2 and errors["stochastic"] < 0.6, errors


def _train_muon(compiled, moments, steps=7, **opt_kw):
    """A three-linear net (row- and column-selected weights), an lr schedule, refreshes every
    2 steps; returns the final state_dict and the optimizer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 40, bias=False), nn.Tanh(), nn.Linear(40, 24), nn.Tanh(),
                        nn.Linear(24, 40, bias=False))
    model = grassfx.compile(net, rank=6, update_freq=2, moments=moments, backend="eager")
    opt = grassfx.optim.Muon(model.parameters(), lr=LR, compiled=compiled, **opt_kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model.state_dict(), opt


@pytest.mark.parametrize("moments, opt_kw", [("reset", {}), ("keep_overlap", {"nesterov": False}),
                                             ("reset", {"weight_decay": 0.1})])
def test_compiled_rows_step_equals_the_eager_step(moments, opt_kw):
    # the compiled function takes the plain weights; with weight decay every weight takes the
    # eager path, so the compiled flag must change nothing there either
    want, _ = _train_muon(False, moments, **opt_kw)
    got, opt = _train_muon(True, moments, **opt_kw)
    assert (opt._compiled_rows is not None) == ("weight_decay" not in opt_kw)
    for key in want:
        # Inductor fuses and reorders the float32 arithmetic: steps are ~1e-2, rounding ~3e-6
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def test_compiled_rows_step_does_not_recompile_across_refreshes_and_lr_changes():
    before = _compat.compiled_graph_count()
    _train_muon(True, "reset", steps=9)  # 5 refreshes (moments re-created), 9 learning rates
    assert _compat.compiled_graph_count() - before == 1  # the model runs eagerly: the rows step's graph


def test_compiled_rows_step_survives_many_models_and_a_momentum_schedule():
    # Dynamo's recompile limit is 8 graphs per code object: each optimizer compiles its own
    # copy, and the momentum is a tensor (a warm-up schedule changes it every step)
    torch.manual_seed(0)
    before = _compat.compiled_graph_count()
    for width in range(8, 18):  # ten models of different shapes in one process
        model = grassfx.compile(nn.Linear(6, width, bias=False), rank=4, backend="eager")
        opt = grassfx.optim.Muon(model.parameters(), lr=LR, compiled=True)
        for step in range(10):
            opt.momentum = 0.85 + 0.01 * step
            model(torch.randn(5, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert torch.isfinite(model.state_dict()["module.weight"]).all()
    assert _compat.compiled_graph_count() - before == 10  # one graph per optimizer


def test_compiled_rows_step_refuses_updates_in_backward():
    with pytest.raises(ConfigError, match="compiled=True with update_in_backward=True"):
        grassfx.optim.Muon([torch.nn.Parameter(torch.zeros(2))], compiled=True, update_in_backward=True)
    with pytest.raises(ConfigError, match="compiled='yes'"):
        grassfx.optim.Muon([torch.nn.Parameter(torch.zeros(2))], compiled="yes")
