"""Updates inside backward (``update_in_backward=True``): the same weights as ``step()``,
fewer gradients alive, and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grassfx
from grassfx.debug.memory import track_memory

VOCAB = 1000


class Net(nn.Module):
    """Embedding, projected linears of different sizes, a norm and a dense head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.up = nn.Linear(32, 96)
        self.norm = nn.LayerNorm(96)
        self.mid = nn.Linear(96, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.down(torch.tanh(self.mid(self.norm(self.up(h))))))


def _model(backend="eager", **kw):
    torch.manual_seed(0)
    kw = {"rank": 8, "update_freq": 3, **kw}
    return grassfx.compile(Net(), backend=backend, targets=["up.weight", "mid.weight", "down.weight"], **kw)


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 6), generator=gen) for _ in range(n)]


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _train(model, opt, batches):
    for ids in batches:
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_updates_in_backward_equal_step(backend):
    weights = []
    for fused in (False, True):
        model = _model(backend, moments="keep_overlap")
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, update_in_backward=fused)
        _train(model, opt, _batches(7))  # refreshes at steps 0, 3 and 6
        assert model.step == 7
        weights.append(_weights(model))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("make", [
    lambda params, fused: grassfx.optim.SGD(params, lr=0.1, momentum=0.9, update_in_backward=fused),
    lambda params, fused: grassfx.optim.Adafactor(params, lr=1e-2, update_in_backward=fused),
    lambda params, fused: grassfx.optim.Muon(params, lr=1e-2, weight_decay=0.1, update_in_backward=fused),
], ids=["sgd", "adafactor", "muon"])
def test_other_optimizers_update_in_backward_too(make):
    weights = []
    for fused in (False, True):
        model = _model(selection="multinorm")  # rows drawn with replacement, rho != 1
        _train(model, make(model.parameters(), fused), _batches(4))
        weights.append(_weights(model))
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-6, msg=name)


def test_no_gradient_is_left_after_backward():
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=True)
    before = _weights(model)
    _loss(model, _batches(1)[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    after = _weights(model)
    assert all(not torch.equal(before[k], after[k]) for k in ("emb.weight", "up.weight", "head.bias"))
    # nothing left to clip: clip_grad_norm_ sees no gradient (documented)
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == 0.0
    opt.step()
    assert model.step == 1


def test_gradient_accumulation_is_refused():
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=True)
    first, second = _batches(2)
    _loss(model, first).backward()
    with pytest.raises(grassfx.GrassError, match="second backward"):
        _loss(model, second).backward()
    opt.zero_grad()


def test_options_that_need_every_gradient_first_are_refused():
    model = _model()
    with pytest.raises(grassfx.ConfigError, match="nonfinite='skip'"):
        grassfx.optim.AdamW(model.parameters(), update_in_backward=True, nonfinite="skip")
    with pytest.raises(grassfx.ConfigError, match="compiled=True"):
        grassfx.optim.AdamW(model.parameters(), update_in_backward=True, compiled=True)
    with pytest.raises(grassfx.ConfigError, match="update_in_backward"):
        grassfx.optim.AdamW(model.parameters(), update_in_backward="yes")


def test_data_parallel_is_refused(monkeypatch):
    import grassfx.optim.inbackward as inbackward

    monkeypatch.setattr(inbackward, "_world_size", lambda: 2)  # as under torchrun with 2 processes
    model = _model()
    with pytest.raises(grassfx.ConfigError, match="data-parallel"):
        grassfx.optim.AdamW(model.parameters(), update_in_backward=True)
    alone = _model(data_parallel=False)  # each rank trains alone: allowed
    grassfx.optim.AdamW(alone.parameters(), update_in_backward=True)


def test_a_nonfinite_gradient_raises_naming_the_parameter():
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=True)
    with torch.no_grad():
        model.module.head.bias[0] = float("nan")
    with pytest.raises(grassfx.NonFiniteGradientError, match="NaN or Inf"):
        _loss(model, _batches(1)[0]).backward()
    assert opt.update_in_backward


def test_an_optimizer_that_is_gone_updates_nothing():
    model = _model()
    grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=True)  # dropped at once
    before = _weights(model)
    _loss(model, _batches(1)[0]).backward()
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_fewer_gradient_bytes_are_alive():
    peaks, grads = {}, None
    for fused in (False, True):
        model = _model(update_freq=100)
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=fused)
        batches = _batches(4)
        _train(model, opt, batches[:2])  # optimizer state exists; no refresh from here on
        peak = 0
        for ids in batches[2:]:
            with track_memory() as mem:
                _train(model, opt, [ids])
            peak = max(peak, mem.peak)
        peaks[fused] = peak
        grads = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    # unfused, every gradient stays alive until step() (the peak: all of them, the fused
    # AdamW kernel adds no temporaries); inside backward each is freed by its update, so
    # about one is alive: the peak is the head's gradient next to the logits and their
    # gradient (128 KB + 2 x 40 KB here), not both 128 KB gradients and the rest
    saved = sum(grads) - max(grads)
    assert peaks[True] <= peaks[False] - saved // 2, (peaks, sum(grads), max(grads))


def test_loaded_state_keeps_group_settings_reaching_the_hooks():
    """After load_state_dict the groups are the loaded dicts: the in-backward hooks read them."""
    model = _model()
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=True)
    _train(model, opt, _batches(2))
    opt.load_state_dict(opt.state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = _weights(model)
    _train(model, opt, _batches(1, seed=5))
    after = _weights(model)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_refused_refresh_raises_in_backward_and_changes_no_weight():
    # issue 27 item 4: a NaN in a row multinorm does not select made the refresh fall back
    # to uniform norms and be refused, and the drawn rows' gradient was applied to the old rows
    torch.manual_seed(0)
    net = nn.Linear(8, 16, bias=False)
    model = grassfx.compile(net, rank=4, update_freq=2, selection="multinorm", backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=True)
    for x in torch.randn(2, 4, 8):
        model(x).pow(2).mean().backward()
        opt.step()
    site = model.sites[0]
    row = next(r for r in range(site.rows) if r not in site.idx.tolist())
    before = net.weight.detach().clone()
    y = model(torch.randn(4, 8))
    y.register_hook(lambda g: g.index_fill(1, torch.tensor([row]), float("nan")))
    with pytest.raises(grassfx.NonFiniteGradientError):
        y.pow(2).mean().backward()
    opt.step()
    assert torch.equal(net.weight, before)
