"""Backend plumbing: user passes chained in Inductor, cache keys, mode options, pass failures."""

from __future__ import annotations

import importlib
import linecache
import sys

import pytest
import torch

import grassfx
import grassfx.passes
from grassfx.compiler import inductor_patches, pipeline_uuid
from grassfx.passes import infra

from conftest import make_mlp


def _user_pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class UserPass(CustomGraphPass):
        """A user's own post_grad_custom_pre_pass: counts graphs and the rowsel markers it sees."""

        def __init__(self):
            self.graphs, self.markers = 0, 0

        def __call__(self, graph):
            self.graphs += 1
            self.markers += sum(n.target is torch.ops.grassfx.rowsel.default for n in graph.nodes)

        def uuid(self):
            return "user-pass-v1"

    return UserPass


@pytest.mark.slow
def test_user_passes_in_a_list_run_after_ours():
    import torch._inductor.config as inductor_config

    first, second = _user_pass_class()(), _user_pass_class()()
    model = grassfx.compile(make_mlp(), rank=4, backend="inductor", refresh="compiled")
    with inductor_config.patch(post_grad_custom_pre_pass=[first, second], fx_graph_cache=False):
        for _ in range(2):  # the refresh step, then a normal step (the rowsel graph)
            model(torch.randn(5, 12)).sum().backward()
    graphs = len(model.compile_report.graphs)
    assert graphs == 4 and first.graphs == second.graphs == graphs  # both ran on every graph
    assert first.markers == second.markers == 0  # ... after ours removed every marker
    assert {c.weight for c in model.compile_report.changes() if c.action == "rewrote"} == {"up.weight", "down.weight"}


def test_cache_key_is_derived_from_the_pipeline(tmp_path, monkeypatch):
    path = tmp_path / "extra_pass_mod.py"
    path.write_text("def extra_pass(graph, ctx):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("extra_pass_mod")
    before = pipeline_uuid()
    monkeypatch.setattr(grassfx.passes, "PIPELINE", grassfx.passes.PIPELINE + (mod.extra_pass,))
    with_extra = pipeline_uuid()
    assert with_extra != before  # a new pass (and its module's source) enters the key
    path.write_text("def extra_pass(graph, ctx):\n    return None  # edited\n")
    linecache.checkcache(str(path))
    assert pipeline_uuid() != with_extra  # editing the pass's source changes the key
    monkeypatch.undo()
    sys.modules.pop("extra_pass_mod", None)
    assert pipeline_uuid() == before


def test_cache_key_follows_settings_and_data_parallelism(monkeypatch):
    before = pipeline_uuid()
    monkeypatch.setenv("GRASSFX_DISABLE", "sparsify_wgrad")
    infra.settings.cache_clear()
    try:
        assert pipeline_uuid() != before
    finally:
        monkeypatch.delenv("GRASSFX_DISABLE")
        infra.settings.cache_clear()
    assert pipeline_uuid() == before
    assert pipeline_uuid(("0", 2)) != before  # graphs that all-reduce are other graphs


def test_mode_and_options_become_inductor_patches():
    model = grassfx.compile(torch.nn.Linear(8, 8), rank=2, backend="eager", mode="max-autotune-no-cudagraphs",
                            options={"max_autotune_gemm": False})
    patches = inductor_patches(model.grass_config)
    assert patches["max_autotune"] is True and patches["max_autotune_gemm"] is False


def _broken_pass(graph, ctx):
    raise IndexError("list index out of range")


def test_a_failing_pass_is_named_in_the_error(monkeypatch):
    monkeypatch.setattr(grassfx.passes, "PIPELINE", grassfx.passes.PIPELINE + (_broken_pass,))
    model = grassfx.compile(make_mlp(), rank=4, backend="aot_eager", refresh="compiled")
    with pytest.raises(Exception) as info:
        model(torch.randn(5, 12)).sum().backward()
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    errors = [e for e in chain if isinstance(e, grassfx.PassError)]
    assert errors and errors[0].pass_name == "_broken_pass" and errors[0].graph == "g0.forward0"
    assert "[_broken_pass] in graph g0.forward0: IndexError" in str(info.value)
    assert "GRASSFX_DISABLE=_broken_pass" in str(info.value)
