"""grassfx.optim: equal to torch.optim at full rank, (r x n) state, decay, accumulation,
schedulers, clipping, save/resume, misuse and bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import grassfx

from conftest import llama_batch, make_llama, make_mlp


def _step(model, opt, x):
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


# -- oracle 3: every row selected == torch.optim -----------------------------------------
@pytest.mark.parametrize(
    "ours, theirs, kw",
    [
        (grassfx.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        (grassfx.optim.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (grassfx.optim.Adafactor, torch.optim.Adafactor, dict(lr=1e-2, weight_decay=0.01)),
    ],
)
def test_full_rank_mlp_equals_torch_optim(ours, theirs, kw):
    net = make_mlp()
    ref = copy.deepcopy(net)
    model = grassfx.compile(net, rank=10_000, backend="eager")
    # eagerly, grassfx.optim.AdamW updates what it trains in full with torch's fused kernel
    fused = dict(fused=True) if ours is grassfx.optim.AdamW else {}
    opt, ropt = ours(model.parameters(), **kw), theirs(ref.parameters(), **kw, **fused)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 12, generator=g)
        _step(model, opt, x)
        _step(ref, ropt, x)
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        if ours is grassfx.optim.AdamW:  # torch's fused kernel: bit for bit
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_full_rank_tiny_llama_equals_torch_adamw():
    net = make_llama()
    ref = copy.deepcopy(net)
    model = grassfx.compile(net, rank=1.0, backend="eager", targets=["*_proj", "lm_head"])
    assert len(model.sites) == 15  # 2 x (q, k, v, o, gate, up, down) + lm_head
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    for step in range(5):
        batch = llama_batch(step)
        for m, o in ((model, opt), (ref, ropt)):
            m(**batch).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name



def test_optimizer_state_is_r_by_n():
    model = grassfx.compile(make_mlp(d_in=12, d_hidden=24, d_out=6), rank=3, proj_dim="rows", backend="eager")
    opt = grassfx.optim.AdamW(model.parameters())
    _step(model, opt, torch.randn(4, 12))
    for site in model.sites:
        state = opt.state[site.handle]
        n = model.weight_of(site).shape[1]
        moments = sum(v.nbytes for v in state.values() if torch.is_tensor(v))
        # two (r, n) moments plus one step count per selected row
        assert moments == 2 * site.rank * n * 4 + site.rank * 4
        assert state["row_step"].shape == (site.rank,)
        assert not opt.state[model.weight_of(site)]



def test_weight_decay_settles_at_refresh():
    net = make_mlp()
    model = grassfx.compile(net, rank=3, proj_dim="rows", update_freq=2, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    site = model.site("up.weight")
    x = torch.randn(4, 12)
    _step(model, opt, x)
    first = site.idx.clone()
    _step(model, opt, x)
    assert float(site.decay_pending) == pytest.approx(0.95**2)
    w2 = net.up.weight.detach().clone()
    model(x).pow(2).mean().backward()  # step 2 is a refresh: commit the new rows
    opt.step()
    rows = torch.ones(site.rows, dtype=torch.bool)
    rows[first] = False
    rows[site.idx] = False  # rows never selected only decayed: settled by 0.95 ** 2
    torch.testing.assert_close(net.up.weight[rows], w2[rows] * 0.95**2)
    assert float(site.decay_pending) == pytest.approx(0.95)



def _loss(model, x):
    return model(x).pow(2).mean()


def _train(model, opt, xs, sched=None):
    for x in xs:
        _loss(model, x).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 12, generator=g) for _ in range(n)]


def _fresh(selection="multinorm", opt_cls=grassfx.optim.AdamW, **opt_kw):
    model = grassfx.compile(make_mlp(), rank=4, selection=selection, update_freq=3, moments="keep_overlap", backend="eager")
    opt = opt_cls(model.parameters(), **({"lr": 1e-2} | opt_kw))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, sched


@pytest.mark.parametrize("opt_cls", [grassfx.optim.AdamW, grassfx.optim.SGD, grassfx.optim.Adafactor])
def test_save_resume_is_bit_exact(opt_cls, tmp_path):
    extra = {"momentum": 0.9} if opt_cls is grassfx.optim.SGD else {"weight_decay": 0.1}
    xs = _batches(0, 8)
    model, opt, sched = _fresh(opt_cls=opt_cls, **extra)
    _train(model, opt, xs[:4], sched)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, xs[4:], sched)
    expect = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2, sched2 = _fresh(opt_cls=opt_cls, **extra)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _train(model2, opt2, xs[4:], sched2)
    got = model2.state_dict()
    assert expect.keys() == got.keys()
    for k in expect:
        assert torch.equal(expect[k], got[k]), k


def test_gradient_accumulation_sums_compressed_grads():
    xs = _batches(1, 2)
    model, opt, _ = _fresh(selection="top_r")
    for x in xs:
        _loss(model, x).backward()  # the first backward is the refresh
    acc = [s.handle.grad.clone() for s in model.sites]
    opt.zero_grad()
    for s, a in zip(model.sites, acc):
        one = []
        for x in xs:
            _loss(model, x).backward()
            one.append(s.handle.grad.clone())
            opt.zero_grad()
        torch.testing.assert_close(a, one[0] + one[1])


def test_plain_torch_optimizer_is_detected():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 12)
    _loss(model, x).backward()
    with pytest.raises(grassfx.OptimizerMisuseError, match="grassfx.optim"):
        opt.step()  # refused before it writes anything (tests/instrument/test_invariant.py)


def test_a_handle_written_by_an_optimizer_that_bypasses_step_hooks_is_detected():
    """The forward's version check catches what no step hook saw (a hand-written update)."""
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    x = torch.randn(4, 12)
    _loss(model, x).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    with pytest.raises(grassfx.OptimizerMisuseError, match="grassfx.optim"):
        model(x)


