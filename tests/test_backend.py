"""Backend plumbing that needs no compilation: pass chaining, cache keys, mode options."""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

import grassfx
from grassfx import backend
from grassfx.passes import infra


class UserPass:
    """Stands in for a user's own post_grad_custom_pre_pass."""

    def __init__(self, key):
        self.key, self.calls = key, 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.key


def _graph():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.relu.default, (x,)))
    return g


def test_user_pass_is_chained_and_part_of_the_cache_key():
    stats = backend.CompileStats()
    cls = backend._custom_pass_class()
    user = UserPass("v1")
    hook = cls(weakref.ref(stats), 0, chained=user)
    hook(_graph())
    assert user.calls == 1
    assert [st.pass_name for st in stats.graphs[0].stages] == [fn.__name__ for fn in grassfx.passes.PIPELINE]
    other = cls(weakref.ref(stats), 0, chained=UserPass("v2"))
    assert hook.uuid() != other.uuid()
    assert cls(weakref.ref(stats), 0).uuid() != hook.uuid()


def test_cache_key_follows_settings(monkeypatch):
    before = backend.pipeline_uuid()
    monkeypatch.setenv("GRASSFX_DISABLE", "sparsify_wgrad")
    infra.settings.cache_clear()
    try:
        assert backend.pipeline_uuid() != before
    finally:
        monkeypatch.delenv("GRASSFX_DISABLE")
        infra.settings.cache_clear()
    assert backend.pipeline_uuid() == before


def test_mode_and_options_become_inductor_patches():
    model = grassfx.compile(torch.nn.Linear(8, 8), rank=2, backend="eager", mode="max-autotune-no-cudagraphs",
                            options={"max_autotune_gemm": False})
    patches = backend.inductor_patches(model.grass_config)
    assert patches["max_autotune"] is True and patches["max_autotune_gemm"] is False
