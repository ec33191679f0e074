"""Factored second moments of the matrices trained in full (``full_state``): the maths against
a float64 oracle and against AdamW where the factorization is exact, the state each mode
keeps, checkpoints, updates inside backward, bf16 rounding and refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grassfx
from grassfx.errors import ConfigError
from grassfx.optim import factored
from grassfx.optim.factored import factored_state, factored_step

VOCAB = 300


class Net(nn.Module):
    """Embedding, two projected linears, a norm and an untied head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 24)
        self.up = nn.Linear(24, 64)
        self.norm = nn.LayerNorm(64)
        self.down = nn.Linear(64, 24)
        self.head = nn.Linear(24, VOCAB, bias=False)

    def forward(self, ids):
        return self.head(self.down(torch.tanh(self.norm(self.up(self.emb(ids))))))


def _model(**kw):
    torch.manual_seed(0)
    return grassfx.compile(Net(), rank=8, update_freq=3, backend="eager", targets=["up.weight", "down.weight"], **kw)


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 9), generator=gen) for _ in range(n)]


def _train(model, opt, batches):
    for ids in batches:
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def _oracle(p0, grads, lr, beta1, beta2, eps, wd, momentum):
    """The factored AdamW step in float64, written out over whole matrices."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    rows = torch.zeros(p.shape[0], 1, dtype=torch.float64)
    cols = torch.zeros(1, p.shape[1], dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        rows = beta2 * rows + (1 - beta2) * (g * g).mean(1, keepdim=True)
        cols = beta2 * cols + (1 - beta2) * (g * g).mean(0, keepdim=True)
        v = rows @ cols / rows.mean()
        denom = (v / (1 - beta2**t)).sqrt() + eps
        if momentum:
            m = beta1 * m + (1 - beta1) * g
            step = m / (1 - beta1**t) / denom
        else:
            step = g / denom
        p = p * (1 - lr * wd) - lr * step
    return p


@pytest.mark.parametrize("mode", ["factored", "factored_nomomentum"])
@pytest.mark.parametrize("block", [None, 64])  # one block, and blocks of 64 entries (uneven rows)
def test_factored_step_matches_a_float64_oracle(mode, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(factored, "BLOCK_ELEMENTS", block)
    torch.manual_seed(0)
    p0 = torch.randn(37, 11)
    grads = [torch.randn(37, 11) * (1 + i) for i in range(6)]
    p = p0.clone()
    state = factored_state(p, mode, None, False)
    for g in grads:
        factored_step(p, g, state, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    want = _oracle(p0, grads, 1e-2, 0.9, 0.99, 1e-8, 0.1, mode == "factored")
    assert (p.double() - want).abs().max() < 1e-5
    assert (p - p0).abs().max() > 1e-3  # it moved
    assert set(state) == {"step", "row_var", "col_var"} | ({"exp_avg"} if mode == "factored" else set())


def test_factored_equals_adamw_when_the_squares_are_rank_one():
    """With g_ij^2 = a_i b_j (a fixed, b per step) the factored moment is AdamW's exactly."""
    torch.manual_seed(0)
    a = torch.rand(20, 1) + 0.5
    p0 = torch.randn(20, 7)
    ours, ref = p0.clone(), nn.Parameter(p0.clone())
    state = factored_state(ours, "factored", None, False)
    torch_opt = torch.optim.AdamW([ref], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    for _ in range(8):
        b = torch.rand(1, 7) + 0.1
        g = torch.sign(torch.randn(20, 7)) * (a * b).sqrt()
        factored_step(ours, g, state, lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
        ref.grad = g.clone()
        torch_opt.step()
    assert torch.allclose(ours, ref.detach(), atol=2e-6, rtol=0)
    assert (ours - p0).abs().max() > 0.1


@pytest.mark.parametrize("opt_cls", [grassfx.optim.AdamW, grassfx.optim.Muon])
@pytest.mark.parametrize("mode", ["factored", "factored_nomomentum"])
def test_only_the_unprojected_matrices_are_factored(opt_cls, mode):
    model = _model()
    opt = opt_cls(model.parameters(), lr=1e-2, full_state=mode)
    _train(model, opt, _batches(2))
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        name = names[id(p)]
        if name in ("module.emb.weight", "module.head.weight"):
            want = {"step", "row_var", "col_var"} | ({"exp_avg"} if mode == "factored" else set())
            assert set(state) == want, name
            assert state["row_var"].shape == (p.shape[0], 1) and state["col_var"].shape == (1, p.shape[1])
        elif p.dim() == 1:  # norms and biases keep AdamW's two moments
            assert {"exp_avg", "exp_avg_sq"} <= set(state), name
        else:  # the handles of projected weights: the optimizer's own row state
            assert "row_var" not in state, name
    dense_state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    model2 = _model()
    opt2 = opt_cls(model2.parameters(), lr=1e-2)
    _train(model2, opt2, _batches(2))
    adam_state = sum(t.numel() for s in opt2.state.values() for t in s.values() if torch.is_tensor(t))
    emb = 2 * VOCAB * 24  # the embedding's and the head's entries
    saved = emb if mode == "factored" else 2 * emb
    assert adam_state - dense_state == saved - 2 * (VOCAB + 24)


def test_projected_weights_train_as_without_factoring():
    """full_state changes the embedding and head only: the projected weights' first step is the same."""
    a, b = _model(), _model()
    opt_a = grassfx.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = grassfx.optim.AdamW(b.parameters(), lr=1e-2, full_state="factored")
    _train(a, opt_a, _batches(1))
    _train(b, opt_b, _batches(1))
    wa, wb = dict(a.module.named_parameters()), dict(b.module.named_parameters())
    for name in ("up.weight", "down.weight", "norm.weight"):
        assert torch.equal(wa[name], wb[name]), name
    assert not torch.equal(wa["emb.weight"], wb["emb.weight"])


@pytest.mark.parametrize("mode", ["factored", "factored_nomomentum"])
def test_checkpoint_resumes_bit_exactly(mode):
    batches = _batches(7)
    model = _model()
    opt = grassfx.optim.Muon(model.parameters(), lr=1e-2, full_state=mode)
    _train(model, opt, batches)
    model2 = _model()
    opt2 = grassfx.optim.Muon(model2.parameters(), lr=1e-2, full_state=mode)
    _train(model2, opt2, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model3 = _model()
    model3.load_state_dict(saved["model"])
    opt3 = grassfx.optim.Muon(model3.parameters(), lr=1e-2, full_state=mode)
    opt3.load_state_dict(saved["opt"])
    _train(model3, opt3, batches[4:])
    for (name, p), q in zip(model.named_parameters(), model3.parameters()):
        assert torch.equal(p, q), name


def test_full_state_per_parameter_group():
    """The input embedding without momentum, the head with it: a group key like lr."""
    model = _model()
    emb = model.module.emb.weight
    rest = [p for p in model.parameters() if p is not emb]
    opt = grassfx.optim.Muon(grassfx.optim.embedding_groups(model.parameters(), emb, "factored_nomomentum"),
                             lr=1e-2, full_state="factored")
    _train(model, opt, _batches(2))
    assert set(opt.state[emb]) == {"step", "row_var", "col_var"}
    assert set(opt.state[model.module.head.weight]) == {"step", "row_var", "col_var", "exp_avg"}
    with pytest.raises(ConfigError, match="full_state='bogus'"):
        grassfx.optim.AdamW([{"params": [emb], "full_state": "bogus"}, {"params": rest}])


@pytest.mark.parametrize("before, after", [("adam", "factored"), ("factored", "adam"),
                                           ("factored", "factored_nomomentum"), ("factored_nomomentum", "factored")])
def test_changing_full_state_after_state_exists_is_refused(before, after):
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, full_state=before)
    _train(model, opt, _batches(1))
    weights = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["full_state"] = after
    with pytest.raises(ConfigError, match=f"made for full_state='{before}'.*now says '{after}'"):
        _train(model, opt, _batches(1))
    opt.param_groups[0]["full_state"] = "bogus"
    with pytest.raises(ConfigError, match="full_state='bogus'"):
        _train(model, opt, _batches(1))
    # refused before any factored parameter was written (the embedding and head come first)
    assert torch.equal(model.module.emb.weight, weights[0])


def test_loading_a_checkpoint_of_another_full_state_is_refused():
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, _batches(1))
    other = grassfx.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-2, full_state="factored")
    with pytest.raises(ConfigError, match="checkpoint has full_state='adam'"):
        other.load_state_dict(opt.state_dict())