def test_missing_handles_are_refused():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    with pytest.raises(grassfx.ConfigError, match="handle"):
        grassfx.optim.AdamW(model.module.parameters())


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_gradients_never_reach_weights(mode):
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, nonfinite=mode)
    x = torch.randn(4, 12)
    x[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    _loss(model, x).backward()
    if mode == "raise":
        with pytest.raises(grassfx.NonFiniteGradientError, match="NaN or Inf"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    after = model.module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not opt.state and int(model.grass_step) == 0
    assert all(torch.isfinite(s.rho).all() for s in model.sites)  # no NaN selection kept
    assert int(model.grass_refreshed_at) == -1  # the refresh is retried on the next forward


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(rank=1.5), "rank"),
        (dict(rank="8"), "rank"),
        (dict(rank=True), "rank"),
        (dict(rank=4, selection="random"), "selection.*top_r"),
        (dict(rank=4, proj_dim="diag"), "proj_dim.*rows"),
        (dict(rank=4, update_freq=0), "update_freq"),
        (dict(rank=4, update_freq=2.5), "update_freq"),
        (dict(rank=4, backend="tvm"), "backend"),
        (dict(rank=4, scale=float("nan")), "scale"),
        (dict(rank=4, targets=3), "targets"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(grassfx.ConfigError, match=match) as info:
        grassfx.compile(make_mlp(), backend=kw.pop("backend", "eager"), **kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, grassfx.GrassError)


def test_model_without_targets():
    with pytest.raises(grassfx.UnsupportedModelError, match="no target weights"):
        grassfx.compile(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)), rank=2, backend="eager")
    with pytest.raises(grassfx.ConfigError, match="nn.Module"):
        grassfx.compile(lambda x: x, rank=2)


def test_bad_optimizer_arguments():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    for kw in (dict(lr=-1), dict(betas=(1.0, 0.9)), dict(eps=float("inf")), dict(nonfinite="ignore")):
        with pytest.raises(grassfx.ConfigError):
            grassfx.optim.AdamW(model.parameters(), **kw)
    with pytest.raises(grassfx.ConfigError, match="nesterov"):
        grassfx.optim.SGD(model.parameters(), lr=0.1, nesterov=True)


def test_second_forward_during_refresh_redoes_it():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    x = torch.randn(4, 12)
    loss = _loss(model, x)
    with torch.no_grad():
        model(x)  # evaluation in between is fine
    loss = _loss(model, x)  # the first refresh forward is abandoned and redone
    loss.backward()
    assert not model._pending
    model(x)  # refresh committed: fine again
    model.cancel_refresh()


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


