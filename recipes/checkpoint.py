"""Checkpoints of ``grassfx train``: save every N steps, resume exactly, stop cleanly on Ctrl-C.

A checkpoint (``checkpoint.pt`` in the output folder) is the run in progress after a whole
step: the model's and the optimizer's own ``state_dict()`` (grassfx resumes them bit-exactly
in eager mode), the lr scheduler, the batch sampler's generator (the data position), the RNG
states, and the run's records, smoothed loss and timings so far. It holds tensors, numbers,
strings, lists and dicts only, so ``torch.load(path, weights_only=True)`` reads it. It is
written to a temporary file that then replaces the old one, so a kill while saving leaves
the last good checkpoint in place.

Runs a comparison finished are kept in ``summary.json`` and ``metrics.jsonl``; a resumed
comparison (``--resume DIR``) trains only the run that was interrupted (from its checkpoint,
or from its start when it has none) and the runs after it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


class Interrupted(Exception):
    """Training stopped early (Ctrl-C): ``out`` holds what was done; ``--resume out`` goes on."""

    def __init__(self, out: Path, message: str = ""):
        super().__init__(message or f"interrupted; resume with: grassfx train --resume {out}")
        self.out = out


class RunStopped(Exception):
    """A run stopped at a request before its last step: ``row`` is its summary.json row."""

    def __init__(self, row: dict):
        super().__init__(f"stopped after step {row['step']}")
        self.row = row


class StopRequest:
    """While active (single process, main thread): the first Ctrl-C asks the training loop to
    stop after the step in progress (``requested``); a second one stops at once
    (``KeyboardInterrupt``, the step in progress abandoned)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step, with a checkpoint (Ctrl-C again: stop now, without one)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def save(path: Path, payload: dict) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _safe_globals() -> list:
    """Classes an optimizer's state may hold besides tensors: GaLore's projector objects."""
    try:
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError:
        return []
    return [GaLoreProjector]


def load(path: Path) -> dict:
    """Read a checkpoint written by :func:`save` (``weights_only``: no code runs)."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every RNG a training step may draw from."""
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def run_state(name: str, step: int, model, opt, sched, sampler, speed, smooth: float, eval_loss: float,
              peak: int, records: list[dict]) -> dict:
    """The checkpoint of run ``name`` after ``step``."""
    return dict(run=name, step=step, model=model.state_dict(), optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), sampler=sampler.generator.get_state(), rng=rng_state(),
                smooth=smooth, eval_loss=eval_loss, peak_mem_bytes=peak, speed=dict(vars(speed)),
                records=list(records))


def restore(state: dict, model, opt, sched, sampler, speed) -> tuple[int, float, float, int, list[dict]]:
    """Load ``state`` into a freshly built run; returns ``(step, smooth, eval_loss, peak, records)``."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    sampler.generator.set_state(state["sampler"])
    vars(speed).update(state["speed"])
    set_rng_state(state["rng"])
    return state["step"], state["smooth"], state["eval_loss"], state["peak_mem_bytes"], list(state["records"])


def interrupted_row(optimizer: str, step: int, steps: int, smooth, eval_loss: float, saved: int | None) -> dict:
    """The summary.json row of a run stopped after ``step`` (checkpoint of step ``saved``, if any)."""
    return dict(optimizer=optimizer, interrupted=True, step=step, steps=steps, train_loss=smooth,
                eval_loss=eval_loss if math.isfinite(eval_loss) else None, checkpoint_step=saved)


def resumed(out: Path, names: list[str]) -> tuple[dict, list[dict], dict | None]:
    """What a resumed comparison keeps from ``out``: the finished runs' summary rows and records,
    plus the checkpoint of the interrupted run (None when there is none, or it is of a finished run)."""
    summary, records, state = {}, [], None
    if (out / "summary.json").exists():
        summary = {name: row for name, row in json.loads((out / "summary.json").read_text()).items()
                   if name in names and not row.get("interrupted")}
    if (out / CHECKPOINT).exists():
        state = load(out / CHECKPOINT)
        if state["run"] in summary or state["run"] not in names:
            state = None
    if (out / "metrics.jsonl").exists():
        records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r["run"] in summary]
    if state is not None:
        records += state["records"]
    return summary, records, state


def check_same_corpus(out: Path, corpus) -> None:
    """Refuse to resume ``out`` on a corpus other than its own (the same --data, changed text)."""
    saved = json.loads((out / "config.json").read_text()).get("corpus_key")
    if saved is not None and saved != corpus.key:
        raise SystemExit(f"grassfx train: error: --resume {out}: the text of {corpus.source} changed since that "
                         "run started; resume on the same text (or start a new run with another --out)")
