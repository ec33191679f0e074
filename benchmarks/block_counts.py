"""Rows of each q|k|v block of GPT-2's fused ``c_attn`` that grassfx selects, refresh by refresh.

The tiny preset built as GPT-2 (``grassfx train --arch gpt2``), trained on Shakespeare
with the settings of the ``tiny-blocks`` quality plan (rank 64, a refresh every 12 steps,
``keep_overlap``, re-warmup 10, lr 2e-3), counting at every refresh how many of each
c_attn's selected columns (its fused dim) fall in q, k and v.

Usage::

    python benchmarks/block_counts.py --explore 0.25 --steps 300 --blocks none   # the failure
    python benchmarks/block_counts.py --explore 0.25 --steps 300 --blocks auto   # per block
"""

from __future__ import annotations

import argparse
import json

import torch

import grassfx
import grassfx.optim
from grassfx.recipes import data as data_mod
from grassfx.recipes import presets


def count(explore: float, steps: int, blocks: str, seed: int = 0) -> dict:
    """``{weight: [q, k, v] rows summed over refreshes}`` and the number of refreshes."""
    corpus = data_mod.load_corpus(None, vocab_size=8192)
    model = presets.build_model(presets.get_preset("tiny"), seed, vocab_size=corpus.vocab_size, arch="gpt2")
    model = grassfx.compile(model, rank=64, update_freq=12, moments="keep_overlap", explore=explore,
                            backend="eager", seed=seed, blocks=None if blocks == "auto" else False)
    opt = grassfx.optim.AdamW(model.parameters(), lr=2e-3, rewarmup=10)
    sampler = data_mod.BatchSampler(corpus.train, 4, 128, seed=seed)
    sites = [s for s in model.sites if s.name.endswith("c_attn.weight")]
    width = sites[0].rows // 3  # c_attn's out dim is q | k | v, equal
    totals = {s.name: [0, 0, 0] for s in sites}
    refreshes = 0
    for step in range(steps):
        x = next(sampler)
        model(input_ids=x, labels=x).loss.backward()
        if step % 12 == 0:  # the rows this refresh committed
            refreshes += 1
            for s in sites:
                per = torch.bincount(s.idx // width, minlength=3).tolist()
                totals[s.name] = [a + b for a, b in zip(totals[s.name], per)]
        opt.step()
        opt.zero_grad()
    return dict(explore=explore, steps=steps, blocks=blocks, refreshes=refreshes, qkv_rows=totals)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--explore", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--blocks", choices=["auto", "none"], default="none")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = count(args.explore, args.steps, args.blocks)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
