"""One-shot GPU check: Triton-lowered rewritten graphs, then step time and memory vs dense.

1. Correctness on CUDA: a tiny Llama, grassfx compiled with Inductor (Triton kernels)
   against eager grassfx, fp32 and bf16 autocast: max relative difference of the
   compressed gradients over a refresh step and a normal step, and how many projected
   weights the pass rewrote.
2. Step time and peak memory, bf16 autocast: dense torch.compile + torch.optim.AdamW
   against grassfx (benchmarks/step_time.py), for a LLaMA-shaped model and an MLP stack.

Example:
    python benchmarks/gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import grassfx

sys.path.insert(0, os.path.dirname(__file__))
import step_time  # noqa: E402


def correctness(dtype_mode: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script
    net = LlamaForCausalLM(cfg).to(dev).eval()
    eager = grassfx.compile(copy.deepcopy(net), rank=8, update_freq=10, backend="eager")
    comp = grassfx.compile(net, rank=8, update_freq=10, backend="inductor")
    worst = 0.0
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 96, (3, 10), generator=g).to(dev)
        for m in (eager, comp):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype_mode == "bf16"):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        for a, b in zip(eager.sites, comp.sites):
            rel = ((a.handle.grad - b.handle.grad).abs().max() / a.handle.grad.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, rel)
        for m in (eager, comp):
            for s in m.sites:
                s.handle.grad = None
            m.grass_step += 1
    rewritten = {c.weight for c in comp.compile_report.changes() if c.action == "rewrote"}
    return {"dtype": dtype_mode, "max_rel_diff": worst, "rewritten": len(rewritten),
            "projected": len(comp.sites), "frames": comp.compile_report.frames}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_results.json")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5504)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out["correctness"] = [correctness("fp32"), correctness("bf16")]
    print(json.dumps(out["correctness"]), flush=True)
    common = ["--device", "cuda", "--dtype", "bf16", "--steps", str(args.steps), "--warmup", "3",
              "--rank", str(args.rank), "--tokens", str(args.tokens)]
    out["llama"] = step_time.main(common + ["--model", "llama", "--hidden", str(args.hidden), "--inter", str(args.inter),
                                            "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq", str(args.seq)])
    out["mlp"] = step_time.main(common + ["--model", "mlp", "--hidden", "4096", "--inter", "16384", "--layers", "4"])
    out["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("total", round(out["wall_s"]), "s")


if __name__ == "__main__":
    main()
