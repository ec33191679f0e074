"""Where grassfx's compile time goes, on a small Llama (cold caches).

Times the first steps of dense ``torch.compile`` + ``torch.optim.AdamW`` and of grassfx
(Inductor) + ``grassfx.optim.AdamW`` (compiled step), forward+backward and optimizer
step separately, and the compiled optimizer step alone with and without weight decay.
Run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` so every graph compiles cold.

Example:
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/compile_breakdown.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import grassfx


def build(layers: int, intermediate: int = 1024, seq: int = 256):
    """A Llama (d 256, vocab 2048) with random weights and a (2, seq) batch of token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    ids = torch.randint(0, 2048, (2, seq), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}


def timed_steps(model, opt, batch, n=3):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        out.append({"fwd_bwd_s": round(t1 - t0, 2), "opt_s": round(time.perf_counter() - t1, 2)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {}
    net, batch = build(args.layers)
    torch._dynamo.reset()
    result["dense"] = timed_steps(torch.compile(net), torch.optim.AdamW(net.parameters()), batch)
    net, batch = build(args.layers)
    torch._dynamo.reset()
    model = grassfx.compile(net, rank=32)
    result["grassfx"] = timed_steps(model, grassfx.optim.AdamW(model.parameters()), batch)
    for wd in (0.1, 0.0):  # the optimizer step alone (eager model, compiled step)
        net, batch = build(args.layers)
        torch._dynamo.reset()
        model = grassfx.compile(net, rank=32, backend="eager")
        opt = grassfx.optim.AdamW(model.parameters(), weight_decay=wd, compiled=True)
        result[f"optimizer_only_wd{wd}"] = timed_steps(model, opt, batch, n=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
