"""Optimizers on expert stacks: (E, r, n) handles, per-row state, refreshes, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

import grassfx

from moe_zoo import make_loop_experts

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8


class RowAdamW:
    """AdamW, one row of one expert at a time: the obviously correct reference.

    Every row decays every step; a selected row (e, i) takes an Adam step with its own
    moments and step count. At a refresh, ``reset`` forgets every row's state and
    ``keep_overlap`` keeps the state of rows selected before and after.
    """

    def __init__(self, weight, weight_decay, moments):
        self.w = weight.detach().clone().double()
        self.wd, self.moments = weight_decay, moments
        self.state = {}  # (e, i) -> [m, v, t]

    def step(self, site, refreshed):
        rows = {(e, int(i)): site.handle.grad[e, j].double()
                for e in range(site.experts) for j, i in enumerate(site.idx[e])}
        if refreshed:
            self.state = {k: v for k, v in self.state.items() if k in rows} if self.moments == "keep_overlap" else {}
        self.w *= 1 - LR * self.wd
        b1, b2 = BETAS
        for (e, i), g in rows.items():
            m, v, t = self.state.get((e, i), (torch.zeros_like(g), torch.zeros_like(g), 0))
            m, v, t = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g, t + 1
            self.state[(e, i)] = (m, v, t)
            self.w[e, i] -= LR * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)


def _batches(n, experts=3, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(experts, 5, d_in, generator=g) for _ in range(n)]


@pytest.mark.parametrize("moments, weight_decay, selection", [("reset", 0.1, "top_r"),
                                                              ("keep_overlap", 0.0, "multinorm_nr")])
def test_adamw_on_expert_stacks_matches_a_per_row_reference(moments, weight_decay, selection):
    gm = grassfx.compile(make_loop_experts(), rank=4, selection=selection, update_freq=2, moments=moments,
                         backend="eager", targets=["w"])
    site = gm.sites[0]
    opt = grassfx.optim.AdamW(gm.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    ref = RowAdamW(site.weight, weight_decay, moments)
    kept_some = False
    for step, x in enumerate(_batches(7)):  # refreshes at steps 0, 2, 4, 6
        before = site.idx.clone()
        gm(x).pow(2).mean().backward()
        refreshed = step % 2 == 0
        if refreshed and step:
            overlap = (before.unsqueeze(2) == site.idx.unsqueeze(1)).any(2)
            kept_some |= bool(overlap.any()) and not bool(overlap.all())
        ref.step(site, refreshed)
        opt.step()
        opt.zero_grad()
        settled = gm.state_dict()["module.w"]  # owed decay applied
        torch.testing.assert_close(settled.double(), ref.w, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    state = opt.state[site.handle]
    assert tuple(state["exp_avg"].shape) == (3, 4, 6) and tuple(state["row_step"].shape) == (12,)
    if moments == "keep_overlap":
        assert kept_some  # the policy was exercised: some rows kept their state, some did not
        counts = {k: v[2] for k, v in ref.state.items()}
        flat = site.idx + torch.arange(3).unsqueeze(1) * site.rows
        assert state["row_step"].tolist() == [counts[(int(i) // 10, int(i) % 10)] for i in flat.reshape(-1)]


def test_state_dict_round_trip_resumes_bit_exactly(tmp_path):
    def make(seed):
        gm = grassfx.compile(make_loop_experts(seed=seed), rank=4, update_freq=2, moments="keep_overlap",
                             backend="eager", selection="multinorm_nr")
        return gm, grassfx.optim.AdamW(gm.parameters(), lr=LR, weight_decay=0.1)

    batches = _batches(7)
    gm, opt = make(0)
    for x in batches[:3]:  # stop just after a refresh step's update: rows owe decay, moments are live
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"model": gm.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert tuple(saved["model"]["sites.0.idx"].shape) == (3, 4)
    gm2, opt2 = make(1)  # other weights, other rows: everything must come from the checkpoint
    gm2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x in batches[3:]:  # two more refreshes
        for m, o in ((gm, opt), (gm2, opt2)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    for (k, a), b in zip(gm.state_dict().items(), gm2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state[gm.sites[0].handle], opt2.state[gm2.sites[0].handle]
    assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "row_step"))


def test_sgd_updates_only_the_selected_rows_of_each_expert():
    gm = grassfx.compile(make_loop_experts(), rank=4, backend="eager", targets=["w"])
    site = gm.sites[0]
    opt = grassfx.optim.SGD(gm.parameters(), lr=0.5)
    gm(_batches(1)[0]).pow(2).mean().backward()
    before = site.weight.detach().clone()
    expected = before.clone()
    for e in range(3):
        expected[e, site.idx[e]] -= 0.5 * site.handle.grad[e]
    opt.step()
    assert torch.equal(site.weight, expected)
    assert not math.isclose(float((site.weight - before).abs().sum()), 0.0)


def test_unwrap_settles_owed_decay_of_expert_rows():
    gm = grassfx.compile(make_loop_experts(), rank=4, backend="eager", targets=["w"], update_freq=10)
    w0 = gm.sites[0].weight.detach().clone()
    opt = grassfx.optim.AdamW(gm.parameters(), lr=0.1, weight_decay=0.5)
    for x in _batches(2):  # one refresh, then the same rows: the others owe two decay steps
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    idx = gm.sites[0].idx.clone()
    net = grassfx.unwrap(gm)
    mask = torch.ones(3, 10, dtype=torch.bool).scatter_(1, idx, False)
    torch.testing.assert_close(net.w.detach()[mask], w0[mask] * 0.95**2)  # unselected rows: decay only
    assert net.w.requires_grad
