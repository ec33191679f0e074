"""Data-parallel training on 2 gloo processes: compressed all-reduce, same rows, checks."""

from __future__ import annotations

import socket

import pytest
import torch

import grassfx

import dist_worker as W


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, **opts):
    return W.launch(W.worker, tmp_path, **opts)


def _single_process(**kw):
    model = grassfx.compile(W.make_net(), rank=kw.get("rank", 4), selection=kw.get("selection", "multinorm"),
                            update_freq=W.UPDATE_FREQ, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    W.train(model, opt, slice(None))
    return model.module.state_dict()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_two_ranks_equal_single_process_on_concatenated_batch(tmp_path, backend):
    r0, r1 = _launch(tmp_path, backend=backend)
    assert "error" not in r0 and "error" not in r1, r0.get("trace") or r1.get("trace")
    ref = _single_process()
    for k in ref:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # identical on both ranks
        torch.testing.assert_close(r0["state"][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # what crossed the network for projected weights: r/m of a dense all-reduce per step
    normal_steps = sum(1 for s in range(W.STEPS) if s % W.UPDATE_FREQ != 0)
    assert r0["bytes"]["projected"] == normal_steps * r0["handle_numel"] * 4
    assert r0["handle_numel"] * 6 == r0["weight_numel"]  # rank 4 of 24 rows/cols: r/m = 1/6
    # compiled: the compress_allreduce pass averages the compressed gradients in the graph
    expected = ["0.weight", "3.weight"] if backend != "eager" else []
    assert r0["reduced_in_graph"] == expected


def test_rank_disagreement_is_detected(tmp_path):
    r0, r1 = _launch(tmp_path, corrupt=True)
    for r in (r0, r1):
        assert "ranks selected different rows for '0.weight'" in r.get("error", ""), r.get("trace")


def test_different_configurations_are_refused(tmp_path):
    r0, r1 = _launch(tmp_path, mismatch=True)
    for r in (r0, r1):
        assert "ranks compiled different grassfx configurations" in r.get("error", ""), r.get("trace")


def test_updates_inside_backward_are_refused(tmp_path):
    r0, r1 = _launch(tmp_path, in_backward=True)
    for r in (r0, r1):
        assert "update_in_backward=True cannot train data-parallel" in r.get("error", ""), r.get("trace")
        assert r["error"].startswith("ConfigError")


def test_ddp_wrapping_works_and_grassfx_steps_aside(tmp_path):
    r0, r1 = _launch(tmp_path, ddp=True)
    assert "error" not in r0, r0.get("trace")
    assert r0["ddp_disabled_hooks"] and r1["ddp_disabled_hooks"]
    ref = _single_process()
    for k in ref:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        torch.testing.assert_close(r0["state"][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture
def one_process_group():
    """A gloo process group of one rank in this process (FSDP's wrappers need one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_and_unsupported_fsdp2_layouts_are_refused(one_process_group):
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Shard

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))

    assert len(grassfx.compile(net(), rank=2, backend="eager").sites) == 2  # the same model, unwrapped: fine
    wrapped = FullyShardedDataParallel(net(), device_id=torch.device("cpu"))  # FSDP1
    with pytest.raises(grassfx.UnsupportedModelError, match="FSDP1"):
        grassfx.compile(wrapped, rank=2, backend="eager")
    inner = net()
    fully_shard(inner[2])  # FSDP2, on a submodule only: the first weight is not sharded
    with pytest.raises(grassfx.UnsupportedModelError, match="'0.weight' is not sharded"):
        grassfx.compile(inner, rank=2, backend="eager")
    loose = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    fully_shard(loose[0])
    fully_shard(loose[2])  # the norm between them is trained but nobody shards it
    with pytest.raises(grassfx.UnsupportedModelError, match="'1.weight' is trainable but outside every fully_shard"):
        grassfx.compile(loose, rank=2, backend="eager")
    cols = net()
    fully_shard(cols, shard_placement_fn=lambda p: Shard(p.dim() - 1))  # matrices by columns: not the default
    with pytest.raises(grassfx.UnsupportedModelError, match="Shard\\(0\\) on a 1-D mesh"):
        grassfx.compile(cols, rank=2, backend="eager")


def test_fsdp2_on_one_rank_equals_the_unsharded_model(one_process_group):
    """FSDP2 over a mesh of one: the sharded optimizer path (DTensor weights and state)
    trains exactly as the plain model does."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def run(model):
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(5):
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return {k: v.full_tensor() if grassfx.fsdp.is_dtensor(v) else v for k, v in model.state_dict().items()}

    kw = dict(rank=3, backend="eager", update_freq=2, moments="keep_overlap")
    sharded = net()
    fully_shard(sharded[0])
    fully_shard(sharded)
    got, ref = run(grassfx.compile(sharded, **kw)), run(grassfx.compile(net(), **kw))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    with pytest.raises(grassfx.ConfigError, match="L2 norm only"):  # torch's third argument is norm_type
        grassfx.fsdp.clip_grad_norm_(sharded.parameters(), 1.0, 1.0)
