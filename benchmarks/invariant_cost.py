"""What the per-step invariant check costs: training steps with and without it, side by side.

grassfx checks one invariant at every step (docs/architecture.md, "One invariant, checked
every step"): the optimizer step pre-hook (who steps), ``check_gradients_delivered`` (what
arrives) and the forward's handle-version check (what was written). This script trains the
``tiny`` LLaMA preset (random tokens: speed does not depend on the text) with grassfx on
Inductor and ``grassfx.optim.AdamW``, and alternates steps with the three checks on and
replaced by no-ops, one step of each in turn, so both arms see the machine at the same
times. It reports the median step time of each arm and their ratio, and, timed alone, the
checks' own cost per step (their calls on the trained model and optimizer, 2,000 times).

Example:
    python benchmarks/invariant_cost.py --steps 60 --out benchmarks/results/invariant_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time

import torch

import grassfx
from grassfx.instrument import guard, surgery
from grassfx.instrument import model as grass_model
from grassfx.recipes.presets import build_model, get_preset


@contextlib.contextmanager
def checks_off():
    """The three checks replaced by no-ops (restored on exit)."""
    saved = guard.check_gradients_delivered, guard.check_handles_untouched
    guard.check_gradients_delivered = lambda schedule: None
    guard.check_handles_untouched = lambda sites: None
    hook = guard._HOOK.pop()
    hook.remove()
    try:
        yield
    finally:
        guard.check_gradients_delivered, guard.check_handles_untouched = saved
        guard.install_optimizer_check()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per arm (after warm-up)")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    preset = get_preset("tiny")
    model = grassfx.compile(build_model(preset, seed=0), rank=preset.rank, update_freq=200, backend=args.backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, preset.vocab_size, (4, 128), generator=g)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    on, off = [], []
    for i in range(2 * args.steps):
        if i % 2 == 0:
            on.append(step())
        else:
            with checks_off():
                off.append(step())

    # the checks alone, on the trained model and optimizer (gradients present)
    model(input_ids=torch.randint(0, preset.vocab_size, (4, 128), generator=g),
          labels=torch.randint(0, preset.vocab_size, (4, 128), generator=g)).loss.backward()
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        guard._before_step(opt, (), {})
        for schedule in opt._schedules:
            guard.check_gradients_delivered(schedule)
        guard.check_handles_untouched(model.sites)
    alone = (time.perf_counter() - start) / calls
    # per forward, not switchable: replaced-module/freeze check and the anchors left for reads outside the graph
    start = time.perf_counter()
    for _ in range(calls):
        surgery.check(model)
    surgery_us = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for _ in range(calls):
        model._slot.begin(grass_model._make_anchor, model._entries(None), upfront=False, eager=True,
                          changed=grass_model._changed_anchor)
    slot_us = (time.perf_counter() - start) / calls * 1e6

    result = {
        "command": "python benchmarks/invariant_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": f"tiny LLaMA preset, {len(model.sites)} projected weights, batch 4 x 128, backend {args.backend}",
        "steps_per_arm": args.steps,
        "median_step_s_checks_on": statistics.median(on),
        "median_step_s_checks_off": statistics.median(off),
        "ratio_on_over_off": statistics.median(on) / statistics.median(off),
        "checks_alone_us_per_step": alone * 1e6,
        "checks_alone_share_of_step": alone / statistics.median(off),
        "per_forward_surgery_check_us": surgery_us,
        "per_forward_outside_anchors_us": slot_us,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
