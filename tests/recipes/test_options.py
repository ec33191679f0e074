"""The command line of grassfx train (grassfx.recipes.options): runs, per-optimizer flags, errors."""

from __future__ import annotations

import pytest

from grassfx.recipes import options


def test_run_specs_and_cli_errors(capsys):
    specs = options.run_specs(options.parse_args(["--compare"]))
    assert [s.name for s in specs] == ["adamw", "galore", "grass"]
    specs = options.run_specs(options.parse_args(
        ["--optimizer", "adamw", "--optimizer", "grass", "--selection", "top_r", "--selection", "uniform"]))
    assert [(s.name, s.selection) for s in specs] == [
        ("adamw", None), ("grass-top_r", "top_r"), ("grass-uniform", "uniform")]
    demo = options.parse_args(["--demo", "--steps", "7"])
    assert demo.steps == 7 and demo.preset == "tiny" and demo.compare
    assert options.run_optimizers(options.parse_args(["--demo", "--optimizer", "grass"])) == ["grass"]
    for bad in (["--selection", "top_r", "--optimizer", "adamw"], ["--optimizer", "sgd"],
                ["--steps", "0"], ["--selection", "best"], ["--preset", "test", "--seq-len", "4096"]):
        with pytest.raises(SystemExit):
            options.parse_args(bad)
    assert "--selection only applies to grass" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options.parse_args(["--refresh", "compiled", "--backend", "eager"])
    assert "--refresh compiled needs a compiled backend" in capsys.readouterr().err
    assert options.parse_args(["--refresh", "compiled"]).refresh == "compiled"
    assert options.parse_args([]).refresh == "compiled"  # the default backend compiles: refresh steps too
    assert options.parse_args(["--demo"]).refresh == "compiled"
    assert options.parse_args(["--backend", "eager"]).refresh == "eager"
    assert options.parse_args(["--refresh", "eager"]).refresh == "eager"


def test_per_optimizer_flags():
    args = options.parse_args(["--compare", "--lr", "2e-3", "--lr", "grass=5e-3", "--scale", "galore=0.25"])
    assert options.setting(args, "lr", "grass") == 5e-3
    assert options.setting(args, "lr", "adamw") == 2e-3
    assert options.setting(args, "scale", "galore") == 0.25
    assert options.setting(args, "scale", "grass") == options.RECOMMENDED["grass"]["scale"]
    with pytest.raises(SystemExit):
        options.parse_args(["--lr", "sgd=1e-3"])
    # the default refresh interval gives every run the same number of windows
    assert options.setting(options.parse_args(["--steps", "600"]), "update_freq", "grass") == 24
    assert options.setting(options.parse_args(["--steps", "600", "--update-freq", "7"]), "update_freq", "galore") == 7
