"""The command line of grassfx train (grassfx.recipes.options): runs, per-optimizer flags, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grassfx.recipes import options

ROOT = Path(__file__).resolve().parents[2]  # the checkout: grassfx.train of this tree


def test_run_specs_and_cli_errors(capsys):
    specs = options.run_specs(options.parse_args(["--compare"]))
    assert [s.name for s in specs] == ["adamw", "galore", "grass", "muon", "apollo", "apollo-mini"]
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
    assert options.parse_args([]).refresh == "eager"  # one training graph to compile, refresh steps eager
    assert options.parse_args(["--demo"]).refresh == "eager"
    assert options.parse_args(["--backend", "eager"]).refresh == "eager"
    assert options.parse_args(["--refresh", "eager"]).refresh == "eager"


def test_lean_is_the_split_factored_state(capsys):
    lean = options.parse_args(["--lean"])
    assert (lean.full_state, lean.embedding_full_state) == ("factored", "factored_nomomentum")
    plain = options.parse_args([])
    assert (plain.full_state, plain.embedding_full_state) == ("adam", None)
    for clash in (["--lean", "--full-state", "factored_nomomentum"], ["--lean", "--full-state", "adam"],
                  ["--lean", "--embedding-full-state", "adam"]):
        with pytest.raises(SystemExit):
            options.parse_args(clash)
        assert "--lean sets --full-state and --embedding-full-state" in capsys.readouterr().err


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


BAD_SETTINGS = [
    (["--compare", "--explore", "1.5"], "the grass run: explore=1.5"),
    (["--compare", "--selection", "multinorm", "--explore", "0.25"], "explore=0.25 needs selection"),
    (["--compare", "--rewarmup", "-2"], "the grass run: rewarmup=-2"),
    (["--compare", "--grass-optimizer", "adamw", "--rewarmup", "-2"], "the grass run: rewarmup=-2"),
    (["--compare", "--weight-decay", "-1"], "--weight-decay: must be a number >= 0"),
    (["--optimizer", "galore", "--weight-decay", "-1"], "--weight-decay: must be a number >= 0"),
    (["--seq-len", "1"], "--seq-len: must be at least 2"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "nonsense"], "bad --device 'nonsense'"),
]


@pytest.mark.parametrize("argv, message", BAD_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_settings_of_any_run_are_refused_before_training(argv, message, monkeypatch, capsys):
    """Every run's settings are checked up front (by GrassConfig and the optimizers themselves):
    an argparse error (exit code 2) before the data is even loaded, let alone a run trained."""
    from grassfx.recipes import train

    def no_training(*a, **k):
        raise AssertionError("the settings were not checked before the runs started")

    monkeypatch.setattr(train, "prepare_data", no_training)
    with pytest.raises(SystemExit) as exc:
        train.main(argv + ["--preset", "test", "--backend", "eager"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "grassfx train: error:" in err and message in err, err


def test_out_naming_a_file_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        with pytest.raises(SystemExit) as exc:
            options.parse_args(["--out", str(out)])
        assert exc.value.code == 2
    done = subprocess.run([sys.executable, "-m", "grassfx.train", "--out", str(tmp_path / "taken")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"grassfx train: error: --out {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a folder; name a folder")


def test_good_settings_pass_the_up_front_check():
    args = options.parse_args(["--compare", "--selection", "top_r", "--explore", "0.25", "--rewarmup", "3",
                               "--weight-decay", "0.1", "--device", "cpu", "--seq-len", "2"])
    assert args.explore == 0.25 and args.rewarmup == 3 and args.seq_len == 2
