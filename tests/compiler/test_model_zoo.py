"""Many architectures, tiny configs: compiled training equals eager, and every projected weight
is rewritten in the compiled graph (no dense fallback), graph breaks or not."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import grassfx
from grassfx import _compat

from hf_zoo import ZOO, loss_of

#: weights each architecture must project (substrings of site names), beyond plain Linears
MUST_PROJECT = {
    "gpt2": ["attn.c_attn.weight", "mlp.c_fc.weight"],  # Conv1D, fused qkv
    "phi3": ["qkv_proj.weight", "gate_up_proj.weight"],  # fused qkv / gate_up
    "gpt_neox": ["query_key_value.weight"],
    "falcon": ["query_key_value.weight"],
    "mha": ["self_attn.in_proj_weight", "self_attn.out_proj.weight"],  # nn.MultiheadAttention
    "mixtral": ["experts.gate_up_proj", "experts.down_proj"],  # 3-D expert stacks, per-expert rows
    "mamba": ["in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"],
}

#: fused weights whose logical blocks (q|k|v, gate|up) must each get rows (docs/layouts.md)
FUSED = {
    "gpt2": ["attn.c_attn.weight"],
    "phi3": ["qkv_proj.weight", "gate_up_proj.weight"],
    "gpt_neox": ["query_key_value.weight"],
    "falcon": ["query_key_value.weight"],
    "mha": ["self_attn.in_proj_weight"],
}

#: architectures whose compile dominates the suite's time
SLOW = {"t5", "whisper", "mixtral", "mamba", "bert"}


def _params():
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in ZOO]


def _train_pair(name, steps=3):
    build, batch = ZOO[name]
    torch.manual_seed(0)
    net = build()
    eager = grassfx.compile(copy.deepcopy(net), rank=4, update_freq=2, backend="eager")
    compiled = grassfx.compile(net, rank=4, update_freq=2, backend="aot_eager")
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, compiled)]
    for step in range(steps):  # refresh, normal, refresh
        inputs = batch(step)
        losses = []
        for m, opt in zip((eager, compiled), opts):
            loss = loss_of(m(**inputs))
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), (step, losses)
        for se, sc in zip(eager.sites, compiled.sites):
            assert torch.equal(se.idx, sc.idx), (step, se.name)
            torch.testing.assert_close(sc.handle.grad, se.handle.grad, rtol=1e-4, atol=1e-5, msg=se.name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return compiled


@pytest.mark.parametrize("name", _params())
def test_compiled_equals_eager_and_every_projected_weight_is_rewritten(name):
    breaks = collections.Counter(_compat.graph_break_counts())
    compiled = _train_pair(name)
    broke = sum((collections.Counter(_compat.graph_break_counts()) - breaks).values())
    assert (broke > 0) == name.endswith("graph_break"), broke
    projected = {s.name for s in compiled.sites if not s.full}
    for needle in MUST_PROJECT.get(name, []):
        assert any(needle in s for s in projected), (needle, sorted(projected))
    for site in compiled.sites:  # fused weights: every block holds selected rows
        if any(site.name.endswith(f) for f in FUSED.get(name, [])):
            assert site.blocks is not None, site.name
            picked = site.block_labels[site.idx].unique().tolist()
            assert picked == list(range(len(site.blocks))), (site.name, picked)
    changes = compiled.compile_report.changes()
    fallback = {c.weight: c.detail for c in changes if c.action != "rewrote"}
    assert fallback == {}
    assert {c.weight for c in changes if c.action == "rewrote"} == projected
