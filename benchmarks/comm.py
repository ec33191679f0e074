"""Communication benchmark: bytes all-reduced and step time on 2 gloo processes (CPU).

Three ways to train the same model on the same per-rank batches:

* ``ddp``: ``DistributedDataParallel`` + ``torch.optim.AdamW`` (dense all-reduce),
* ``powersgd``: DDP with PyTorch's PowerSGD communication hook (low-rank P/Q all-reduces),
* ``grassfx``: ``grassfx.compile`` (trains data-parallel by itself) + ``grassfx.optim.AdamW``.

Bytes are counted where they are sent: a counting DDP comm hook around the default
all-reduce, a counting wrapper around ``torch.distributed.all_reduce`` for PowerSGD, and
grassfx's own reducer counters (which also count the dense all-reduce of a refresh step).
Each process uses one thread.

Example:
    python benchmarks/comm.py --steps 12 --out benchmarks/results/comm.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def make_model(args):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.hidden, args.inter), nn.GELU(), nn.Linear(args.inter, args.hidden)]
    return nn.Sequential(*layers)


def _counting_allreduce(counter):
    real = dist.all_reduce

    def all_reduce(tensor, *a, **kw):
        counter[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *a, **kw)

    return all_reduce


def worker(rank, world, port, args, method, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    import grassfx

    net = make_model(args)
    counter = [0]
    if method == "grassfx":
        model = grassfx.compile(net, rank=args.rank, update_freq=args.update_freq, backend="eager")
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if method == "ddp":
            def hook(state, bucket):
                counter[0] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)
        else:
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.psgd_rank,
                                                start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
            dist.all_reduce = _counting_allreduce(counter)
    g = torch.Generator().manual_seed(1 + rank)
    times, sent = [], []
    for step in range(args.steps):
        x = torch.randn(args.tokens, args.hidden, generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        if method == "grassfx":
            b = model._dp.bytes_sent
            sent.append(b["projected"] + b["dense"] + b["refresh_dense"])
        else:
            sent.append(counter[0])
    if rank == 0:
        per_step = [b - a for a, b in zip([0] + sent[:-1], sent)]
        warm = args.warmup
        out[method] = {"median_step_s": statistics.median(times[warm:]),
                       "bytes_per_step_steady": statistics.median(per_step[warm:]),
                       "bytes_per_step_all": per_step, "steps_s": times}
    del model, opt
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--rank", type=int, default=64, help="grassfx rank")
    p.add_argument("--psgd-rank", type=int, default=4, help="PowerSGD matrix approximation rank")
    p.add_argument("--update-freq", type=int, default=200)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    manager = mp.Manager()
    out = manager.dict()
    for method in ("ddp", "powersgd", "grassfx"):
        mp.spawn(worker, args=(2, _free_port(), args, method, out), nprocs=2)
    res = dict(out)
    dense_params = sum(p.numel() for p in make_model(args).parameters())
    print(f"model: {args.layers} x (Linear {args.hidden}->{args.inter}, Linear {args.inter}->{args.hidden}), "
          f"{dense_params / 1e6:.1f}M params, 2 ranks (gloo, 1 thread each), {args.tokens} tokens/rank/step")
    print(f"{'method':<10} {'bytes/step (steady)':>20} {'vs ddp':>8} {'median step':>12}")
    for m in ("ddp", "powersgd", "grassfx"):
        r = res[m]
        print(f"{m:<10} {r['bytes_per_step_steady'] / 2**20:>17.2f} MiB {r['bytes_per_step_steady'] / res['ddp']['bytes_per_step_steady']:>8.3f} "
              f"{r['median_step_s']:>10.3f} s")
    g = res["grassfx"]["bytes_per_step_all"]
    print(f"grassfx refresh step (step 0) sent {g[0] / 2**20:.2f} MiB (dense gradients of projected weights, once per "
          f"update_freq={args.update_freq} steps)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
