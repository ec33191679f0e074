"""FSDP2 + grassfx vs FSDP2 + AdamW: bytes communicated per step and memory per rank.

Each arm trains a Hugging Face LLaMA preset sharded the usual way (``fully_shard`` on every
decoder layer, then on the root) for a few steps on N gloo processes (CPU, 1 thread each):

* ``adamw``: ``torch.optim.AdamW`` (foreach) on the FSDP2 model;
* ``grassfx``: ``grassfx.compile(model, rank=R)`` on the same FSDP2 model, then
  ``grassfx.optim.AdamW`` (docs/distributed.md: what moves where).

**Bytes**: every collective the process issues is counted by wrapping the
``torch.distributed`` functions FSDP2 and grassfx call (all-gather, reduce-scatter,
all-reduce), as the size of the whole buffer the collective produces or reduces (the
usual "algorithm bytes"; ring traffic per rank is (N-1)/N of it for all-gather and
reduce-scatter, 2(N-1)/N for all-reduce). Normal and refresh steps are reported apart.

**Memory per rank**: exact bytes of what each rank holds after a step: its parameter
shards (and grassfx's handles), gradients, optimizer state; plus the process's peak RSS.

Usage::

    python benchmarks/fsdp.py --world 2 4 --preset small --out benchmarks/results/fsdp_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("all_gather", "reduce_scatter", "all_reduce")


def _count_collectives(counter: dict) -> None:
    """Wrap the torch.distributed collectives FSDP2 and grassfx use; add their bytes to ``counter``."""
    import torch.distributed as dist

    def wrap(name, kind):
        fn = getattr(dist, name, None)
        if fn is None:
            return

        def counted(*args, **kwargs):
            # the whole buffer: an all-gather's output, a reduce-scatter's input (the largest
            # tensor argument either way), an all-reduce's one tensor
            sizes = [t.numel() * t.element_size() for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
            counter[kind] = counter.get(kind, 0) + max(sizes, default=0)
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    for name in ("all_gather_single", "all_gather_into_tensor"):
        wrap(name, "all_gather")
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        wrap(name, "reduce_scatter")
    wrap("all_reduce", "all_reduce")


def _local_bytes(tensors) -> int:
    from grassfx.fsdp import local

    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        t = local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def worker(rank, world, port, args, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import grassfx
    from recipes.presets import build_model, get_preset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    counter: dict = {}
    _count_collectives(counter)
    try:
        preset = get_preset(args.preset)
        model = build_model(preset, seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if args.arm == "grassfx":
            model = grassfx.compile(model, rank=args.rank, update_freq=args.update_freq, backend="eager")
            opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        g = torch.Generator().manual_seed(1000 + rank)
        steps = []
        for step in range(args.steps):
            x = torch.randint(0, preset.vocab_size, (args.batch_size, args.seq_len), generator=g)
            before = dict(counter)
            dp = getattr(model, "_dp", None)
            refresh_before = dp.bytes_sent["refresh_dense"] if dp is not None else 0
            model(input_ids=x, labels=x).loss.backward()
            dp = getattr(model, "_dp", None)
            # a refresh all-reduces dense gradients inside autograd (functional collectives,
            # not the wrapped functions): grassfx's own count of them
            counter["all_reduce"] = counter.get("all_reduce", 0) + (
                dp.bytes_sent["refresh_dense"] - refresh_before if dp is not None else 0)
            opt.step()
            grads = [p.grad for p in model.parameters()]
            state = [v for s in opt.state.values() for v in s.values()]
            opt.zero_grad()
            refresh = args.arm == "grassfx" and step % args.update_freq == 0
            steps.append(dict(step=step, refresh=refresh,
                              bytes={k: counter.get(k, 0) - before.get(k, 0) for k in KINDS},
                              params=_local_bytes(model.parameters()), grads=_local_bytes(grads),
                              state=_local_bytes(state)))
            del grads, state
        projected = [s.name for s in model.sites] if args.arm == "grassfx" else []
        result = dict(rank=rank, steps=steps, projected=projected,
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        import traceback

        result = dict(rank=rank, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_arm(args, world: int, arm: str) -> dict:
    import torch.multiprocessing as mp
    from comm import _free_port  # benchmarks/comm.py, next to this script

    sub = argparse.Namespace(**{**vars(args), "arm": arm})
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, sub, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r in ranks:
        if "error" in r:
            raise SystemExit(f"{arm} at {world} processes, rank {r['rank']}: {r['error']}\n{r['trace']}")
    return summarize(ranks, arm)


def summarize(ranks: list, arm: str) -> dict:
    """Per rank 0 (every rank sends the same amount): mean bytes per normal / refresh step;
    memory: the largest rank's bytes after the last step."""
    steps = ranks[0]["steps"][1:] if arm == "adamw" else ranks[0]["steps"]  # step 0: FSDP2's lazy init
    def mean_bytes(rows):
        return {k: sum(r["bytes"][k] for r in rows) / len(rows) for k in KINDS} if rows else None
    normal = [s for s in steps if not s["refresh"]]
    refresh = [s for s in steps if s["refresh"]]
    last = [r["steps"][-1] for r in ranks]
    return dict(arm=arm, world=len(ranks), projected=ranks[0]["projected"],
                bytes_normal=mean_bytes(normal), bytes_refresh=mean_bytes(refresh),
                params=max(s["params"] for s in last), grads=max(s["grads"] for s in last),
                state=max(s["state"] for s in last), peak_rss=max(r["peak_rss"] for r in ranks))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--preset", default="small")
    p.add_argument("--rank", type=int, default=None, help="grassfx rank (default: the preset's)")
    p.add_argument("--update-freq", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per arm (step 0 is a refresh for grassfx)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from recipes.presets import get_preset

    args.rank = args.rank or get_preset(args.preset).rank
    rows = []
    for world in args.world:
        for arm in ("adamw", "grassfx"):
            t0 = time.perf_counter()
            rows.append(run_arm(args, world, arm))
            print(f"{arm} x{world}: {time.perf_counter() - t0:.0f} s", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        record = dict(command="python benchmarks/fsdp.py " + " ".join(sys.argv[1:] if argv is None else argv),
                      date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                      torch=torch.__version__, preset=args.preset, rank=args.rank, update_freq=args.update_freq,
                      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, rows=rows, table=text)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return rows


def table(rows: list) -> str:
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    lines = ["| processes | arm | all-gather / step | reduce-scatter / step | all-reduce / step | "
             "refresh step: all-reduce | params / rank | grads / rank | optimizer state / rank | peak RSS / rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, f = r["bytes_normal"], r["bytes_refresh"]
        lines.append(f"| {r['world']} | {r['arm']} | {mib(b['all_gather'])} | {mib(b['reduce_scatter'])} | "
                     f"{mib(b['all_reduce'])} | {mib(f['all_reduce']) if f else '—'} | {mib(r['params'])} | "
                     f"{mib(r['grads'])} | {mib(r['state'])} | {mib(r['peak_rss'])} |")
    return "\n".join(lines) + "\n\n(MiB; bytes per step on rank 0, memory of the largest rank after the last step)"


if __name__ == "__main__":
    main()
