"""Training-quality machinery: per-row Adam state across refreshes, coverage, rho, fixed eval."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import grassfx
from grassfx.optim import row_factors

BETAS, EPS = (0.9, 0.999), 1e-8


def _linear(seed=0, n_in=8, n_out=16):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=False)


class RowAdam:
    """Reference subspace AdamW, kept row by row: each row has its own moments and age.

    ``keep=True``: at a refresh, rows selected before and after keep (m, v, t), new rows
    start from zero. ``keep=False``: every selected row starts from zero at a refresh.
    """

    def __init__(self, weight, lr, keep):
        self.w = weight.detach().clone().double()
        self.lr, self.keep, self.rows, self.sel = lr, keep, {}, None

    def step(self, grad, idx):
        b1, b2 = BETAS
        idx = idx.tolist()
        if idx != self.sel:  # a refresh
            old = self.rows if self.keep else {}
            self.rows = {j: old.get(j, [0.0 * grad[0].double(), 0.0 * grad[0].double(), 0]) for j in idx}
            self.sel = idx
        for j in idx:
            m, v, t = self.rows[j]
            g = grad[j].double()
            t += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            self.rows[j] = [m, v, t]
            self.w[j] -= self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)


@pytest.mark.parametrize("moments", ["keep_overlap", "reset"])
def test_per_row_adam_matches_row_by_row_reference(moments):
    """Kept rows continue their Adam state (own bias correction); new rows start fresh."""
    base = _linear()
    model = grassfx.compile(copy.deepcopy(base), rank=5, selection="multinorm_nr", update_freq=3,
                            moments=moments, proj_dim="rows", backend="eager", seed=3)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, betas=BETAS, eps=EPS)
    site = model.sites[0]
    ref = RowAdam(base.weight, 1e-2, keep=moments == "keep_overlap")
    g = torch.Generator().manual_seed(0)
    kept = fresh = 0
    prev = None
    for _ in range(12):
        x = torch.randn(6, 8, generator=g)
        w = model.weight_of(site).detach().clone().requires_grad_(True)
        (x @ w.t()).pow(2).mean().backward()  # the dense gradient, outside grassfx
        model(x).pow(2).mean().backward()
        idx = site.idx.clone()
        if prev is not None and not torch.equal(prev, idx):
            kept += len(set(prev.tolist()) & set(idx.tolist()))
            fresh += len(set(idx.tolist()) - set(prev.tolist()))
        prev = idx
        opt.step()
        opt.zero_grad()
        ref.step(w.grad, idx)
        torch.testing.assert_close(model.weight_of(site).double(), ref.w, rtol=1e-5, atol=1e-6)
    assert kept > 0 and fresh > 0  # both kinds of rows were exercised


def test_row_factors_by_hand():
    t = torch.tensor([1.0, 2.0, 5.0])
    factor, bc2 = row_factors(t, -0.1, 0.9, 0.99, rewarmup=4)
    expect_f = [-0.1 * min(1, k / 4) / (1 - 0.9**k) for k in (1, 2, 5)]
    expect_b = [math.sqrt(1 - 0.99**k) for k in (1, 2, 5)]
    torch.testing.assert_close(factor, torch.tensor(expect_f))
    torch.testing.assert_close(bc2, torch.tensor(expect_b))


def test_rewarmup_ramps_new_rows():
    model = grassfx.compile(_linear(), rank=4, update_freq=100, proj_dim="rows", backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, rewarmup=4)
    site = model.sites[0]
    moved = []
    for _ in range(5):
        before = model.weight_of(site).detach().clone()
        model(torch.randn(3, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        moved.append((model.weight_of(site) - before).abs().max().item())
    # Adam's first step moves each coordinate by ~lr; a 4-step re-warmup makes it lr / 4
    assert moved[0] == pytest.approx(1e-2 / 4, rel=1e-3)
    assert moved[0] < moved[1] < moved[3]


@pytest.mark.parametrize("rho_scaling, factor", [("once", 1.0), ("twice", math.sqrt(16 / 2))])
def test_rho_enters_adam_once_by_default(rho_scaling, factor):
    """uniform (rho = sqrt(m / r)) moves a row as far as top_r unless asked for the paper's form."""
    model = grassfx.compile(_linear(), rank=2, selection="uniform", update_freq=100, proj_dim="rows",
                            backend="eager", seed=1)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3, rho_scaling=rho_scaling)
    site = model.sites[0]
    before = model.weight_of(site).detach().clone()
    model(torch.randn(3, 8)).pow(2).mean().backward()
    opt.step()
    step = (model.weight_of(site) - before).abs()
    counts = torch.bincount(site.idx, minlength=site.rows)
    for row in site.idx.unique().tolist():  # a row drawn k times moves one step (k * factor in the paper's form)
        k = int(counts[row]) if rho_scaling == "twice" else 1
        assert step[row].max().item() == pytest.approx(1e-3 * factor * k, rel=1e-3)


