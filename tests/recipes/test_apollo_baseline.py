"""The APOLLO / APOLLO-Mini baselines of ``grassfx train`` (recipes/optimizers.py)."""

from __future__ import annotations

import pytest
import torch

from grassfx.recipes import optimizers, options, presets


def _model():
    return presets.build_model(presets.get_preset("test"), seed=0, vocab_size=64)


def _step(model, opt):
    x = torch.randint(0, 64, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("name", ["apollo", "apollo-mini"])
def test_groups_step_and_state(name):
    args = options.parse_args(["--optimizer", name, "--preset", "test", "--rank", "4", "--scale", "3",
                               "--lr", "1e-3"])
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizers.make_apollo(model, args, mini=name == "apollo-mini")
    rest, matrices = opt.param_groups
    hidden = [p for _, p in optimizers.lowrank_weights(model)]
    assert {id(p) for p in matrices["params"]} == {id(p) for p in hidden} and hidden
    assert len(rest["params"]) + len(hidden) == len(list(model.parameters()))
    rank = 1 if name == "apollo-mini" else 4
    assert matrices["rank"] == rank and matrices["proj"] == "random"
    assert matrices["scale_type"] == ("tensor" if name == "apollo-mini" else "channel")
    assert matrices["scale"] == pytest.approx(9.0)  # --scale squared: the package multiplies by its root
    _step(model, opt)
    for n, p in model.named_parameters():  # every parameter moved
        assert not torch.equal(p, before[n]), n
    for p in hidden:  # the moments live in the rank-r space
        m, n = p.shape
        assert opt.state[p]["exp_avg"].numel() == rank * max(m, n), (p.shape, opt.state[p]["exp_avg"].shape)


def test_fraction_rank_refused_for_apollo(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--optimizer", "apollo", "--rank", "0.25"])
    assert "apollo take an integer rank" in capsys.readouterr().err


def test_compare_runs_every_optimizer_and_demo_the_four():
    assert options.run_optimizers(options.parse_args(["--compare"])) == list(options.OPTIMIZERS)
    assert options.run_optimizers(options.parse_args(["--demo"])) == list(options.DEMO_OPTIMIZERS)
    assert {"apollo", "apollo-mini"} <= set(options.OPTIMIZERS) - set(options.DEMO_OPTIMIZERS)


def test_apollo_mini_rank_is_one_whatever_rank_says():
    args = options.parse_args(["--optimizer", "apollo-mini", "--rank", "16"])
    assert options.projection_rank("apollo-mini", args) == 1
    assert options.projection_rank("apollo", args) == 16
