"""Pure bf16 training with grassfx: float32 master weights vs bf16 weights and state.

What it measures
    Training and evaluation loss of one LLaMA (a ``recipes`` preset, random init) trained
    by grassfx four ways from the same weights on the same batches:

    * ``fp32-master``      -- float32 weights and AdamW state, forward and backward under
      ``torch.autocast("cpu", dtype=torch.bfloat16)`` (mixed precision: the reference);
    * ``bf16-nearest``     -- ``model.to(torch.bfloat16)``: bf16 weights, bf16 moments, no
      master copy; ``grassfx.optim.AdamW(update_rounding="nearest")`` (the default);
    * ``bf16-stochastic``  -- the same, ``update_rounding="stochastic"``;
    * ``bf16-kahan``       -- the same, ``update_rounding="kahan"`` (a bf16 compensation
      buffer per parameter, the selected rows only for projected weights).

    Reported per run: mean training loss over the last 10 steps, evaluation loss on fixed
    windows of the held-out split (``recipes.data.eval_windows``, spread evenly), the gap
    of each to the reference, optimizer-state bytes and wall time.

How
    Shakespeare (``recipes.data.load_corpus``), ``grassfx.compile(model, rank, update_freq,
    backend="eager")``, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) at ``--lr`` with
    the recipes' schedule (linear warm-up over 10% of the steps, cosine decay to 10%): the
    late, small learning rates are where round-to-nearest drops updates. One seed.

Usage
    python benchmarks/bf16_quality.py --preset tiny --steps 60 --batch-size 4 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import grassfx
from grassfx.recipes import data as data_mod
from grassfx.recipes.measure import optimizer_state_bytes
from grassfx.recipes.presets import build_config, get_preset
from grassfx.recipes.train import lr_lambda

RUNS = (("fp32-master", None), ("bf16-nearest", "nearest"), ("bf16-stochastic", "stochastic"),
        ("bf16-kahan", "kahan"))


def build_model(preset, vocab_size: int, seed: int, bf16: bool):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_config(preset, vocab_size=vocab_size))
    return model.to(torch.bfloat16) if bf16 else model


def run(name, rounding, corpus, windows, args, preset) -> dict:
    pure = rounding is not None
    model = grassfx.compile(build_model(preset, corpus.vocab_size, args.seed, pure), rank=args.rank,
                            update_freq=args.update_freq, seed=args.seed, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              update_rounding=rounding or "nearest")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure)
    batches = data_mod.BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed)
    torch.manual_seed(args.seed)  # stochastic rounding draws from the global generator
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        x = next(batches)
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for b in windows.split(8):
            total += float(model(input_ids=b, labels=b).loss.float()) * b.shape[0]
            count += b.shape[0]
    return {"run": name, "train_loss": sum(losses[-10:]) / len(losses[-10:]), "eval_loss": total / count,
            "state_bytes": optimizer_state_bytes(opt), "seconds": time.perf_counter() - start,
            "losses": losses}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=None, help="default: the preset's")
    p.add_argument("--update-freq", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    args.rank = args.rank or preset.rank
    corpus = data_mod.load_corpus(None, vocab_size=preset.vocab_size)
    windows = data_mod.spread(data_mod.eval_windows(corpus.eval, args.seq_len), args.eval_windows)
    results = [run(name, rounding, corpus, windows, args, preset) for name, rounding in RUNS]
    ref = results[0]
    print(f"preset {args.preset}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr} "
          f"(warm-up, cosine to 10%), rank {args.rank}, update_freq {args.update_freq}, seed {args.seed}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{'run':<17}{'train loss':>11}{'gap':>9}{'eval loss':>11}{'gap':>9}{'state MiB':>11}{'seconds':>9}")
    for r in results:
        print(f"{r['run']:<17}{r['train_loss']:>11.4f}{r['train_loss'] - ref['train_loss']:>+9.4f}"
              f"{r['eval_loss']:>11.4f}{r['eval_loss'] - ref['eval_loss']:>+9.4f}"
              f"{r['state_bytes'] / 2**20:>11.2f}{r['seconds']:>9.1f}")
    out = {"args": vars(args), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=lambda o: None if math.isnan(o) else o))
    return out


if __name__ == "__main__":
    main()