def test_nonfinite_skip_leaves_factored_state_alone():
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, full_state="factored", nonfinite="skip")
    _train(model, opt, _batches(1))
    emb = model.module.emb.weight
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[emb].items()}
    weight = emb.detach().clone()
    logits = model(_batches(1)[0][:, :-1])
    (logits.sum() * float("nan")).backward()
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(emb, weight)
    for key, value in before.items():
        assert torch.equal(opt.state[emb][key], value) if torch.is_tensor(value) else opt.state[emb][key] == value


def test_bf16_gradient_makes_no_float32_copy_of_the_matrix(monkeypatch):
    from grassfx.debug.memory import track_memory

    monkeypatch.setattr(factored, "BLOCK_ELEMENTS", 1 << 14)
    p = torch.randn(2048, 256).to(torch.bfloat16)
    grad = torch.randn(2048, 256).to(torch.bfloat16)
    for mode in ("factored", "factored_nomomentum"):
        state = factored_state(p, mode, torch.float32, False)
        with track_memory() as mem:
            factored_step(p, grad, state, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
        full_float32 = p.numel() * 4
        assert mem.peak < full_float32 / 4, (mode, mem.peak, full_float32)


def test_checkpoint_from_before_full_state_loads():
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, _batches(2))
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["full_state"]  # as saved by an earlier version
    model2 = copy.deepcopy(model)
    opt2 = grassfx.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved)
    assert all(g["full_state"] == "adam" for g in opt2.param_groups)
    _train(model2, opt2, _batches(1))
    _train(model, opt, _batches(1))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_updates_inside_backward_equal_step():
    batches = _batches(5)
    a, b = _model(), _model()
    opt_a = grassfx.optim.AdamW(a.parameters(), lr=1e-2, full_state="factored")
    opt_b = grassfx.optim.AdamW(b.parameters(), lr=1e-2, full_state="factored", update_in_backward=True)
    _train(a, opt_a, batches)
    _train(b, opt_b, batches)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_bf16_kahan_tracks_float32_better_than_nearest():
    """A bf16 matrix with small steps: nearest rounding loses them, Kahan keeps them."""
    torch.manual_seed(0)
    p0 = torch.randn(64, 32) + 4.0  # spacing 2^-5 around 4: steps of 1e-3 are far below half of it
    grads = [torch.randn(64, 32) for _ in range(40)]
    runs = {}
    for mode in ("nearest", "kahan"):
        p = p0.to(torch.bfloat16)
        state = factored_state(p, "factored", torch.float32, mode == "kahan")
        assert ("kahan_comp" in state) == (mode == "kahan")
        for g in grads:
            factored_step(p, g.to(torch.bfloat16), state, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.0, mode=mode)
        # Kahan's weight plus its compensation is the running float32 sum
        runs[mode] = p.float() + (state["kahan_comp"].float() if mode == "kahan" else 0.0)
    ref = p0.to(torch.bfloat16).float()  # the same start, kept in float32
    state = factored_state(ref, "factored", None, False)
    for g in grads:
        factored_step(ref, g.to(torch.bfloat16).float(), state, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                      weight_decay=0.0)
    err = {mode: (p - ref).abs().mean().item() for mode, p in runs.items()}
    assert err["nearest"] > 1e-3, err  # nearest lost the steps: the weights never moved
    assert err["kahan"] < 0.02 * err["nearest"], err


