"""The large allocations of a compiled grassfx training step, allocation by allocation.

A LLaMA with a large vocabulary and a small hidden size (vocabulary 32000, h 512, 2
layers: the embedding and head dominate) compiled with grassfx (Inductor) and trained by
``grassfx.optim.Muon`` with the split ``full_state`` (the memory mode of
``benchmarks/RESULTS.md`` section 4). For each of a few steps it lists every allocation
and free of at least ``--min-mib`` MiB inside forward + backward and inside the optimizer
step (``grassfx.debug.memory.track_memory``), next to the size of the embedding in the
weights' dtype and in float32. Step 0 is a refresh (eager); the others run the compiled
graph.

This is how the float32 buffer of the embedding's size that Inductor's bf16 embedding
backward makes was found (it is absent in fp32).

Example:
    python benchmarks/bf16_backward_buffers.py --dtype bf16 --out benchmarks/results/bf16_backward_buffers_bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 2**20


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--min-mib", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import grassfx
    from grassfx.debug.memory import track_memory
    from recipes.presets import Preset, build_model

    preset = Preset("probe", rank=64, max_position_embeddings=512, vocab_size=32000, hidden_size=512,
                    intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8)
    model = build_model(preset, seed=0).to(DTYPES[args.dtype])
    runner = grassfx.compile(model, rank=64, update_freq=100)
    embedding = model.get_input_embeddings().weight
    opt = grassfx.optim.Muon(grassfx.optim.embedding_groups(runner.parameters(), embedding, "factored_nomomentum"),
                             lr=1e-4, full_state="factored")
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(1))
    sizes = dict(embedding_mib=embedding.nbytes / MIB, embedding_float32_mib=embedding.numel() * 4 / MIB)
    print(f"dtype {args.dtype}; embedding {sizes['embedding_mib']:.2f} MiB, in float32 "
          f"{sizes['embedding_float32_mib']:.2f} MiB; allocations (+) and frees (-) of >= {args.min_mib} MiB:")
    steps = []
    for step in range(args.steps):
        with track_memory() as fb:
            runner(input_ids=ids, labels=ids).loss.backward()
        with track_memory() as st:
            opt.step()
            opt.zero_grad(set_to_none=True)
        big = {name: [round(b / MIB, 2) for _, b in mem.events if abs(b) >= args.min_mib * MIB]
               for name, mem in (("forward_backward", fb), ("optimizer_step", st))}
        steps.append(dict(step=step, forward_backward_peak_mib=fb.peak / MIB, optimizer_peak_mib=st.peak / MIB, **big))
        print(f"step {step}{' (refresh)' if step == 0 else ''}: forward+backward peak {fb.peak / MIB:.1f} MiB "
              f"{big['forward_backward']}; optimizer step peak {st.peak / MIB:.1f} MiB {big['optimizer_step']}")
    result = dict(dtype=args.dtype, torch=torch.__version__, **sizes, steps=steps)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
