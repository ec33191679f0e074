"""Shared fixtures: tiny models and a clean Dynamo state per test."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import settings
from torch import nn

torch.set_num_threads(min(2, torch.get_num_threads()))

# Tests assert on what the passes did; a graph served from Inductor's FX graph cache or
# the AOTAutograd cache (shared by every process on the machine) runs no pass at all.
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


# Property tests: the same examples on every run (no flaky CI, no example database on disk),
# no per-example deadline (the first example of a process pays for imports and compiles).
settings.register_profile("grassfx", derandomize=True, database=None, deadline=None)
settings.load_profile("grassfx")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    """Two linears with biases and a norm: the smallest interesting target set."""

    def __init__(self, d_in=12, d_hidden=24, d_out=6):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x))))


def make_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(**kw)


def make_linear(seed=0, n_in=8, n_out=16):
    """One bias-free Linear: a single projected weight, the easiest to check by hand."""
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=False)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_llama(seed=0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()  # no dropout anywhere numbers are compared


def make_gpt2(seed=0, vocab=80):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    return model.eval()


def llama_batch(seed=0, batch=2, seq=16, vocab=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def dense_grads(model: nn.Module, loss_fn) -> dict:
    """Plain-autograd gradients of a deep copy of ``model`` (the dense reference)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss_fn(ref).backward()
    return {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
