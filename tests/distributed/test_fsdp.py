"""FSDP2 (fully_shard) + grassfx on 2 gloo processes: equal to one process, sharded state, DCP resume."""

from __future__ import annotations

import pytest
import torch

import grassfx

import dist_worker
import fsdp_worker as W


def _launch(tmp_path, world=2, **opts):
    return dist_worker.launch(W.worker, tmp_path, world, **opts)


def _single_process(accumulate=0):
    model = grassfx.compile(W.make_net(), **dict(W.CONFIG, backend="eager"))
    opt = grassfx.optim.AdamW(model.parameters(), **W.OPT)
    if accumulate:
        W.train(model, opt, W.micro_batches(range(W.WORLD), accumulate))
    else:  # clipped by torch's own function, as the 2-process run clips with grassfx.fsdp's
        norms = []
        W.train(model, opt, slice(None),
                clip=lambda m: norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), W.CLIP))))
        assert max(norms) > W.CLIP  # the clipping acted
    return W.full_state(model)


def _ok(*results):
    for r in results:
        assert "error" not in r, r.get("trace")


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_fsdp2_equals_single_process_on_the_full_batch(tmp_path, backend):
    """Eager: gradients clipped (grassfx.fsdp.clip_grad_norm_ against torch's on one process).
    Also after grassfx.explain ran on the sharded model (in place: it must restore it);
    compiled, with gradients accumulated over two micro-batches (model.no_sync()), against
    one process accumulating the same two micro-batches of the whole batch."""
    accumulate = 2 if backend == "inductor" else 0
    r0, r1 = _launch(tmp_path, backend=backend, explain=True, accumulate=accumulate)
    _ok(r0, r1)
    ref = _single_process(accumulate)
    assert set(r0["state"]) == set(ref)
    for k in ref:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # identical on both ranks
        torch.testing.assert_close(r0["state"][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # both selection axes are covered: rows (25-row weight) and columns (7-row weight)
    assert r0["dims"] == {"0.lin.weight": 0, "1.lin.weight": 1, "2.weight": 1}
    _each_rank_stores_its_shard(r0, r1)
    if backend == "inductor":
        # compiled: the compressed gradients are averaged inside the backward graphs, also
        # when the same graphs are compiled again with warm caches (the eager hooks skip them)
        assert r0["reduced_in_graph"] == r0["reduced_in_graph_warm"] == sorted(r0["dims"])
        assert r0["explain_reduced"] == sorted(r0["dims"])  # explain shows the in-graph all-reduces
        assert dict(r0["explained"]) == {"0.lin.weight": True, "1.lin.weight": True, "2.weight": False}
        # the selected GEMMs in the blocks' graphs; the head, read in the root's frame after
        # FSDP2's graph breaks, falls back to selecting rows of its dense gradient
        assert {w for w, action in r0["changes"] if action == "rewrote"} == {"0.lin.weight", "1.lin.weight"}


def _each_rank_stores_its_shard(r0, r1):
    """Each rank holds its half of every sharded weight and of the projected optimizer state."""
    for name, rows in r0["weight_rows"].items():
        # torch.chunk's split, as FSDP2 shards: ceil(rows / 2) on rank 0, the rest on rank 1
        assert r0["local_weight_rows"][name] == -(-rows // 2), name
        assert r0["local_weight_rows"][name] + r1["local_weight_rows"][name] == rows, name
        for key, numel in r0["state_global"][name].items():
            mine, theirs = r0["state_numel"][name][key], r1["state_numel"][name][key]
            if key == "row_step" and r0["dims"][name] == 1:
                assert mine == theirs == numel  # r step counts of the selected columns, on both
            else:
                assert mine + theirs == numel and mine < numel, (name, key)


def test_dcp_checkpoint_resumes_exactly(tmp_path):
    r0, r1 = _launch(tmp_path, checkpoint=True)
    _ok(r0, r1)
    for r in (r0, r1):
        for k, v in r["uninterrupted"].items():
            assert torch.equal(v, r["resumed"][k]), k
    # onto one process: DCP reshards the weights and the slot-sharded moments
    (tmp_path / "one").mkdir()
    (alone,) = _launch(tmp_path / "one", world=1, resume=str(tmp_path / "ckpt"))
    _ok(alone)
    for k, v in r0["uninterrupted"].items():
        torch.testing.assert_close(alone["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_unsupported_orders_and_optimizers_are_refused(tmp_path):
    r0, _ = _launch(tmp_path, refusals=True)
    _ok(r0)
    order, muon, alone = r0["refused"]
    assert "data_parallel=False with an FSDP2 model" in alone
    assert "fully_shard was applied after grassfx.compile" in order and "then call grassfx.compile" in order
    assert "grassfx.optim.Muon with FSDP2-sharded weights" in muon and "use grassfx.optim.AdamW" in muon
