"""Training is never silently wrong: frozen weights, refresh interruptions, double compiles."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import grassfx

from conftest import make_linear, make_mlp


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


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("simulated out of memory in backward")


def test_failed_forward_or_backward_at_a_refresh_step_does_not_wedge_training():
    xs = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    clean = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend="eager")
    opt = grassfx.optim.AdamW(clean.parameters(), lr=1e-2, weight_decay=0.1)
    _train(clean, opt, xs)

    model = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = None
    for i, x in enumerate(xs):
        for bad in ("forward", "backward") if i in (0, 2) else ():
            opt.zero_grad()
            try:  # the loop skips a bad batch; `loss` of the failed try stays alive
                out = model(torch.randn(4, 5) if bad == "forward" else x)
                loss = _FailingBackward.apply(out).pow(2).mean()
                loss.backward()
            except (RuntimeError, torch.OutOfMemoryError):
                pass
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
    for a, b in zip(clean.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_backward_of_a_superseded_refresh_forward_is_refused():
    model = grassfx.compile(make_mlp(), rank=4, backend="eager")
    x = torch.randn(4, 12)
    stale = model(x).sum()
    fresh = model(x).sum()  # a new forward replaces the refresh of the first
    with pytest.raises(grassfx.GrassError, match="superseded"):
        stale.backward()
    fresh.backward()


def test_compiling_one_module_twice_is_refused_until_unwrapped():
    net = make_mlp()
    first = grassfx.compile(net, rank=4, backend="eager")
    with pytest.raises(grassfx.ConfigError, match="already"):
        grassfx.compile(net, rank=4, backend="eager")
    with pytest.raises(grassfx.ConfigError, match="already"):
        grassfx.compile(nn.Sequential(net.up), rank=4, backend="eager")  # a part of it too
    grassfx.compile(grassfx.unwrap(first), rank=4, backend="eager")


def test_state_dict_holds_the_weights_with_owed_decay_applied():
    model = grassfx.compile(make_mlp(), rank=4, update_freq=100, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, [torch.randn(4, 12) for _ in range(3)])
    truth = grassfx.unwrap(copy.deepcopy(model)).state_dict()
    outer = model.state_dict()
    inner = model.module.state_dict()  # what save_pretrained writes
    for name, value in truth.items():
        assert torch.equal(outer["module." + name], value), name
        assert torch.equal(inner[name], value), name
    # the saved state resumes: owed decay is not applied twice
    fresh = grassfx.compile(make_mlp(seed=1), rank=4, update_freq=100, backend="eager")
    fresh.load_state_dict(outer)
    assert all(float(s.decay_pending) == 1.0 for s in fresh.sites)
    assert torch.equal(grassfx.unwrap(fresh).up.weight, truth["up.weight"])


def _interrupted_run(moments, weight_decay, after_step):
    """Train 6 steps, checkpointing at step 2 (a refresh); resume a fresh model from it."""
    xs = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def make():
        model = grassfx.compile(make_mlp(), rank=4, update_freq=2, moments=moments, backend="eager")
        return model, grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)

    def save(model, opt):
        return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})  # as if written to disk

    model, opt = make()
    for i, x in enumerate(xs):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if i == 2 and not after_step:  # what a SIGTERM handler would save
            saved = save(model, opt)
        opt.step()
        if i == 2 and after_step:
            saved = save(model, opt)
    resumed, opt2 = make()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x in xs[2 if not after_step else 3:]:  # an interrupted step is redone
        opt2.zero_grad()
        resumed(x).pow(2).mean().backward()
        opt2.step()
    return model.state_dict(), resumed.state_dict()


@pytest.mark.parametrize("moments", ["reset", "keep_overlap"])
@pytest.mark.parametrize("weight_decay, after_step", [(0.0, False), (0.1, True)])
def test_checkpoint_at_a_refresh_step_resumes_exactly(moments, weight_decay, after_step):
    done, resumed = _interrupted_run(moments, weight_decay, after_step)
    for (name, a), b in zip(done.items(), resumed.values()):
        assert torch.equal(a, b), name


def test_checkpoint_between_backward_and_step_with_weight_decay_resumes_closely():
    # the redone step's forward sees the owed decay applied (the saved weights are the
    # weights as they are); the interrupted run's forward saw rows still owing it
    done, resumed = _interrupted_run("reset", 0.1, after_step=False)
    for (name, a), b in zip(done.items(), resumed.values()):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=0), name


def test_model_on_the_meta_device_is_refused_at_compile():
    with torch.device("meta"):
        net = make_mlp()
    with pytest.raises(grassfx.UnsupportedModelError, match="to_empty"):
        grassfx.compile(net, rank=4, backend="eager")


@pytest.mark.parametrize("kw", [dict(mode="fastest"), dict(mode=3), dict(dynamic="yes"), dict(dynamic=1)])
def test_invalid_mode_or_dynamic_is_a_config_error(kw):
    with pytest.raises(grassfx.ConfigError):
        grassfx.compile(make_mlp(), rank=4, **kw)


def test_empty_targets_is_an_error_not_automatic():
    with pytest.raises(grassfx.ConfigError, match="targets=None"):
        grassfx.compile(make_mlp(), rank=4, targets=[], backend="eager")


def test_tied_head_named_in_targets_says_it_is_tied():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(self.embed(x))

    with pytest.raises(grassfx.UnsupportedModelError, match="tied"):
        grassfx.compile(TiedLM(), rank=4, targets="head.weight", backend="eager")


def test_two_grassfx_optimizers_over_one_model_advance_the_step_once():
    model = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend="eager")
    up = [p for n, p in model.named_parameters() if n.startswith(("module.up.", "sites.0."))]
    rest = [p for p in model.parameters() if all(p is not q for q in up)]
    opts = [grassfx.optim.AdamW(up, lr=1e-2), grassfx.optim.SGD(rest, lr=1e-2)]
    for _ in range(3):
        model(torch.randn(4, 12)).pow(2).mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert model.step == 3
    assert int(model.grass_refreshed_at) == 2


def _poison_row(y, row, value):
    """Make row ``row`` of the weight gradient of the Linear whose output is ``y`` non-finite."""
    y.register_hook(lambda g: g.index_fill(1, torch.tensor([row]), value))
    return y


@pytest.mark.parametrize("method, value", [("top_r", math.nan), ("multinorm", math.nan),
                                           ("multinorm_nr", math.nan), ("multinorm_nr", math.inf)])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_refused_refresh_never_applies_the_new_rows_gradient(method, value, mode):
    # issue 27 item 4: a NaN/Inf in a row the refresh does not select made the multinorm
    # selectors fall back to uniform norms; the refresh was refused (old rows kept) but the
    # handle held the drawn rows' gradient, and step() applied it to the old rows
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 8, generator=g) for _ in range(4)]
    models = []
    for poisoned in (False, True):
        net = make_linear()
        model = grassfx.compile(net, rank=4, update_freq=2, selection=method, backend="eager")
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, nonfinite=mode)
        _train(model, opt, xs[:2])  # a refresh, then a normal step: the next step refreshes
        if poisoned:
            site = model.sites[0]
            row = next(r for r in range(site.rows) if r not in site.idx.tolist())
            before, idx = net.weight.detach().clone(), site.idx.clone()
            opt.zero_grad()
            _poison_row(model(torch.randn(4, 8)), row, value).pow(2).mean().backward()
            assert torch.equal(site.idx, idx)  # the refresh was refused
            if mode == "raise":
                with pytest.raises(grassfx.NonFiniteGradientError):
                    opt.step()
            else:
                opt.step()
                assert opt.skipped_steps == 1
            assert torch.equal(net.weight, before)
        _train(model, opt, xs[2:])  # the refresh is redone: as if the bad batch never came
        models.append(net.weight.detach())
    torch.testing.assert_close(models[1], models[0], rtol=0, atol=0)


def _decayed_model():
    """An MLP after two steps with weight decay: its unselected rows owe decay."""
    model = grassfx.compile(make_mlp(), rank=4, update_freq=100, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, [torch.randn(4, 12) for _ in range(2)])
    assert all(float(s.decay_pending) < 1.0 for s in model.sites)
    return model


def test_weights_loaded_into_the_wrapped_module_owe_no_decay():
    # issue 27 item 6: loading the user's module applied the old weights' owed decay to the
    # loaded ones (state then ~1e-3 off what was loaded)
    model = _decayed_model()
    sd = make_mlp(seed=1).state_dict()
    model.module.load_state_dict(sd)
    assert all(float(s.decay_pending) == 1.0 for s in model.sites)
    for name, value in model.module.state_dict().items():  # state_dict() settles owed decay
        assert torch.equal(value, sd[name]), name


@pytest.mark.parametrize("outer", [False, True], ids=["module", "grass_model"])
def test_a_partial_load_keeps_the_debt_of_weights_not_loaded(outer):
    model = _decayed_model()
    truth = grassfx.unwrap(copy.deepcopy(model)).state_dict()  # every debt paid
    new_up = make_mlp(seed=1).up.weight.detach().clone()
    if outer:
        model.load_state_dict({"module.up.weight": new_up}, strict=False)
    else:
        model.module.load_state_dict({"up.weight": new_up}, strict=False)
    assert float(model.site("up.weight").decay_pending) == 1.0
    assert float(model.site("down.weight").decay_pending) < 1.0
    sd = model.module.state_dict()
    assert torch.equal(sd["up.weight"], new_up)
    assert torch.equal(sd["down.weight"], truth["down.weight"])


def test_a_submodule_load_owes_no_decay_and_a_full_checkpoint_keeps_its_own_debt():
    model = _decayed_model()
    new_down = make_mlp(seed=1).down.state_dict()
    model.module.down.load_state_dict(new_down)
    assert torch.equal(model.module.state_dict()["down.weight"], new_down["weight"])
    saved = model.state_dict()  # settled: every debt 1
    with torch.no_grad():
        model.site("up.weight").decay_pending.fill_(0.5)
    assert model.sites[0].name == "up.weight"
    saved["sites.0.decay_pending"] = torch.tensor(0.25, dtype=torch.float64)
    model.load_state_dict(saved)  # the checkpoint's own debt wins over the loaded weight's reset
    assert float(model.site("up.weight").decay_pending) == 0.25
