"""Training is never silently wrong: frozen weights, refresh interruptions, double compiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grassfx

from conftest import make_mlp


def _train(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_weight_frozen_before_compile_stays_frozen_and_explained():
    net = make_mlp()
    net.up.weight.requires_grad_(False)
    before = net.up.weight.detach().clone()
    model = grassfx.compile(net, rank=4, update_freq=2, backend="eager")
    assert [s.name for s in model.sites] == ["down.weight"]
    reasons = {d.name: d.reason for d in model.target_decisions}
    assert "frozen" in reasons["up.weight"]
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, [torch.randn(4, 12) for _ in range(3)])
    assert torch.equal(net.up.weight, before)
    assert not grassfx.unwrap(model).up.weight.requires_grad


def test_only_frozen_weights_named_in_targets_is_an_error_that_says_so():
    net = make_mlp()
    net.up.weight.requires_grad_(False)
    with pytest.raises(grassfx.UnsupportedModelError, match="frozen"):
        grassfx.compile(net, rank=4, targets="up.weight", backend="eager")


def test_param_groups_by_module_name_apply_to_projected_weights():
    model = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend="eager")
    named = dict(model.named_parameters())
    frozen = [p for n, p in named.items() if n.startswith("module.up.")]
    rest = [p for n, p in named.items() if not n.startswith("module.up.")]
    opt = grassfx.optim.AdamW([{"params": frozen, "lr": 0.0}, {"params": rest}], lr=1e-2, weight_decay=0.1)
    up, down = model.module.up.weight.detach().clone(), model.module.down.weight.detach().clone()
    _train(model, opt, [torch.randn(4, 12) for _ in range(3)])
    assert torch.equal(model.module.up.weight, up)  # lr 0: neither updated nor decayed
    assert not torch.equal(model.module.down.weight, down)
    site = model.site("up.weight")
    assert any(p is site.handle for p in opt.param_groups[0]["params"])
