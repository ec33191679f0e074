"""Warm restarts: a grassfx training graph is stored in and served from the AOTAutograd cache.

The anchors are custom autograd Functions, which the cache refuses by default; grassfx
lets it keep graphs whose only Functions are its own (``_compat.compile_fx``). Oracles: a
second compile of the same model (Dynamo reset, as in a new process) is a cache hit and
trains exactly as the first compile and as eager grassfx; a changed pass pipeline and a
user's own Function are not served from it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

import grassfx
from grassfx import _compat
from grassfx.passes import settings

pytestmark = pytest.mark.slow


@pytest.fixture
def caches_on(tmp_path, monkeypatch):
    """Inductor's and AOTAutograd's caches on (the suite turns them off), in a fresh directory."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with torch._inductor.config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        yield


class Scaled(torch.autograd.Function):
    """A user's own Function (not grassfx's): the cache must keep torch's default for it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class Net(torch.nn.Module):
    def __init__(self, own_function=False):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(12, 24), torch.nn.Linear(24, 6)
        self.own_function = own_function

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(Scaled.apply(h) if self.own_function else h)


def _train(net, backend="inductor", steps=3):
    """Steps 0 (a refresh, eager) to ``steps - 1``; the handles' gradients of the last step, the weights."""
    torch._dynamo.reset()
    model = grassfx.compile(copy.deepcopy(net), rank=8, update_freq=100, backend=backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    before = _compat.aot_cache_counts()
    for _ in range(steps):
        model(torch.randn(16, 12, generator=g)).square().mean().backward()
        grads = {s.name: s.handle.grad.clone() for s in model.sites}
        opt.step()
        opt.zero_grad()
    after = _compat.aot_cache_counts()
    weights = {k: v.detach().clone() for k, v in grassfx.unwrap(model).state_dict().items()}
    return grads, weights, {k: after[k] - before[k] for k in after}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_second_compile_is_served_from_the_cache_and_trains_the_same(caches_on):
    net = Net()
    grads_cold, weights_cold, cold = _train(net)
    grads_warm, weights_warm, warm = _train(net)
    grads_eager, weights_eager, _ = _train(net, backend="eager")
    assert cold == {"hit": 0, "miss": 1, "bypass": 0}
    assert warm == {"hit": 1, "miss": 0, "bypass": 0}
    _assert_same(grads_warm, grads_cold)
    _assert_same(weights_warm, weights_cold)
    _assert_same(grads_warm, grads_eager)
    _assert_same(weights_warm, weights_eager)


def test_a_changed_pipeline_is_not_served_a_cached_graph(caches_on, monkeypatch):
    net = Net()
    _train(net)
    monkeypatch.setenv("GRASSFX_DISABLE", "sparsify_wgrad")
    settings.cache_clear()
    try:
        _, _, counts = _train(net)
    finally:
        monkeypatch.delenv("GRASSFX_DISABLE")
        settings.cache_clear()
    assert counts["hit"] == 0 and counts["miss"] == 1


def test_a_users_own_function_keeps_torchs_default(caches_on):
    _, _, counts = _train(Net(own_function=True))
    assert counts == {"hit": 0, "miss": 0, "bypass": 1}


def test_changed_anchor_code_is_not_served_a_cached_graph(caches_on, monkeypatch):
    net = Net()
    _train(net)
    real = _compat._source_hash
    monkeypatch.setattr(_compat, "_source_hash", lambda fn: "edited:" + real(fn))  # as after an edit of anchors.py
    _, _, counts = _train(net)
    assert counts["hit"] == 0 and counts["miss"] == 1
