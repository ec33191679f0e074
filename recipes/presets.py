"""Model size presets for the pretraining job (LLaMA architecture, random init).

Each preset fixes the shape of a ``LlamaForCausalLM`` plus the default
projection rank used by the low-rank optimizers on that size.  The ``60m``
preset follows the smallest LLaMA of the GaLore and Grass papers (hidden 512,
intermediate 1376, 8 layers, 8 heads, 32k vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """Shape of one model size and the rank the low-rank optimizers default to."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rank: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    extra: dict = field(default_factory=dict)

    def config_kwargs(self) -> dict:
        """Keyword arguments for ``transformers.LlamaConfig``."""
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=0.0,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=None,
        )
        kwargs.update(self.extra)
        return kwargs


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # ~60k parameters: for tests and quick smoke runs only.
        Preset("test", vocab_size=512, hidden_size=32, intermediate_size=88,
               num_hidden_layers=2, num_attention_heads=4, rank=8,
               max_position_embeddings=256),
        # ~5.3M parameters (tied embeddings), the CPU demo size.
        Preset("tiny", vocab_size=8192, hidden_size=256, intermediate_size=688,
               num_hidden_layers=4, num_attention_heads=4, rank=64,
               tie_word_embeddings=True),
        # ~20.5M parameters.
        Preset("small", vocab_size=8192, hidden_size=384, intermediate_size=1024,
               num_hidden_layers=8, num_attention_heads=6, rank=128),
        # ~58M parameters, the papers' smallest LLaMA.
        Preset("60m", vocab_size=32000, hidden_size=512, intermediate_size=1376,
               num_hidden_layers=8, num_attention_heads=8, rank=128),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` or raise ``KeyError`` listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def build_config(preset: Preset, vocab_size: int | None = None, attn_implementation: str = "sdpa"):
    """A ``LlamaConfig`` for ``preset``; ``vocab_size`` overrides the preset's vocabulary."""
    from transformers import LlamaConfig

    kwargs = preset.config_kwargs()
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    config = LlamaConfig(**kwargs)
    config._attn_implementation = attn_implementation
    # Fixing the loss type avoids a warning (and a graph break under torch.compile).
    config.loss_type = "ForCausalLMLoss"
    return config


#: model architectures a preset can be built as (``grassfx train --arch``)
ARCHS = ("llama", "gpt2")


def build_gpt2_config(preset: Preset, vocab_size: int | None = None):
    """A ``GPT2Config`` of the preset's width, depth and heads (MLP 4x wide, as GPT-2; no dropout).

    GPT-2 reads its attention weights through one fused ``c_attn`` (q|k|v along the
    output dim), the layout whose row selection :mod:`grassfx.instrument.blocks` splits.
    """
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=preset.vocab_size if vocab_size is None else vocab_size,
        n_positions=preset.max_position_embeddings, n_embd=preset.hidden_size,
        n_layer=preset.num_hidden_layers, n_head=preset.num_attention_heads, n_inner=4 * preset.hidden_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=True, use_cache=False,
    )
    config.loss_type = "ForCausalLMLoss"  # as for LLaMA: no warning (graph break) in the loss
    return config


def build_model(preset: Preset, seed: int, vocab_size: int | None = None,
                attn_implementation: str = "sdpa", arch: str = "llama"):
    """A randomly initialised causal LM (``arch``: ``"llama"`` or ``"gpt2"``); the same ``seed`` gives the same weights."""
    import torch

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    if arch == "gpt2":
        from transformers import GPT2LMHeadModel

        config = build_gpt2_config(preset, vocab_size)
        config._attn_implementation = attn_implementation
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # GPT-2 reads it from the model, not the config
        return model
    from transformers import LlamaForCausalLM

    config = build_config(preset, vocab_size, attn_implementation)
    return LlamaForCausalLM(config)


def count_params(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
