"""Changes to a compiled model: freezing projected layers, checkpoints, pickling, replaced parts."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import grassfx

from conftest import make_mlp

XS = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(8)]


def _train(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


# -- item 3: freezing a projected layer mid-training -------------------------------------------
def _freeze_run(model, opt, layer, named, snaps=None):
    """Steps 0-1 train, 2-4 with ``layer`` frozen (module call), 5-7 unfrozen (by parameter name)."""
    for i, x in enumerate(XS):
        if i == 2:
            layer.requires_grad_(False)
            assert not any(p.requires_grad for p in layer.parameters())
        if i == 5:
            for name, p in named():
                if name.split(".")[-2] == "up":
                    p.requires_grad = True
        _train(model, opt, [x])
        if snaps is not None:
            snaps.append(dict(layer.named_parameters())["weight"].detach().clone())


def test_freezing_a_projected_layer_mid_training_equals_torch_adamw():
    ref = make_mlp()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    _freeze_run(ref, ropt, ref.up, ref.named_parameters)
    model = grassfx.compile(make_mlp(), rank=10_000, backend="eager")  # every row: torch's arithmetic
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    snaps = []
    _freeze_run(model, opt, model.module.up, model.named_parameters, snaps)
    assert all(torch.equal(snaps[1], s) for s in snaps[2:5])  # frozen: neither updated nor decayed
    for (name, a), b in zip(model.module.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name  # moments and step counts kept across the freeze, as torch keeps them
    assert not model.site("up.weight").weight.requires_grad  # autograd and DDP still see a frozen tensor


def test_freezing_a_projected_layer_compiled_matches_eager():
    runs = {}
    for backend in ("eager", "aot_eager"):
        torch._dynamo.utils.counters.clear()
        model = grassfx.compile(make_mlp(), rank=4, update_freq=3, backend=backend)
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        snaps = []
        _freeze_run(model, opt, model.module.up, model.named_parameters, snaps)
        assert all(torch.equal(snaps[1], s) for s in snaps[2:5]), backend  # a refresh (step 3) passes it by
        assert not torch.equal(snaps[4], snaps[7]), backend  # unfrozen: trains again
        runs[backend] = model.module.state_dict()
    # one graph for each set of frozen sites, not one per step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for name, value in runs["eager"].items():
        torch.testing.assert_close(runs["aot_eager"][name], value, rtol=0, atol=1e-6, msg=name)


def test_unwrap_restores_the_latest_requires_grad():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    model.module.up.requires_grad_(False)
    model.module.down.weight.requires_grad_(False)
    model.module.down.weight.requires_grad = True
    copied = copy.deepcopy(model)  # the intent travels with copies
    for net in (grassfx.unwrap(model), grassfx.unwrap(copied)):
        assert type(net.up.weight) is nn.Parameter
        assert not net.up.weight.requires_grad and not net.up.bias.requires_grad
        assert net.down.weight.requires_grad


# -- item 11: checkpoint between backward() and step() at a refresh step, compiled ---------------
def test_checkpoint_between_backward_and_step_resumes_bit_for_bit_compiled():
    model = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend="inductor")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    for i, x in enumerate(XS[:6]):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if i == 2:  # a refresh step (eager), saved as a SIGTERM handler would
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        opt.step()
    done = copy.deepcopy(model.state_dict())
    buf.seek(0)
    saved = torch.load(buf)
    model.load_state_dict(saved["model"])  # the same compiled model: one Inductor compile
    opt.load_state_dict(saved["opt"])
    _train(model, opt, XS[2:6])  # the interrupted step is redone
    for name, value in done.items():
        assert torch.equal(model.state_dict()[name], value), name


# -- item 12: pickling the whole model ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_pickled_model_trains_on_like_the_original(backend):
    model = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend=backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, XS[:3])
    model.module.norm.requires_grad_(False)
    model.module.up.requires_grad_(False)  # a frozen projected weight stays frozen
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(pickle.loads(pickle.dumps(model)), grassfx.GrassModel)
    opt2 = grassfx.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(opt.state_dict())
    _train(model, opt, XS[3:])
    _train(loaded, opt2, XS[3:])
    assert (loaded.compile_report is not None) == (backend != "eager")  # compiled runner installed again
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not grassfx.unwrap(loaded).up.weight.requires_grad


# -- item 13: parts replaced after compile -----------------------------------------------------
def test_replacing_a_projected_module_after_compile_is_a_clear_error():
    model = grassfx.compile(nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)), rank=4,
                            backend="eager")
    model.module[2] = nn.Linear(24, 6)
    with pytest.raises(grassfx.ModelChangedError, match=r"module '2'.*replaced.*grassfx.unwrap"):
        model(XS[0])
    again = grassfx.compile(grassfx.unwrap(model), rank=4, backend="eager")  # what the message says
    opt = grassfx.optim.AdamW(again.parameters(), lr=1e-2)
    before = again.module[2].weight.detach().clone()
    _train(again, opt, XS[:2])
    assert not torch.equal(again.module[2].weight, before)


def test_replacing_a_projected_weight_after_compile_is_a_clear_error():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    new = nn.Parameter(torch.zeros(24, 12))
    model.module.up.weight = new
    with pytest.raises(grassfx.ModelChangedError, match=r"'up.weight' was replaced.*copy_"):
        model(XS[0])
    net = grassfx.unwrap(model)
    assert net.up.weight is new and new.requires_grad  # the user's Parameter, left as it was
