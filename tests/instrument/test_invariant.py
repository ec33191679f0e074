"""The per-step invariant: a projected weight used in a forward delivers its gradient to its
handle, and a grassfx optimizer holding both steps it -- or the step raises before writing.

Each test is a way users trained wrong with no error (issue 27 items 1, 2, 8; issue 32):
it either matches eager grassfx exactly or raises a GrassError with every weight unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grassfx

from conftest import make_llama


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=g) for _ in range(n)]


def _train(model, opt, steps=5, penalty=0.0):
    """``steps`` steps (update_freq=2: refresh steps included); the first weight afterwards."""
    for x in _batches(steps):
        loss = model(x).pow(2).sum()
        if penalty:
            loss = loss + penalty * model.module[0].weight.pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    inner = getattr(model, "_orig_mod", model)  # under an outer torch.compile
    return grassfx.unwrap(inner)[0].weight.detach().clone()


def _eager_reference(penalty=0.0):
    model = grassfx.compile(_net(), rank=4, update_freq=2, backend="eager")
    return _train(model, grassfx.optim.AdamW(model.parameters(), lr=1e-2), penalty=penalty)


# -- item 1: an outer torch.compile ---------------------------------------------------------------
@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_outer_torch_compile_trains_like_eager(inner):
    model = grassfx.compile(_net(), rank=4, update_freq=2, backend=inner)
    outer = torch.compile(model, backend="aot_eager")
    opt = grassfx.optim.AdamW(outer.parameters(), lr=1e-2)
    trained = _train(outer, opt)
    assert torch.equal(trained, _eager_reference())
    if inner == "aot_eager":  # grassfx's own graphs were compiled, not run eagerly by the outer trace
        assert model.compile_report.graphs


# -- item 2 and issue 32: optimizers that would train nothing ---------------------------------------
def _one_backward(model):
    model(_batches(1)[0]).pow(2).sum().backward()


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: grassfx.optim.AdamW(ps, lr=1e-2),
    lambda ps: grassfx.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["torch-adamw", "grassfx-adamw", "grassfx-sgd"])
def test_optimizer_built_before_compile_is_refused_at_its_first_step(make):
    net = _net()
    opt = make(net.parameters())
    model = grassfx.compile(net, rank=4, backend="eager")
    before = _weights(model)
    _one_backward(model)
    with pytest.raises(grassfx.OptimizerMisuseError, match="before grassfx.compile"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


@pytest.mark.parametrize("kwargs", [{"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
def test_every_torch_optimizer_implementation_is_refused_before_writing(cls, kwargs):
    model = grassfx.compile(_net(), rank=4, backend="eager")
    opt = cls(model.parameters(), lr=1e-2, **kwargs)
    before = _weights(model)
    _one_backward(model)
    with pytest.raises(grassfx.OptimizerMisuseError, match="not grassfx-aware"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_torch_optimizer_of_only_the_dense_parameters_is_allowed():
    """Splitting the work (grassfx for the projected weights, torch for the rest) is fine."""
    model = grassfx.compile(_net(), rank=4, backend="eager")
    biases = [model.module[0].bias, model.module[2].bias]
    dense = torch.optim.AdamW(biases, lr=1e-2)
    ids = {id(p) for p in biases}
    grass = grassfx.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=1e-2)
    before = model.module[0].bias.detach().clone()
    _one_backward(model)
    dense.step()
    grass.step()
    assert not torch.equal(before, model.module[0].bias)


def test_the_hf_trainers_default_optimizer_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = grassfx.compile(make_llama().train(), rank=4, backend="eager")
    rows = [{"input_ids": torch.arange(12) % 96, "labels": torch.arange(12) % 96} for _ in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)  # no optimizers=: fused AdamW
    before = _weights(model)
    with pytest.raises(grassfx.OptimizerMisuseError, match="optimizers=\\(grassfx.optim.AdamW"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


# -- item 8: a penalty on a weight, computed outside the forward ---------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_penalty_read_outside_forward_reaches_the_handle(backend):
    model = grassfx.compile(_net(), rank=4, update_freq=2, backend=backend)
    trained = _train(model, grassfx.optim.AdamW(model.parameters(), lr=1e-2), penalty=0.5)
    reference = _eager_reference(penalty=0.5)
    assert not torch.equal(reference, _eager_reference())  # the penalty matters
    assert torch.equal(trained, reference)


def test_penalty_at_a_compiled_refresh_step_raises_instead_of_being_dropped():
    model = grassfx.compile(_net(), rank=4, update_freq=2, backend="aot_eager", refresh="compiled")
    loss = model(_batches(1)[0]).sum() + model.module[0].weight.pow(2).sum()
    with pytest.raises(grassfx.GrassError, match="refresh='eager'"):
        loss.backward()
    # reading the weight there (logging its norm) is fine
    model.module[0].weight.norm().item()


# -- what arrives: gradients that bypassed the anchors ----------------------------------------------
def test_gradients_that_bypass_the_anchors_stop_the_step():
    model = grassfx.compile(_net(), rank=4, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    before = _weights(model)
    model.module(_batches(1)[0]).sum().backward()  # the inner module, not the grassfx model
    with pytest.raises(grassfx.LostGradientError, match="none of its 2 projected weights"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_a_step_without_any_gradient_is_a_no_op_as_in_torch():
    model = grassfx.compile(_net(), rank=4, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    model(_batches(1)[0])  # a forward whose loss is never backpropagated
    before = _weights(model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


# -- issue 32: task heads and unmatched globs ------------------------------------------------------------
def _bert_classifier():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def test_a_task_head_trains_densely_by_default_and_on_request_is_projected():
    from grassfx.instrument.targets import plan_targets

    reasons = {d.name: d.reason for d in plan_targets(_bert_classifier())}
    assert reasons["classifier.weight"] == "task head (outside the base model)"
    assert reasons["bert.pooler.dense.weight"] == ""  # inside the base model: projected
    model = grassfx.compile(_bert_classifier(), rank=4, backend="eager")
    assert "classifier.weight" not in {s.name for s in model.sites}
    asked = grassfx.compile(_bert_classifier(), rank=4, backend="eager", targets=["classifier", "*query"])
    assert "classifier.weight" in {s.name for s in asked.sites}


@pytest.mark.parametrize("arg", ["exclude", "targets"])
def test_a_glob_that_matches_nothing_is_an_error(arg):
    with pytest.raises(grassfx.ConfigError, match=f"{arg}='nonexistent' matches no parameter"):
        grassfx.compile(_net(), rank=4, backend="eager", **{arg: ["0", "nonexistent"]})


@pytest.mark.slow
def test_hf_trainer_with_torch_compile_trains_the_projected_weights(tmp_path):
    """Item 1 as users meet it: ``TrainingArguments(torch_compile=True)`` wraps the model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = [{"input_ids": torch.arange(i, i + 12) % 96, "labels": torch.arange(i, i + 12) % 96} for i in range(8)]

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = grassfx.compile(make_llama().train(), rank=4, update_freq=2, backend="eager")
        q = model.module.model.layers[0].self_attn.q_proj
        before = q._parameters["weight"].detach().clone()
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
        extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(compiled)), max_steps=4,
                                              per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                              save_strategy="no", seed=0, **extra)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, sched)).train()
        assert model.step == 4
        return before, q._parameters["weight"].detach().clone()

    before, eager = run(False)
    _, compiled = run(True)
    assert not torch.equal(before, compiled)  # q_proj trains (it stayed unchanged before the fix)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_projected_layers_the_user_froze_deliver_nothing_and_that_is_no_error():
    """Freezing every projected weight (training only the biases) is a choice, not a lost gradient."""
    model = grassfx.compile(_net(), rank=4, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    for layer in (model.module[0], model.module[2]):
        layer.weight.requires_grad_(False)
    weight, bias = model.module[0]._parameters["weight"].detach().clone(), model.module[0].bias.detach().clone()
    _one_backward(model)
    opt.step()
    assert torch.equal(weight, model.module[0]._parameters["weight"])
    assert not torch.equal(bias, model.module[0].bias)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_penalty_computed_before_the_forward_raises_instead_of_being_dropped(backend):
    """After a step, the weight has changed and the next forward may pick new rows: a gradient
    through a read made then has no rows to go to (it used to be dropped in eager mode)."""
    model = grassfx.compile(_net(), rank=4, update_freq=2, backend=backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    x = _batches(1)[0]
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    penalty = model.module[0].weight.pow(2).sum()  # before the next forward
    loss = model(x).sum() + penalty
    with pytest.raises(grassfx.GrassError, match="before the model's next forward"):
        loss.backward()
