"""Tiny built-in models for ``grassfx explain|diff --demo NAME`` and for trying grassfx out.

Each demo is a factory returning ``(model, example_inputs)``: a plain ``nn.Module`` (not
yet compiled) and the inputs of one training step (a dict of keyword arguments or a
tuple of positional ones). The token count T of every example differs from every
weight dimension, so a weight-shaped GEMM in a graph is never an activation by chance.
Hugging Face demos need ``transformers`` and build their models from configs (no
download); dropout is off so that compiled and eager runs agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from grassfx.errors import ConfigError

__all__ = ["Demo", "DEMOS", "get_demo", "mlp", "llama_tiny", "gpt2_tiny"]


@dataclass(frozen=True)
class Demo:
    """A named factory and the rank that makes sense for its layer sizes."""

    name: str
    factory: Callable
    rank: int
    description: str


def mlp(seed: int = 0) -> tuple:
    """A 3-layer MLP (64 -> 256 -> 256 -> 64) on a (2, 20, 64) batch: T = 40.

    Example:
        >>> model, (x,) = mlp()
        >>> tuple(model(x).shape)
        (2, 20, 64)
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 64)
    )
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(seed))
    return model, (x,)


def _token_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("this demo needs transformers: pip install 'grassfx[train]'") from None
    return transformers


def llama_tiny(seed: int = 0) -> tuple:
    """A 2-layer LLaMA (hidden 32, GQA 4/2 heads, vocab 96) on a (2, 24) batch: T = 48.

    Example:
        >>> model, batch = llama_tiny()  # doctest: +SKIP
        >>> model(**batch).loss  # doctest: +SKIP
        tensor(4.58..., grad_fn=...)
    """
    tf = _transformers()
    config = tf.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    return model, _token_batch(96, 2, 24, seed)


def gpt2_tiny(seed: int = 0) -> tuple:
    """A 2-layer GPT-2 (n_embd 32, 4 heads, vocab 80, tied head) on a (2, 24) batch: T = 48.

    ``loss_type`` is set and bos/eos ids lie inside the small vocabulary: otherwise
    transformers logs a one-time warning in the loss, which breaks the compiled graph.

    Example:
        >>> model, batch = gpt2_tiny()  # doctest: +SKIP
        >>> model.lm_head.weight is model.transformer.wte.weight  # doctest: +SKIP
        True
    """
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=80, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model, _token_batch(80, 2, 24, seed)


DEMOS = {
    "mlp": Demo("mlp", mlp, 16, "3-layer MLP, plain PyTorch"),
    "llama-tiny": Demo("llama-tiny", llama_tiny, 8, "2-layer Hugging Face LLaMA from a config"),
    "gpt2-tiny": Demo("gpt2-tiny", gpt2_tiny, 8, "2-layer Hugging Face GPT-2 (Conv1D weights, tied head)"),
}


def get_demo(name: str) -> Demo:
    """The demo called ``name``.

    Example:
        >>> get_demo("mlp").rank
        16
    """
    if name not in DEMOS:
        raise ConfigError(f"demo={name!r} is not a demo; choose one of: {', '.join(DEMOS)}")
    return DEMOS[name]