@pytest.mark.parametrize("opt_cls", [grassfx.optim.AdamW, grassfx.optim.SGD, grassfx.optim.Adafactor])
def test_state_dict_is_tensors_and_numbers(opt_cls):
    extra = {"momentum": 0.9} if opt_cls is grassfx.optim.SGD else {}
    model, opt, _ = _fresh(opt_cls=opt_cls, **extra)
    _train(model, opt, _batches(2, 2))
    saved = opt.state_dict()
    # the state of every handle is there, no larger than the compressed gradient
    index = {id(p): i for g, sg in zip(opt.param_groups, saved["param_groups"]) for p, i in zip(g["params"], sg["params"])}
    for site in model.sites:
        entry = saved["state"][index[id(site.handle)]]
        shapes = [tuple(v.shape) for v in entry.values() if torch.is_tensor(v) and v.dim() == 2]
        assert any(s[site.dim] == site.rank for s in shapes), (site.name, shapes)
        assert all(math.prod(s) <= site.handle.numel() for s in shapes), (site.name, shapes)
    for path, value in _leaves(saved["state"]):
        assert isinstance(value, (torch.Tensor, int, float)) and not isinstance(value, bool), (path, type(value))
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert [p for p, _ in _leaves(loaded)] == [p for p, _ in _leaves(saved)]
    for (path, a), (_, b) in zip(_leaves(saved), _leaves(loaded)):
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), path


