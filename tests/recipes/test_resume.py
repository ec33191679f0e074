"""Checkpoints of grassfx train (grassfx.recipes.checkpoint): --save-every, --resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from grassfx.recipes import checkpoint, options, train

PROSE = ("Every optimizer in this test sees the same batches in the same order, and a run that "
         "stops and goes on must see them exactly as a run that never stopped. ") * 40


def argv(out, text, *extra, steps=6, runs=("--optimizer", "adamw", "--optimizer", "grass")):
    """A few eager steps of the test preset (by default adamw, then grass)."""
    return ["--preset", "test", "--steps", str(steps), "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-windows", "2", "--backend", "eager", "--threads", "2", "--no-progress", "--malloc", "system",
            "--speed-steps", "0", "--data", str(text), "--out", str(out), *runs, *extra]


def losses(out) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_run = {}
    for r in records:
        by_run.setdefault(r["run"], []).append((r["step"], r["loss"], r.get("eval_curve"), r.get("eval_loss")))
    return by_run


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "prose.txt"
    path.write_text(PROSE)
    return path


def ctrl_c_at(monkeypatch, run_name, step):
    """Send this process SIGINT (as Ctrl-C does) during step ``step`` of run ``run_name``."""
    real, count = train.train_step, {}

    def step_then_signal(model, opt, sched, x):
        loss = real(model, opt, sched, x)
        name = "grass" if hasattr(opt, "rewarmup") else "adamw"
        count[name] = count.get(name, 0) + 1
        if (name, count[name]) == (run_name, step):
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train, "train_step", step_then_signal)


def test_ctrl_c_then_resume_gives_the_losses_of_a_run_never_stopped(tmp_path, text, monkeypatch, capsys):
    train.run(argv(tmp_path / "straight", text))
    straight = losses(tmp_path / "straight")

    out = tmp_path / "stopped"
    ctrl_c_at(monkeypatch, "grass", 3)  # the second run, halfway
    assert train.main(argv(out, text)) == 130
    err = capsys.readouterr().err
    assert f"resume with: grassfx train --resume {out}" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adamw"]["steps"] == 6 and "interrupted" not in summary["adamw"]
    assert summary["grass"]["interrupted"] is True
    assert summary["grass"]["step"] == summary["grass"]["checkpoint_step"] == 3
    state = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)  # tensors and plain data only
    assert state["run"] == "grass" and state["step"] == 3 and len(state["records"]) == 3
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())

    # a differing setting is refused, naming it
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(out), "--lr", "grass=0.01"])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options.parse_args(["--resume", str(out), "--steps", "8"])
    assert "--steps is 8 here but 6 in the run being resumed" in capsys.readouterr().err

    monkeypatch.undo()
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    trained, real_run, real_step = [], train.train_run, train.train_step
    monkeypatch.setattr(train, "train_run", lambda spec, *a, **k: trained.append(spec.name) or real_run(spec, *a, **k))
    monkeypatch.setattr(train, "train_step", lambda *a: trained.append("step") or real_step(*a))
    summary = train.run(["--resume", str(out)])  # the settings come from the folder
    assert trained == ["grass", "step", "step", "step"]  # adamw finished: kept; grass: steps 4 to 6
    assert "resuming" in capsys.readouterr().out
    assert losses(out) == straight  # every loss and evaluation, exactly
    assert summary["grass"]["steps"] == 6 and "interrupted" not in summary["grass"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["adamw"]["eval_loss"] == json.loads((tmp_path / "straight" / "summary.json").read_text())[
        "adamw"]["eval_loss"] == summary["adamw"]["eval_loss"]
    assert on_disk["grass"]["eval_loss"] == summary["grass"]["eval_loss"]


def test_save_every_and_resume_after_a_kill(tmp_path, text, monkeypatch):
    """A run killed (no chance to save) goes on from its last --save-every checkpoint, exactly."""
    one = ["--optimizer", "grass", "--selection", "uniform", "--grass-optimizer", "adamw", "--update-freq", "2"]
    train.run(argv(tmp_path / "straight", text, steps=8, runs=one))
    straight = losses(tmp_path / "straight")

    out, real, steps = tmp_path / "killed", train.train_step, []

    def killed_at_step_6(*a):
        steps.append(1)
        if len(steps) == 6:
            raise SystemExit("killed")
        return real(*a)

    monkeypatch.setattr(train, "train_step", killed_at_step_6)
    with pytest.raises(SystemExit, match="killed"):
        train.run(argv(out, text, "--save-every", "4", steps=8, runs=one))
    assert checkpoint.load(out / checkpoint.CHECKPOINT)["step"] == 4
    steps.clear()
    monkeypatch.setattr(train, "train_step", lambda *a: steps.append(1) or real(*a))
    train.run(["--resume", str(out)])
    assert len(steps) == 4  # steps 5 to 8: from the checkpoint of step 4
    assert losses(out) == straight and list(straight) == ["grass"]


def test_a_kill_while_saving_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.save(path, {"step": 1, "w": torch.ones(3)})
    real = torch.save

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real)
    kept = checkpoint.load(path)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT]


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a process started in the background
    with checkpoint.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # whatever it was is put back


def test_resume_needs_a_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        options.parse_args(["--resume", str(tmp_path)])
    assert exc.value.code == 2 and "no config.json there" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"steps": 6}')  # a folder of a run from before --resume
    with pytest.raises(SystemExit) as exc:
        options.parse_args(["--resume", str(tmp_path)])
    assert exc.value.code == 2 and "has no command line" in capsys.readouterr().err
