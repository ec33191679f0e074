"""Tiny Hugging Face models of many architectures (random weights, dropout off) with a batch each.

Each entry builds a model small enough to compile in seconds and a ``batch(seed)`` of
inputs whose ``.loss`` (or a reduction of the output) is the training loss.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def _no_dropout(config):
    for key in list(vars(config)):
        if "dropout" in key or "pdrop" in key or key in ("attention_probs_dropout_prob", "hidden_dropout_prob"):
            if isinstance(getattr(config, key), float):
                setattr(config, key, 0.0)
    return config


def _lm_batch(seed, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64, tie_word_embeddings=False)


def _hf(config_cls: str, model_cls: str, after=None, **kw):
    """A builder of ``transformers.<model_cls>(<config_cls>(**kw))`` with dropout off;
    ``after(config)`` may adjust the config first."""

    def build():
        import transformers

        config = _no_dropout(getattr(transformers, config_cls)(**kw))
        if after is not None:
            after(config)
        return getattr(transformers, model_cls)(config)

    return build


def _causal(config_cls, model_cls, **kw):
    return _hf(config_cls, model_cls, **{**_DECODER, **kw})


def _batched_experts(config):
    config._experts_implementation = "batched_mm"  # gather + bmm: the expert GEMMs rewritable in one graph


_gpt2 = _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)
_neox = _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
_opt = _hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=1,
           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
_falcon = _hf("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2)
_mixtral = _causal("MixtralConfig", "MixtralForCausalLM", after=_batched_experts, num_key_value_heads=2,
                   num_local_experts=4, num_experts_per_tok=2)
_bert = _hf("BertConfig", "BertForMaskedLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
_t5 = _hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1,
          num_heads=4, decoder_start_token_id=0)
_mamba = _hf("MambaConfig", "MambaForCausalLM", vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=1,
             expand=2, conv_kernel=4, tie_word_embeddings=False)
_vit = _hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=8, num_channels=3, hidden_size=32,
           num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, num_labels=5,
           problem_type="single_label_classification")


def _vit_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.randint(0, 5, (2,), generator=g)}


_whisper = _hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB, num_mel_bins=8, d_model=32,
               encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=8, max_target_positions=16,
               decoder_start_token_id=1, pad_token_id=0)


def _whisper_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(2, 8, 16, generator=g),
            "labels": torch.randint(2, VOCAB, (2, 6), generator=g)}


class ConvNet(nn.Module):
    """A conv stem (kernels stay dense) and a linear classifier head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, pixel_values, labels):
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(pixel_values)), 4).flatten(1)  # (b, 8*4*4)
        return nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(h))), labels)


class MHANet(nn.Module):
    """``nn.TransformerEncoderLayer`` (its attention is ``nn.MultiheadAttention``) and a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, input_ids, labels):
        logits = self.out(self.layer(self.emb(input_ids)))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _llama_with_graph_break():
    """A Llama whose attention block breaks Dynamo's graph (a hook, as tracing tools add)."""
    model = _causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)()
    model.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: torch._dynamo.graph_break())
    return model


#: name -> (build, batch(seed))
ZOO = {
    "gpt2": (_gpt2, _lm_batch),
    "llama": (_causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), _lm_batch),
    "llama_graph_break": (_llama_with_graph_break, _lm_batch),
    "mistral": (_causal("MistralConfig", "MistralForCausalLM", num_key_value_heads=2), _lm_batch),
    "qwen2": (_causal("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), _lm_batch),
    "qwen3": (_causal("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8), _lm_batch),
    "phi": (_causal("PhiConfig", "PhiForCausalLM"), _lm_batch),
    "phi3": (_causal("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0), _lm_batch),
    "gemma": (_causal("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8), _lm_batch),
    "gpt_neox": (_neox, _lm_batch),
    "opt": (_opt, _lm_batch),
    "falcon": (_falcon, _lm_batch),
    "mixtral": (_mixtral, _lm_batch),
    "bert": (_bert, _lm_batch),
    "t5": (_t5, _lm_batch),
    "vit": (_vit, _vit_batch),
    "whisper": (_whisper, _whisper_batch),
    "mamba": (_mamba, _lm_batch),
    "convnet": (ConvNet, _vit_batch),
    "mha": (MHANet, _lm_batch),
}


def loss_of(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else out
