"""Activation checkpointing with grassfx, every backend: ``torch.utils.checkpoint`` (reentrant
and not) and Hugging Face ``gradient_checkpointing_enable``.

Oracle: the checkpointed model and the same model without checkpointing, from the same
weights and seed, give the same losses, the same compressed gradients (handles), the same
dense gradients of every other parameter and the same selected rows, over steps that
include refreshes (``update_freq=2``: refreshes at steps 0 and 2). Dropout is off.
Compiled, every projected weight inside the checkpointed region is rewritten.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import grassfx

import zoo
from conftest import llama_batch, make_llama


class Block(zoo.Checkpointed):
    """Two linears inside a checkpoint, a head outside; ``reentrant=None``: no checkpoint."""

    def __init__(self, reentrant=None):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        h = self._inner(x) if self.reentrant is None else checkpoint(self._inner, x, use_reentrant=self.reentrant)
        return self.head(h).pow(2).mean()


def _block_batch(step):
    # reentrant checkpointing passes gradients only through inputs that require them (as in
    # plain PyTorch); a real model's checkpointed input is an activation, so it does
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(step))
    return {"x": x.requires_grad_(True)}


def _compare(reference, checkpointed, batch, loss_of, backend, steps=3, reference_backend=None, tol=None):
    models = [grassfx.compile(reference, rank=4, update_freq=2, backend=reference_backend or backend),
              grassfx.compile(checkpointed, rank=4, update_freq=2, backend=backend)]
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    rtol, atol = tol or (1e-5, 1e-6)
    for step in range(steps):
        inputs = batch(step)
        losses = []
        for model in models:
            loss = loss_of(model(**inputs))
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=rtol, abs=atol), (step, losses)
        ref, ck = models
        for a, b in zip(ref.sites, ck.sites):
            assert torch.equal(a.idx, b.idx), (step, a.name)
        for (name, a), b in zip(ref.named_parameters(), ck.parameters()):
            assert (a.grad is None) == (b.grad is None), (step, name)
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, msg=f"step {step}: {name}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
    if backend != "eager":  # the checkpointed region is traced: every weight rewritten, no dense fallback
        changes = models[1].compile_report.changes()
        assert {c.weight for c in changes if c.action == "rewrote"} == {s.name for s in models[1].sites}
        assert all(c.action == "rewrote" for c in changes), [(c.weight, c.detail) for c in changes]


def _block_pair(reentrant):
    torch.manual_seed(0)
    ref = Block()
    ck = copy.deepcopy(ref)
    ck.reentrant = reentrant
    return ref, ck


@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_equals_no_checkpoint(reentrant, backend):
    ref, ck = _block_pair(reentrant)
    _compare(ref, ck, _block_batch, lambda loss: loss, backend)


def _compare_steps(backend, loss_of, steps=3):
    """The reentrant-checkpointed Block against the plain one, both trained by ``loss_of(model, step)``."""
    ref, ck = _block_pair(True)
    models = [grassfx.compile(m, rank=4, update_freq=2, backend=backend) for m in (ref, ck)]
    opts = [grassfx.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    for step in range(steps):
        for m in models:
            loss_of(m, step).backward()
        for a, b in zip(models[0].sites, models[1].sites):
            assert torch.equal(a.idx, b.idx), (step, a.name)
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            assert (a.grad is None) == (b.grad is None), (step, name)
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_reentrant_no_grad_forward_before_backward(backend):
    """An evaluation forward without gradients between a forward and its backward."""

    def loss_of(model, step):
        loss = model(**_block_batch(step))
        with torch.no_grad():
            model(**_block_batch(step + 10))
        return loss

    _compare_steps(backend, loss_of)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_reentrant_two_forwards_one_backward(backend):
    """Two forwards, one backward on a normal step (a refresh step refuses it, checkpointed or not)."""

    def loss_of(model, step):
        loss = model(**_block_batch(step))
        return loss if step == 0 else loss + model(**_block_batch(step + 10))

    _compare_steps(backend, loss_of, steps=2)


@torch.compiler.disable
def _opaque(h):
    return h * 1.0  # called from a compiled frame: a graph break


class BrokenBlock(Block):
    """A graph break inside the checkpointed region: Dynamo runs the checkpoint itself eagerly
    and recomputes through compiled frames in the backward (Hugging Face layers wrapped by
    the ``kernels`` package do this)."""

    def _inner(self, x):
        return self.down(_opaque(torch.relu(self.up(x))))


@pytest.mark.parametrize("reentrant", [False, True])
def test_graph_break_inside_checkpoint_aot_eager(reentrant):
    torch.manual_seed(0)
    ref = BrokenBlock()
    ck = copy.deepcopy(ref)
    ck.reentrant = reentrant
    models = [grassfx.compile(m, rank=4, update_freq=2, backend="aot_eager") for m in (ref, ck)]
    for step in range(3):
        for m in models:
            m(**_block_batch(step)).backward()
        for a, b in zip(models[0].sites, models[1].sites):
            assert torch.equal(a.idx, b.idx)
            torch.testing.assert_close(b.handle.grad, a.handle.grad, rtol=1e-5, atol=1e-6)
        for m in models:
            m.zero_grad()


def _hf_pair(kwargs, layers=2):
    ref = make_llama(num_hidden_layers=layers).train()  # dropout is 0 in the tiny config
    ck = copy.deepcopy(ref)
    ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert ck.model.gradient_checkpointing
    return ref, ck


# None: transformers' default arguments
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}])
def test_hf_gradient_checkpointing_equals_no_checkpoint_eager(kwargs):
    ref, ck = _hf_pair(kwargs)
    _compare(ref, ck, llama_batch, lambda out: out.loss, "eager")


@pytest.mark.parametrize("kwargs", [{"use_reentrant": False}, {"use_reentrant": True}])
def test_hf_gradient_checkpointing_equals_no_checkpoint_aot_eager(kwargs):
    ref, ck = _hf_pair(kwargs, layers=1)
    _compare(ref, ck, llama_batch, lambda out: out.loss, "aot_eager")


def test_hf_gradient_checkpointing_enabled_on_the_grassfx_model():
    """``gradient_checkpointing_enable`` called on the model grassfx returned reaches the module."""
    ref = make_llama(num_hidden_layers=1).train()
    model = grassfx.compile(copy.deepcopy(ref), rank=4, update_freq=2, backend="eager")
    model.gradient_checkpointing_enable()
    assert model.module.model.gradient_checkpointing
    plain = grassfx.compile(ref, rank=4, update_freq=2, backend="eager")
    for m in (plain, model):
        m(**llama_batch(0)).loss.backward()
    for a, b in zip(plain.sites, model.sites):
        assert torch.equal(a.idx, b.idx)
        torch.testing.assert_close(b.handle.grad, a.handle.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_hf_gradient_checkpointing_inductor_equals_eager_without_checkpoint():
    """Inductor compiles the checkpointed model; the reference runs eagerly (one compile)."""
    ref, ck = _hf_pair({"use_reentrant": False}, layers=1)
    _compare(ref, ck, llama_batch, lambda out: out.loss, "inductor", reference_backend="eager", tol=(1e-4, 1e-5))
