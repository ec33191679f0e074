"""Step time on CPU: the selected GEMMs' row gathers as ATen calls vs fused by Inductor.

``sparsify_wgrad`` gathers the rows each selected weight-gradient GEMM needs (scaled by
rho). On CPU it emits one ``grassfx::take_rows`` node per GEMM, which Inductor runs as an
ATen call (the default, ``GRASSFX_CPU_GATHER=aten``); with ``GRASSFX_CPU_GATHER=inductor``
it emits ``index`` + ``mul``, which Inductor fuses as a second loop into the C++ kernel
that produced the operand. This script trains three copies of one Hugging Face Llama in
one process -- dense (``torch.compile`` + ``AdamW(fused=True)``), grassfx with ATen
gathers, grassfx with Inductor gathers -- and times one step of each in turn, the order
rotated every round, so drifts in machine speed hit all three alike. Reported: each
run's median step time and the median of the per-round ratios.

Example:
    python benchmarks/cpu_gather.py --rounds 12 --out benchmarks/results/cpu_gather_d1024.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

import grassfx
from grassfx import _compat
from grassfx.passes import infra

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (the same model builder as the step-time benchmark)


def _step(model, opt, batch, loss_fn) -> float:
    t0 = time.perf_counter()
    loss_fn(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _grassfx_run(model, gather: str, args, batches, loss_fn):
    """A grassfx copy compiled with ``GRASSFX_CPU_GATHER=gather`` (compiled here, before the next one)."""
    os.environ["GRASSFX_CPU_GATHER"] = gather
    infra.settings.cache_clear()  # the pass and the FX graph cache key read the knob
    m = grassfx.compile(copy.deepcopy(model), rank=args.rank, update_freq=1000, selection="top_r")
    opt = grassfx.optim.AdamW(m.parameters(), lr=1e-4)
    for i in range(3):  # the refresh step (eager), the step that compiles, one more
        _step(m, opt, batches[i % len(batches)], loss_fn)
    return m, opt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_args = argparse.Namespace(model="llama", device="cpu", dtype="fp32", update_freq=1000, **{
        k: getattr(args, k) for k in ("hidden", "inter", "layers", "vocab", "tokens", "seq", "rank")})
    model, batches, loss_fn = step_time.build(build_args)
    saved = os.environ.get("GRASSFX_CPU_GATHER")
    runs = {}
    dense = torch.compile(copy.deepcopy(model))
    dopt = torch.optim.AdamW(dense.parameters(), lr=1e-4, fused=True)
    for i in range(2):  # compile, one more
        _step(dense, dopt, batches[i], loss_fn)
    runs["dense"] = (dense, dopt)
    try:
        for gather in ("aten", "inductor"):
            runs[f"grassfx_{gather}_gather"] = _grassfx_run(model, gather, args, batches, loss_fn)
    finally:
        if saved is None:
            os.environ.pop("GRASSFX_CPU_GATHER", None)
        else:
            os.environ["GRASSFX_CPU_GATHER"] = saved
        infra.settings.cache_clear()
    names = list(runs)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            model_n, opt_n = runs[n]
            before = _compat.compiled_graph_count()
            times[n].append(_step(model_n, opt_n, batches[r % len(batches)], loss_fn))
            if _compat.compiled_graph_count() != before:
                raise RuntimeError(f"{n} compiled during a timed step")
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names), file=sys.stderr, flush=True)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result = {
        "args": vars(args), "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "steps_s": times,
        "median_step_s": {n: statistics.median(times[n]) for n in names},
        "inductor_over_aten": ratio("grassfx_inductor_gather", "grassfx_aten_gather"),
        "dense_over_aten": ratio("dense", "grassfx_aten_gather"),
        "dense_over_inductor": ratio("dense", "grassfx_inductor_gather"),
    }
    for n in names:
        print(f"{n:>24}: median {result['median_step_s'][n]:.4f} s/step")
    print(f"step time, Inductor gathers / ATen gathers: {result['inductor_over_aten']:.3f} (median of {args.rounds} rounds)")
    print(f"dense / grassfx: {result['dense_over_aten']:.3f} (ATen gathers), {result['dense_over_inductor']:.3f} (Inductor)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
