"""Worker processes for tests/distributed/test_fsdp.py: FSDP2 (fully_shard) + grassfx on gloo, CPU."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

import grassfx

import dist_worker

STEPS, GLOBAL_BATCH, UPDATE_FREQ, WORLD = 6, 8, 2, 2
CLIP = 0.5  # below the gradient norm of the first steps
HALF = STEPS // 2 + 1  # checkpoint after 4 steps: odd, between refreshes
# 25 rows (uneven shards 13 / 12) with rows selected; 7 rows (4 / 3) with columns selected
CONFIG = dict(rank=5, selection="multinorm", update_freq=UPDATE_FREQ, moments="keep_overlap")
OPT = dict(lr=1e-2, weight_decay=0.1)


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x)))


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(Block(12, 25), Block(25, 7), nn.Linear(7, 3))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 12, generator=g)


def micro_batches(ranks, accumulate: int) -> list:
    """Rows of each micro-batch for the processes ``ranks`` of a world of ``len(ranks)`` or
    more: micro-batch i is every listed rank's i-th slice of its rows, so one process that
    lists all ranks sees what they see together (a refresh selects from the first one)."""
    per = GLOBAL_BATCH // WORLD
    return [torch.cat([torch.arange(r * per, (r + 1) * per).chunk(accumulate)[i] for r in ranks])
            for i in range(accumulate)]


def train(model, opt, shard, steps=range(STEPS), clip=None):
    """``shard``: this process's rows, or a list of micro-batch rows (all but the last run
    under ``model.no_sync()``). ``clip``: a function clipping the model's gradients."""
    for step in steps:
        x = batch(step)
        parts = shard if isinstance(shard, list) else [shard]
        for i, rows in enumerate(parts):
            with model.no_sync() if i < len(parts) - 1 else contextlib.nullcontext():
                (model(x[rows]).pow(2).mean() / len(parts)).backward()
        if clip is not None:
            clip(model)
        opt.step()
        opt.zero_grad()


def full_state(model) -> dict:
    """Every tensor of the model's state, whole (sharded ones all-gathered)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if grassfx.fsdp.is_dtensor(v) else v).detach().clone()
    return out


def shard(net):
    from torch.distributed.fsdp import fully_shard

    for block in net[:2]:
        fully_shard(block)
    fully_shard(net)
    return net


def worker(rank, world, port, out_dir, opts):
    dist_worker.run(rank, world, port, out_dir, lambda result: _train_sharded(rank, world, opts, out_dir, result))


def _train_sharded(rank, world, opts, out_dir, result):
    per = GLOBAL_BATCH // world
    rows = slice(rank * per, (rank + 1) * per)
    kw = dict(CONFIG, backend=opts.get("backend", "eager"))
    if opts.get("refusals"):
        result["refused"] = _refusals(kw, rows)
    else:
        model = grassfx.compile(shard(make_net()), **kw)
        opt = grassfx.optim.AdamW(model.parameters(), **OPT)
        if opts.get("explain"):  # on the sharded model itself, before training: must leave it as it was
            report = grassfx.explain(model, batch(0)[rows])
            result["explained"] = [(w.name, w.rewritten) for w in report.weights]
            result["explain_reduced"] = sorted({c.weight for c in report.stats.changes()
                                                if c.action == "all_reduce"}) if report.stats else []
        if opts.get("checkpoint"):
            _checkpoint_run(model, opt, rows, out_dir, result)
        elif opts.get("resume"):  # another world size than the one that saved
            _load(model, opt, opts["resume"])
            train(model, opt, rows, range(HALF, STEPS))
        elif opts.get("accumulate"):
            train(model, opt, micro_batches([rank], opts["accumulate"]))
        else:  # gradients clipped to a norm they exceed: the norm spans the shards
            train(model, opt, rows, clip=lambda m: grassfx.fsdp.clip_grad_norm_(m.parameters(), CLIP))
        result["state"] = full_state(model)
        result["local_weight_rows"] = {s.name: grassfx.fsdp.local(s.weight).shape[0] for s in model.sites}
        result["weight_rows"] = {s.name: s.weight.shape[0] for s in model.sites}
        result["state_numel"] = {s.name: {k: grassfx.fsdp.local(v).numel() for k, v in opt.state[s.handle].items()
                                          if torch.is_tensor(v)} for s in model.sites}
        result["state_global"] = {s.name: {k: v.numel() for k, v in opt.state[s.handle].items()
                                           if torch.is_tensor(v)} for s in model.sites}
        result["dims"] = {s.name: s.dim for s in model.sites}
        result["bytes"] = dict(model._dp.bytes_sent) if model._dp is not None else None
        result["reduced_in_graph"] = sorted(model._dp.reduced_in_graph) if model._dp is not None else []
        report = model.compile_report
        result["changes"] = sorted({(c.weight, c.action) for c in report.changes()}) if report else []
        result["frames"] = report.frames if report else 0
        if kw["backend"] == "inductor":  # the same graphs again: Inductor's caches are warm now
            again = grassfx.compile(shard(make_net()), **kw)
            train(again, grassfx.optim.AdamW(again.parameters(), **OPT), rows, range(2))
            result["reduced_in_graph_warm"] = sorted(again._dp.reduced_in_graph)


def _checkpoint_run(model, opt, rows, out_dir, result):
    """Train half, save with DCP, train on; then a fresh model and optimizer load the
    checkpoint and train the second half again: both ends must be equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    train(model, opt, rows, range(HALF))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    train(model, opt, rows, range(HALF, STEPS))
    result["uninterrupted"] = full_state(model)

    fresh = grassfx.compile(shard(make_net()), **dict(CONFIG, backend="eager"))
    fresh_opt = grassfx.optim.AdamW(fresh.parameters(), **OPT)
    _load(fresh, fresh_opt, os.path.join(out_dir, "ckpt"))
    train(fresh, fresh_opt, rows, range(HALF, STEPS))
    result["resumed"] = full_state(fresh)


def _load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    before = int(model.grass_step)
    msd, osd = get_state_dict(model, opt)  # an empty optimizer: DCP makes its state by a step
    assert int(model.grass_step) == before, "DCP's state-making step advanced grassfx's step counter"
    assert all(opt.state[s.handle] for s in model.sites), "DCP's state-making step made no state"
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _refusals(kw, rows) -> list:
    """The errors of: fully_shard after grassfx.compile; Muon on sharded weights;
    data_parallel=False on an FSDP2 model of several ranks."""
    messages = []
    model = grassfx.compile(make_net(), **kw)
    shard(model.module)
    try:
        train(model, grassfx.optim.AdamW(model.parameters(), **OPT), rows)
    except grassfx.UnsupportedModelError as exc:
        messages.append(str(exc))
    model = grassfx.compile(shard(make_net()), **kw)
    try:
        grassfx.optim.Muon(model.parameters(), lr=1e-2)
    except grassfx.ConfigError as exc:
        messages.append(str(exc))
    try:
        grassfx.compile(shard(make_net()), **dict(kw, data_parallel=False))
    except grassfx.ConfigError as exc:
        messages.append(str(exc))
    return messages
