"""Worker processes for tests/test_distributed.py (spawned, gloo, CPU)."""

from __future__ import annotations

import datetime
import gc
import os
import traceback

import torch
from torch import nn

import grassfx

STEPS, GLOBAL_BATCH, UPDATE_FREQ = 5, 8, 2


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.LayerNorm(24), nn.Linear(24, 6))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 12, generator=g)


def train(model, opt, shard, on_step=None):
    for step in range(STEPS):
        x = batch(step)[shard]
        model(x).pow(2).mean().backward()
        if on_step is not None:
            on_step(step, model)
        opt.step()
        opt.zero_grad()


def run(rank, world, port, out_dir, body) -> None:
    """A spawned rank: join a gloo group, call ``body(result)`` and save ``result`` (with the
    error, if ``body`` raised) to ``out_dir/rank{rank}.pt`` for the test to read."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GRASSFX_CHECK_RANKS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    result = {}
    try:
        body(result)
    except Exception as exc:  # reported to the test, which asserts on it
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Tear down in order: a DDP reducer or gloo work object that outlives its process group
    # and dies during interpreter shutdown can abort the process ("terminate called without
    # an active exception"), which the test would read as a failed worker. ``body``'s
    # locals (model, optimizer, wrapper) are gone once it returns.
    gc.collect()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(worker, tmp_path, world=2, **opts) -> list:
    """Spawn ``world`` processes running ``worker(rank, world, port, out_dir, opts)``; return
    each rank's saved result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, port, str(tmp_path), opts)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def worker(rank, world, port, out_dir, opts):
    run(rank, world, port, out_dir, lambda result: _train_ranks(rank, world, opts, result))


def _train_ranks(rank, world, opts, result):
    kw = dict(rank=opts.get("rank", 4), selection=opts.get("selection", "multinorm"),
              update_freq=UPDATE_FREQ, backend=opts.get("backend", "eager"))
    if opts.get("mismatch") and rank == 1:
        kw["rank"] = 8
    net = make_net()
    if opts.get("ddp"):
        model = grassfx.compile(net, **kw)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        model = wrapped = grassfx.compile(net, **kw)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, update_in_backward=opts.get("in_backward", False))
    per = GLOBAL_BATCH // world
    shard = slice(rank * per, (rank + 1) * per)

    def corrupt(step, m):
        if opts.get("corrupt") and rank == 1 and step == UPDATE_FREQ:
            m.sites[0].idx[0] = (m.sites[0].idx[0] + 1) % m.sites[0].rows

    train(wrapped, opt, shard, corrupt)
    result["state"] = {k: v.clone() for k, v in model.module.state_dict().items()}
    result["bytes"] = dict(model._dp.bytes_sent) if model._dp is not None else None
    result["reduced_in_graph"] = sorted(model._dp.reduced_in_graph) if model._dp is not None else []
    result["ddp_disabled_hooks"] = model._dp is not None and not model._dp.enabled
    result["handle_numel"] = sum(s.handle.numel() for s in model.sites)
    result["weight_numel"] = sum(model.weight_of(s).numel() for s in model.sites)