def test_bad_full_state_and_sharded_parameters_are_refused(monkeypatch):
    model = _model()
    with pytest.raises(ConfigError, match="full_state='adafactor'"):
        grassfx.optim.AdamW(model.parameters(), full_state="adafactor")
    with pytest.raises(ConfigError, match="full_state="):
        grassfx.optim.Muon(model.parameters(), full_state=None)
    plain = nn.Linear(4, 4)
    monkeypatch.setattr(grassfx.fsdp, "is_dtensor", lambda t: True)
    with pytest.raises(ConfigError, match="FSDP2-sharded"):
        grassfx.optim.AdamW(plain.parameters(), full_state="factored")


def test_train_flag_reaches_the_optimizer():
    from recipes.options import parse_args, run_specs
    from recipes.train import make_grass

    args = parse_args(["--preset", "test", "--steps", "2", "--backend", "eager", "--rank", "4",
                       "--full-state", "factored"])
    spec = run_specs(args)[0]
    model = Net()
    _, opt = make_grass(copy.deepcopy(model), spec, args)
    assert opt.full_state == "factored"
    assert parse_args(["--preset", "test"]).full_state == "adam"
    args = parse_args(["--preset", "test", "--steps", "2", "--backend", "eager", "--rank", "4",
                       "--full-state", "factored", "--embedding-full-state", "factored_nomomentum"])
    from recipes.presets import build_model, get_preset

    llama = build_model(get_preset("test"), seed=0)
    wrapped, opt = make_grass(llama, spec, args)
    embedding = llama.get_input_embeddings().weight
    assert [g["full_state"] for g in opt.param_groups] == ["factored_nomomentum", "factored"]
    assert opt.param_groups[0]["params"] == [embedding]


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_pure_bf16_through_the_optimizer(rounding):
    """bf16 weights, float32 moments, the rounding modes: the state the optimizer makes and
    a run that stays close to the same run in float32."""
    torch.manual_seed(0)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = grassfx.compile(Net().to(dtype), rank=8, update_freq=3, backend="eager",
                                targets=["up.weight", "down.weight"])
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, full_state="factored", update_rounding=rounding,
                                  state_dtype=torch.float32)
        torch.manual_seed(1)
        _train(model, opt, _batches(6))
        emb = model.module.emb.weight
        state = opt.state[emb]
        assert state["exp_avg"].dtype == torch.float32 and state["row_var"].dtype == torch.float32
        if dtype == torch.bfloat16:
            assert ("kahan_comp" in state) == (rounding == "kahan")
            assert state.get("kahan_comp", torch.empty(0, dtype=torch.bfloat16)).dtype == torch.bfloat16
        runs[dtype] = emb.detach().float()
    start = _model().module.emb.weight.detach().float()
    moved = (runs[torch.float32] - start).abs().mean()
    apart = (runs[torch.bfloat16] - runs[torch.float32]).abs().mean()
    # bf16 forwards and backwards differ from float32 ones: the runs agree in direction, not bit for bit
    assert moved > 1e-3 and apart < 0.5 * moved, (moved, apart)


def test_kahan_buffer_of_a_projected_weight_takes_the_weights_dtype():
    """A model cast to bf16 after grassfx.compile keeps float32 handles: the Kahan buffer
    follows the weight it compensates, not the handle."""
    model = _model()
    model.module.to(torch.bfloat16)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_rounding="kahan")
    _train(model, opt, _batches(2))
    for site in model.sites:
        assert site.handle.dtype == torch.float32
        assert opt.state[site.handle]["kahan_comp"].dtype == torch.bfloat16