def test_finite_check_is_not_fooled_by_huge_finite_entries():
    from grassfx.optim.base import finite_flags

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum is inf
    nan, inf = torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 2.0])
    half = torch.tensor([60000.0, 60000.0], dtype=torch.float16)  # sums past float16's range
    bf16 = [torch.full((4,), 3e38, dtype=torch.bfloat16), torch.tensor([1.0, float("nan")], dtype=torch.bfloat16),
            torch.ones(5, dtype=torch.bfloat16)]
    assert finite_flags([big, nan, inf, half, torch.ones(3, dtype=torch.float64)] + bf16) == \
        [True, False, False, True, True, True, False, True]
    assert finite_flags([]) == []
    assert finite_flags([torch.zeros(0), nan, torch.zeros(0, 3, dtype=torch.bfloat16)]) == [True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_check_finds_one_bad_entry_anywhere(dtype):
    """One NaN or Inf at the start, middle or end of tensors of lengths around vector widths,
    contiguous, transposed or strided, among finite tensors: flagged, and only its tensor."""
    from grassfx.optim.base import finite_flags

    for n in (1, 7, 16, 17, 1000, 65537):
        for layout in ("contiguous", "transposed", "strided"):
            base = torch.randn(n, 4).to(dtype)
            view = {"contiguous": base, "transposed": base.t(), "strided": base[:, ::2]}[layout]
            for flat in sorted({0, view.numel() // 2, view.numel() - 1}):
                for bad in (float("nan"), float("inf"), float("-inf")):
                    t = view.clone() if layout == "contiguous" else view
                    saved = t[flat // t.shape[1], flat % t.shape[1]].item()
                    t[flat // t.shape[1], flat % t.shape[1]] = bad
                    assert finite_flags([torch.ones(3), t, torch.randn(9)]) == [True, False, True], \
                        (n, layout, flat, bad)
                    t[flat // t.shape[1], flat % t.shape[1]] = saved


def test_finite_check_copies_no_gradient():
    """A bf16/fp16 gradient is checked in its own dtype (aminmax): sum(dtype=float32) would copy it to float32 first."""
    from grassfx.debug.memory import track_memory
    from grassfx.optim.base import finite_flags

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        grad = torch.randn(1024, 256).to(dtype)
        with track_memory() as mem:
            assert finite_flags([grad]) == [True]
        assert mem.peak < grad.nbytes / 8, (dtype, mem.peak)
    model = grassfx.compile(make_mlp(), rank=3, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 12)).pow(2).mean().backward()
    model.sites[0].handle.grad.fill_(3e38)  # huge but finite: the step is taken, not refused
    opt.step()
    assert opt.skipped_steps == 0



def test_full_rank_weights_off_the_fused_path_still_equal_torch_adamw():
    # scale != 1 keeps full-rank weights on grassfx's own kernel (adamw_step) while the
    # biases take torch's fused kernel: each against the torch AdamW it reproduces
    net = make_mlp()
    ref = copy.deepcopy(net)
    model = grassfx.compile(net, rank=10_000, scale=0.5, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)  # no decay (torch's default is 0.01)
    weights = [p for p in ref.parameters() if p.dim() == 2]  # the projected (full-rank) ones
    biases = [p for p in ref.parameters() if p.dim() == 1]  # biases and norms
    assert len(weights) == len(model.sites) and biases
    ropts = [torch.optim.AdamW(weights, lr=5e-3, weight_decay=0.0, foreach=False),
             torch.optim.AdamW(biases, lr=1e-2, weight_decay=0.0, fused=True)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 12, generator=g)
        _step(model, opt, x)
        ref(x).pow(2).mean().backward()
        for o in ropts:
            o.step()
            o.zero_grad()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


def _transposed_linear(seed=0):
    """A bias-free Linear whose weight is a transposed view (strides (1, 16)), not contiguous."""
    torch.manual_seed(seed)
    net = nn.Linear(16, 8, bias=False)
    net.weight = nn.Parameter(net.weight.detach().t().contiguous().t())
    assert not net.weight.is_contiguous()
    return net


def test_non_contiguous_weight_at_full_rank_equals_torch_adamw():
    # issue 27 item 5: torch's fused kernel walks weight, gradient and moments in memory
    # order; a transposed weight with a contiguous handle and state drifted 0.077 in 4 steps
    net = _transposed_linear()
    ref = copy.deepcopy(net)
    model = grassfx.compile(net, rank=10_000, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(4, 16, generator=g)
        _step(model, opt, x)
        _step(ref, ropt, x)
    torch.testing.assert_close(net.weight, ref.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda p: grassfx.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: grassfx.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
    lambda p: grassfx.optim.Adafactor(p, lr=1e-2, weight_decay=0.1),
], ids=["adamw", "sgd", "adafactor"])
@pytest.mark.parametrize("rank, proj_dim", [(3, "rows"), (3, "cols"), (10_000, "cols")])
def test_non_contiguous_weight_trains_as_its_contiguous_copy(make, rank, proj_dim):
    weights = []
    for transposed in (False, True):
        net = _transposed_linear()
        if not transposed:
            net.weight = nn.Parameter(net.weight.detach().contiguous())
        model = grassfx.compile(net, rank=rank, update_freq=2, proj_dim=proj_dim, backend="eager")
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            _step(model, opt, torch.randn(4, 16, generator=g))
        weights.append(net.weight.detach())
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda p: grassfx.optim.AdamW(p, lr=1e-2),
    lambda p: grassfx.optim.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: grassfx.optim.Adafactor(p, lr=1e-2),
], ids=["adamw", "sgd", "adafactor"])
@pytest.mark.parametrize("proj_dim, rank, selects", [("rows", 6, "6 of 24 rows"), ("cols", 6, "6 of 12 columns"),
                                                     ("rows", 10_000, "24 of 24 rows")])
def test_state_saved_at_another_rank_is_refused_at_load(make, proj_dim, rank, selects):
    # issue 27 item 14: it loaded, and failed only at the next step with a shape mismatch
    def build(r):
        model = grassfx.compile(make_mlp(), rank=r, update_freq=100, proj_dim=proj_dim, backend="eager")
        return model, make(model.parameters())

    model, opt = build(4)
    _step(model, opt, torch.randn(4, 12))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    other, other_opt = build(rank)
    buf.seek(0)
    saved = torch.load(buf)
    with pytest.raises(grassfx.ConfigError, match=rf"'up.weight' was saved at rank 4 .* selects {selects}"):
        other_opt.load_state_dict(saved)
    same, same_opt = build(4)  # the same rank loads and resumes as the saving run
    same_opt.load_state_dict(saved)
    same.load_state_dict(model.state_dict())
    x = torch.randn(4, 12)
    _step(model, opt, x)
    _step(same, same_opt, x)
    for a, b in zip(grassfx.unwrap(model).parameters(), grassfx.unwrap(same).parameters()):
        assert torch.equal(a, b)
