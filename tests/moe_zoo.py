"""Tiny mixture-of-experts models for the expert-stack tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_mixtral(seed=0, experts_implementation="batched_mm", layers=2):
    """Transformers' Mixtral: hidden 32, 4 experts, top-2, vocab 64, no dropout.

    ``experts_implementation``: ``"batched_mm"`` (gather + bmm: one graph), ``"eager"``
    (a loop over the experts hit: graph breaks) or ``None`` (transformers' default).
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, attention_dropout=0.0, router_jitter_noise=0.0)
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    model = MixtralForCausalLM(cfg)
    model.loss_type = "ForCausalLM"  # else transformers' warning_once graph-breaks
    return model.eval()


def mixtral_batch(seed=0, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


class LoopExperts(nn.Module):
    """E experts applied in a static Python loop, ``F.linear(x[e], self.w[e])``: in a graph,
    each expert's weight gradient is a ``select_backward`` of an ``mm``."""

    def __init__(self, experts=3, d_in=6, d_out=10):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.out = nn.Linear(d_out, d_out, bias=False)

    def forward(self, x):  # x: (E, T, d_in)
        outs = [F.linear(x[e], self.w[e]) for e in range(x.shape[0])]
        return self.out(torch.stack(outs).tanh() + self.bias)


def make_loop_experts(seed=0, **kw):
    torch.manual_seed(seed)
    return LoopExperts(**kw)


def make_llama4(seed=0):
    """Transformers' Llama 4 text model: experts as ``bmm(x, W)`` over a (E, k, n) stack."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    cfg = Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=64,
                           interleave_moe_layer_step=1, attention_chunk_size=16)
    model = Llama4ForCausalLM(cfg)
    for p in model.parameters():
        if p.dim() == 3:  # transformers leaves the expert stacks at zero until weights are loaded
            nn.init.normal_(p, std=0.05)
    model.loss_type = "ForCausalLM"
    return model.eval()
