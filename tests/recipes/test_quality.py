"""The fixed evaluation set, per-optimizer flags and the quality harness (benchmarks/quality.py)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from grassfx.recipes import data, options, presets, train

ROOT = Path(__file__).resolve().parents[2]


def test_eval_set_is_fixed_across_seeds_and_batch_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a small text, with words and more words.\n" for i in range(400)))
    sets = []
    for seed, batch in ((0, 2), (1, 2), (0, 7)):
        args = options.parse_args(["--preset", "test", "--data", str(text), "--seq-len", "16",
                                 "--seed", str(seed), "--batch-size", str(batch), "--eval-windows", "4"])
        _, ev = train.prepare_data(args, presets.get_preset("test"))
        sets.append(ev)
    for ev in sets[1:]:
        assert torch.equal(ev.full, sets[0].full) and torch.equal(ev.curve, sets[0].curve)
    full = sets[0].full
    assert full.shape[1] == 16 and full.shape[0] > 4 and sets[0].curve.shape[0] == 4
    # non-overlapping windows that tile the start of the evaluation split
    corpus_eval = data.load_corpus(str(text), vocab_size=512).eval
    assert torch.equal(full.reshape(-1), corpus_eval[: full.numel()].long())


def test_evaluate_weights_every_token_alike():
    class Fixed(nn.Module):  # loss = mean of the input ids: easy to check by hand
        def forward(self, input_ids, labels):
            return type("Out", (), {"loss": input_ids.float().mean()})()

    windows = torch.arange(5 * 3).view(5, 3)
    for bs in (1, 2, 5):
        assert train.evaluate(Fixed(), windows, torch.device("cpu"), batch_size=bs) == pytest.approx(7.0)


def test_quality_harness_smoke(tmp_path, monkeypatch):
    """The whole procedure (tune, evaluate on seeds, paired statistics, files) on a few steps."""
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("".join(f"verse {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600)))
    path = ROOT / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = tmp_path / "q"
    result = quality.main(["--plan", "smoke", "--data", str(text), "--seeds", "0", "1", "--tune-seeds", "5",
                           "--out", str(out), "--inprocess"])
    summary = result["summary"]
    assert set(summary) == {"adamw", "grass", "grass-cover", "grass-adamw-rows", "muon"}
    assert summary["grass-cover"]["point"] == summary["grass"]["point"]  # "like": the base arm's tuned lr
    for arm, row in summary.items():
        assert row["seeds"] == [0, 1] and all(math.isfinite(v) for v in row["eval_loss"])
        if arm != "adamw":
            expect = [a - b for a, b in zip(row["eval_loss"], summary["adamw"]["eval_loss"])]
            assert row["diff"] == pytest.approx(expect)
        if arm not in ("adamw", "grass"):  # the plan's second reference: paired against grass too
            expect = [a - b for a, b in zip(row["eval_loss"], summary["grass"]["eval_loss"])]
            assert row["vs_second"]["diff"] == pytest.approx(expect)
    # grass's default row update (Muon) and row-wise AdamW really differ
    assert summary["grass-adamw-rows"]["eval_loss"] != summary["grass"]["eval_loss"]
    tuned = {g["point"][1]: g["eval_loss"] for g in result["grid"]["adamw"]}
    assert summary["adamw"]["point"][1] == min(tuned, key=tuned.get)
    assert json.loads((out / "quality.json").read_text())["summary"].keys() == summary.keys()
    md = (out / "quality.md").read_text()
    assert summary["muon"]["optimizer_state_bytes"] > summary["grass"]["optimizer_state_bytes"]  # dense Muon
    assert md.count("\n") == 7 and "Δ vs grass (paired, nats)" in md


def test_fixed_point_arms_and_the_model_option():
    """Arms with a fixed ``point`` are not tuned (``like`` arms take it); ``--model gpt2`` reaches every run."""
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    args = quality.parse_args(["--plan", "tiny-blocks", "--model", "gpt2", "--out", "unused"])
    plan = quality.PLANS["tiny-blocks"]
    tuned = quality.tune(plan, args)
    assert tuned["runs"] == []
    assert set(map(tuple, tuned["best"].values())) == {("--lr", "2e-3", "--scale", "1")}
    argv = quality.train_argv(plan, args, plan["arms"]["grass-no-blocks"]["flags"], 0, Path("x"))
    assert argv[argv.index("--arch") + 1] == "gpt2" and argv[argv.index("--blocks") + 1] == "none"
