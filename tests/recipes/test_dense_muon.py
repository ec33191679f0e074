"""The dense Muon baseline of grassfx train (``--optimizer muon``, grassfx.recipes.muon)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from grassfx.recipes import measure, options, presets, train
from grassfx.recipes.muon import ADJUST_LR_FN, Float32Muon, MuonAdamW

PROSE = ("A small model learns the shape of words before it learns their meaning, and the river "
         "runs to the sea while the quick brown fox jumps over the lazy dog. ") * 40
HIDDEN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "prose.txt"
    path.write_text(PROSE)
    return path


def muon_run(model, *flags):
    """The muon run's (model, optimizer) of ``grassfx train`` on ``model`` (eager)."""
    args = options.parse_args(["--preset", "test", "--backend", "eager", "--optimizer", "muon", *flags])
    return train.make_optimizer(model, options.RunSpec("muon", "muon"), args)


def test_compare_and_demo_include_the_muon_run():
    assert "muon" in [s.name for s in options.run_specs(options.parse_args(["--compare"]))]
    assert "muon" in [s.name for s in options.run_specs(options.parse_args(["--demo"]))]


def test_torch_muon_trains_exactly_the_hidden_matrices():
    torch.manual_seed(0)
    model = presets.build_model(presets.get_preset("test"), seed=0, vocab_size=64)
    layers = model.config.num_hidden_layers
    _, opt = muon_run(model, "--lr", "0.02", "--scale", "0.25")
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, torch.optim.Muon)  # a Float32Muon
    assert isinstance(opt.adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert muon_names == {f"model.layers.{i}.{w}.weight" for i in range(layers) for w in HIDDEN}
    adamw_names = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert adamw_names == set(names.values()) - muon_names  # embeddings, norms, head: AdamW
    assert any("embed" in n for n in adamw_names) and any("norm" in n for n in adamw_names)
    muon_group, adamw_group = opt.param_groups  # the scheduler sees both, Muon first
    assert muon_group is opt.muon.param_groups[0] and adamw_group is opt.adamw.param_groups[0]
    assert muon_group["lr"] == pytest.approx(0.02 * 0.25) and adamw_group["lr"] == 0.02
    assert muon_group["adjust_lr_fn"] == ADJUST_LR_FN == "match_rms_adamw"
    assert muon_group["weight_decay"] == 0.0 == adamw_group["weight_decay"]  # --weight-decay, not torch's 0.1


def test_one_step_is_float32_muon_plus_torch_adamw():
    torch.manual_seed(0)
    model = presets.build_model(presets.get_preset("test"), seed=0, vocab_size=64)
    ref = copy.deepcopy(model)
    _, opt = muon_run(model, "--lr", "0.02", "--scale", "0.25")
    hidden = [p for _, p in train.lowrank_weights(ref)]
    rest = [p for p in ref.parameters() if all(p is not h for h in hidden)]
    ref_opts = [Float32Muon(hidden, lr=0.005, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)]
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        for m, steppers in ((model, [opt]), (ref, ref_opts)):
            m(input_ids=x, labels=x).loss.backward()
            for o in steppers:
                o.step()
                o.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_float32_muon_is_torch_muon_up_to_its_bfloat16_iteration(shape, adjust):
    torch.manual_seed(0)
    w = torch.randn(shape)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opts = [Float32Muon([ours], lr=0.1, weight_decay=0.1, adjust_lr_fn=adjust),
            torch.optim.Muon([theirs], lr=0.1, weight_decay=0.1, adjust_lr_fn=adjust)]
    for _ in range(3):
        g = torch.randn(shape)
        ours.grad, theirs.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(opts[0].state[ours]["momentum_buffer"], opts[1].state[theirs]["momentum_buffer"])
    step_ours, step_theirs = ours.detach() - w * 0.99 ** 3, theirs.detach() - w * 0.99 ** 3
    assert (step_ours - step_theirs).norm() < 0.03 * step_theirs.norm()  # bfloat16: ~3 significant digits


def test_state_bytes_are_one_buffer_per_matrix_plus_adamw_for_the_rest():
    model = presets.build_model(presets.get_preset("test"), seed=0, vocab_size=64)
    _, opt = muon_run(model)
    x = torch.randint(0, 64, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    hidden = [p for _, p in train.lowrank_weights(model)]
    for p in hidden:  # one (m x n) momentum buffer, nothing else
        assert list(opt.state[p]) == ["momentum_buffer"] and opt.state[p]["momentum_buffer"].shape == p.shape
    rest = copy.deepcopy([p for p in model.parameters() if all(p is not h for h in hidden)])
    for p in rest:
        p.grad = torch.ones_like(p)
    adamw = torch.optim.AdamW(rest, lr=1e-3, fused=True)  # what grassfx train's muon run uses on CPU
    adamw.step()
    matrices = sum(p.numel() * p.element_size() for p in hidden)
    assert measure.optimizer_state_bytes(opt) == matrices + measure.optimizer_state_bytes(adamw)
    assert measure.optimizer_state_bytes(adamw) >= 2 * 4 * sum(p.numel() for p in rest)


def test_checkpoint_round_trip_and_scheduler_reach_both_optimizers():
    torch.manual_seed(0)
    model = presets.build_model(presets.get_preset("test"), seed=0, vocab_size=64)
    _, opt = muon_run(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_lambda(10))
    x = torch.randint(0, 64, (2, 16))

    def step(m, o, s):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)
        s.step()

    step(model, opt, sched)
    scale = options.RECOMMENDED["muon"]["scale"]
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(opt.adamw.param_groups[0]["lr"] * scale)
    saved_model, saved_opt, saved_sched = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    step(model, opt, sched)

    again = presets.build_model(presets.get_preset("test"), seed=1, vocab_size=64)
    again.load_state_dict(saved_model)
    _, opt2 = muon_run(again)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, train.lr_lambda(10))
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.muon.state is opt2.state is opt2.adamw.state and len(opt2.state) == len(opt.state)
    assert opt2.param_groups[0] is opt2.muon.param_groups[0]
    step(again, opt2, sched2)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_the_muon_run_trains(tmp_path, text):
    out = tmp_path / "run"
    summary = train.run(["--preset", "test", "--steps", "12", "--batch-size", "2", "--seq-len", "16",
                         "--eval-every", "4", "--eval-windows", "2", "--backend", "eager", "--threads", "2",
                         "--no-progress", "--malloc", "system", "--speed-steps", "0", "--data", str(text),
                         "--out", str(out), "--optimizer", "muon"])
    row = summary["muon"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["eval_curve"] for r in records if "eval_curve" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5 and curve[-1] < curve[0]
    assert row["scale"] == options.RECOMMENDED["muon"]["scale"] and "update_freq" not in row and "rank" not in row
    model = presets.build_model(presets.get_preset("test"), seed=0, vocab_size=json.loads(
        (out / "config.json").read_text())["vocab_size"])
    hidden = sum(p.numel() for _, p in train.lowrank_weights(model))
    rest = sum(p.numel() for p in model.parameters()) - hidden
    n_rest = len(list(model.parameters())) - len(train.lowrank_weights(model))
    assert row["optimizer_state_bytes"] == 4 * (hidden + 2 * rest + n_rest)  # fp32: momentum; m, v, step