def test_explore_visits_rows_the_norms_never_pick():
    """top_r alone keeps picking the loud rows; explore gives every row a turn."""
    def visits(explore):
        torch.manual_seed(0)
        lin = nn.Linear(8, 16, bias=False)
        model = grassfx.compile(lin, rank=4, update_freq=1, explore=explore, proj_dim="rows", backend="eager")
        opt = grassfx.optim.SGD(model.parameters(), lr=0.0)
        loud = torch.tensor([100.0] * 4 + [1.0] * 12)  # rows 0-3 always have the largest gradients
        seen = set()
        for _ in range(8):
            (model(torch.randn(4, 8)) * loud).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            seen |= set(model.sites[0].idx.tolist())
        return seen

    assert visits(0.0) == {0, 1, 2, 3}
    assert visits(0.5) == set(range(16))  # 2 stale rows per refresh: all 12 quiet rows in 6 refreshes


def test_explore_is_checked():
    with pytest.raises(grassfx.ConfigError, match="explore"):
        grassfx.compile(_linear(), rank=4, selection="uniform", explore=0.25, backend="eager")
    with pytest.raises(grassfx.ConfigError, match="explore"):
        grassfx.compile(_linear(), rank=4, explore=1.0, backend="eager")


def test_checkpoint_without_last_seen_still_loads():
    model = grassfx.compile(_linear(), rank=4, backend="eager")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("last_seen")}
    model.load_state_dict(state)
    assert (model.sites[0].last_seen == -1).all()


# ----------------------------------------------------------------------------- the fixed eval set


def test_eval_set_is_fixed_across_seeds_and_batch_sizes(tmp_path, monkeypatch):
    from grassfx import train

    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a small text, with words and more words.\n" for i in range(400)))
    sets = []
    for seed, batch in ((0, 2), (1, 2), (0, 7)):
        args = train.parse_args(["--preset", "test", "--data", str(text), "--seq-len", "16",
                                 "--seed", str(seed), "--batch-size", str(batch), "--eval-windows", "4"])
        _, ev = train.prepare_data(args, train.presets_mod.get_preset("test"))
        sets.append(ev)
    for ev in sets[1:]:
        assert torch.equal(ev.full, sets[0].full) and torch.equal(ev.curve, sets[0].curve)
    full = sets[0].full
    assert full.shape[1] == 16 and full.shape[0] > 4 and sets[0].curve.shape[0] == 4
    # non-overlapping windows that tile the start of the evaluation split
    _, corpus_eval = None, train.data_mod.load_corpus(str(text), vocab_size=512).eval
    assert torch.equal(full.reshape(-1), corpus_eval[: full.numel()].long())


def test_evaluate_weights_every_token_alike():
    from grassfx import train

    class Fixed(nn.Module):  # loss = mean of the input ids: easy to check by hand
        def forward(self, input_ids, labels):
            return type("Out", (), {"loss": input_ids.float().mean()})()

    windows = torch.arange(5 * 3).view(5, 3)
    for bs in (1, 2, 5):
        assert train.evaluate(Fixed(), windows, torch.device("cpu"), batch_size=bs) == pytest.approx(7.0)


def test_per_optimizer_flags():
    from grassfx import train

    args = train.parse_args(["--compare", "--lr", "2e-3", "--lr", "grass=5e-3", "--scale", "galore=0.25"])
    assert train.setting(args, "lr", "grass") == 5e-3
    assert train.setting(args, "lr", "adamw") == 2e-3
    assert train.setting(args, "scale", "galore") == 0.25
    assert train.setting(args, "scale", "grass") == train.RECOMMENDED["grass"]["scale"]
    with pytest.raises(SystemExit):
        train.parse_args(["--lr", "sgd=1e-3"])
    # the default refresh interval gives every run the same number of windows
    assert train.setting(train.parse_args(["--steps", "600"]), "update_freq", "grass") == 24
    assert train.setting(train.parse_args(["--steps", "600", "--update-freq", "7"]), "update_freq", "galore") == 7


def test_quality_harness_smoke(tmp_path, monkeypatch):
    """The whole procedure (tune, evaluate on seeds, paired statistics, files) on a few steps."""
    import importlib.util
    import json
    from pathlib import Path

    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("".join(f"verse {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600)))
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = tmp_path / "q"
    result = quality.main(["--plan", "smoke", "--data", str(text), "--seeds", "0", "1", "--tune-seeds", "5",
                           "--out", str(out), "--inprocess"])
    summary = result["summary"]
    assert set(summary) == {"adamw", "grass", "grass-cover"}
    assert summary["grass-cover"]["point"] == summary["grass"]["point"]  # "like": the base arm's tuned lr
    for arm, row in summary.items():
        assert row["seeds"] == [0, 1] and all(math.isfinite(v) for v in row["eval_loss"])
        if arm != "adamw":
            expect = [a - b for a, b in zip(row["eval_loss"], summary["adamw"]["eval_loss"])]
            assert row["diff"] == pytest.approx(expect)
    tuned = {g["point"][1]: g["eval_loss"] for g in result["grid"]["adamw"]}
    assert summary["adamw"]["point"][1] == min(tuned, key=tuned.get)
    assert json.loads((out / "quality.json").read_text())["summary"].keys() == summary.keys()
    assert (out / "quality.md").read_text().count("\n") == 5
