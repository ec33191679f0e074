"""Rewrites survive graph breaks; routine logging calls do not break graphs."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

import grassfx

from conftest import llama_batch, make_gpt2

_log = logging.getLogger("grassfx.tests.chatty")


class Broken(nn.Module):
    """Three linears with graph breaks between the first two and after the last matmul."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 16), nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        out = self.c(torch.relu(self.b(h)))
        torch._dynamo.graph_break()
        return out.pow(2).mean()


class Chatty(nn.Module):
    """A model that logs (debug/info) inside its forward, as library code does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        _log.info("forward on %s", "x")
        _log.debug("hidden")
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def _train_pair(net, batches, loss_fn, steps_checked=None):
    eager = grassfx.compile(copy.deepcopy(net), rank=3, update_freq=2, backend="eager")
    compiled = grassfx.compile(net, rank=3, update_freq=2, backend="aot_eager")
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, compiled)]
    for batch in batches:
        for m, opt in zip((eager, compiled), opts):
            loss_fn(m, batch).backward()
        for se, sc in zip(eager.sites, compiled.sites):
            assert torch.equal(se.idx, sc.idx), se.name
            torch.testing.assert_close(sc.handle.grad, se.handle.grad, rtol=1e-4, atol=1e-6, msg=se.name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return compiled


def _rewrites(model):
    changes = model.compile_report.changes()
    return {c.weight for c in changes if c.action == "rewrote"}, {c.weight for c in changes if c.action != "rewrote"}


def test_rewrites_survive_user_graph_breaks():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 12, generator=g) for _ in range(4)]  # refresh, normal, refresh, normal
    compiled = _train_pair(Broken(), batches, lambda m, x: m(x))
    rewritten, fallback = _rewrites(compiled)
    assert rewritten == {"a.weight", "b.weight", "c.weight"} and not fallback


def test_logging_calls_do_not_break_the_graph():
    counters = torch._dynamo.utils.counters
    counters.clear()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 12, generator=g) for _ in range(3)]
    compiled = _train_pair(Chatty(), batches, lambda m, x: m(x))
    assert dict(counters["graph_break"]) == {}
    assert compiled.compile_report.frames == 1  # the normal graph (refresh steps run eagerly)
    assert _rewrites(compiled) == ({"a.weight", "b.weight"}, set())


def test_gpt2_default_config_is_rewritten():
    """GPT-2's config leaves ``loss_type`` unset: transformers logs a warning_once in the loss."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    net = make_gpt2()
    assert getattr(net.config, "loss_type", None) is None
    batches = [llama_batch(i, batch=2, seq=8, vocab=80) for i in range(3)]
    compiled = _train_pair(net, batches, lambda m, b: m(**b).loss)
    rewritten, fallback = _rewrites(compiled)
    assert rewritten == {s.name for s in compiled.sites} and not fallback
    assert dict(counters["graph_break"]) == {}
