"""Pretrain a small LLaMA on real text and compare optimizers side by side.

Every run starts from the same initial weights, sees the same batches in the
same order and follows the same learning-rate schedule (linear warmup over the
first 10% of the steps, then cosine decay to 10% of the peak); only the
optimizer differs:

* ``adamw``  -- ``torch.optim.AdamW`` on every parameter (full-rank baseline);
* ``galore`` -- ``GaLoreAdamW`` from the ``galore-torch`` package (SVD projection
  of the attention/MLP weight gradients);
* ``grass``  -- the model goes through ``grassfx.compile`` (structured sparse
  projection of those gradients inside the backward graph) and is trained with
  ``grassfx.optim.Muon`` (AdamW rows with ``--grass-optimizer adamw``);
* ``muon``   -- ``torch.optim.Muon`` on those weights, AdamW on the rest (dense
  baseline of grassfx's Muon rows; :mod:`grassfx.recipes.muon`).

Usage::

    python -m grassfx.train --demo                 # adamw vs galore vs grass vs muon, tiny model, 2 CPU cores
    python -m grassfx.train --compare --preset small --steps 2000
    python -m grassfx.train --optimizer grass --selection top_r --selection multinorm
    python -m grassfx.train --data my_texts/ --optimizer adamw

Writes ``metrics.jsonl``, ``summary.json``, ``config.json`` and ``loss.png``
into ``--out`` (default ``runs/<timestamp>``) and prints a results table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from . import data as data_mod
from . import presets as presets_mod
from .launch import barrier, init_distributed, launch
from .measure import PeakMemory, Throughput, compiled_graphs, fmt_bytes, keep_freed_memory, optimizer_state_bytes, sync
from .optimizers import check_imports, lowrank_weights, make_apollo, make_galore, make_muon
from .options import (
    PROJECTED,
    RunSpec,
    grass_compile_settings,
    grass_optimizer_settings,
    grass_setting,
    parse_args,
    projection_rank,
    run_specs,
    setting,
)
from .report import json_default, plot_losses, results_table

WARMUP_FRACTION = 0.1
MIN_LR_RATIO = 0.1


# ----------------------------------------------------------------------------- optimizers


def lr_lambda(steps: int, warmup_fraction: float = WARMUP_FRACTION, min_ratio: float = MIN_LR_RATIO):
    """Multiplier of the peak lr at each step: linear warmup, then cosine decay to ``min_ratio``."""
    warmup = max(1, int(round(warmup_fraction * steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_grass(model: torch.nn.Module, spec: RunSpec, args: argparse.Namespace):
    """``grassfx.compile`` the model and build ``grassfx.optim.AdamW`` (or ``Muon``) on it."""
    import grassfx
    import grassfx.optim

    model = grassfx.compile(model, **grass_compile_settings(args, spec))
    common = grass_optimizer_settings(args)
    params = model.parameters()
    if args.embedding_full_state is not None:  # the input embedding in a group of its own
        params = grassfx.optim.embedding_groups(params, model.module.get_input_embeddings().weight,
                                                args.embedding_full_state)
    if grass_setting(args, "optimizer") == "muon":
        return model, grassfx.optim.Muon(params, **common)
    return model, grassfx.optim.AdamW(params, **common)


def _fused(model: torch.nn.Module, args: argparse.Namespace) -> bool:
    """The baseline at its fastest: torch's fused AdamW kernel (CPU and CUDA), except under DDP's
    bucketed gradients where torch's default (foreach) is the tested path."""
    return getattr(args, "world_size", 1) == 1 and next(model.parameters()).device.type in ("cpu", "cuda")


def make_optimizer(model: torch.nn.Module, spec: RunSpec, args: argparse.Namespace):
    """Return ``(model, optimizer)`` for ``spec``; the model may come back wrapped or compiled."""
    if spec.optimizer == "grass":
        return make_grass(model, spec, args)  # grassfx trains data-parallel by itself
    if getattr(args, "world_size", 1) > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.backend != "eager":
        model = torch.compile(model, backend=args.backend)
    if spec.optimizer == "galore":
        return model, make_galore(model, args)
    if spec.optimizer in ("apollo", "apollo-mini"):
        return model, make_apollo(model, args, mini=spec.optimizer == "apollo-mini")
    if spec.optimizer == "muon":  # the same split and fused AdamW as below, Muon for the matrices
        return model, make_muon(model, [p for _, p in lowrank_weights(model)], args, fused=_fused(model, args))
    fused = _fused(model, args)
    # --scale: the lr multiplier of the attention/MLP weights (what GaLore and grass project),
    # so every method can give them and the rest (embeddings, norms) different rates
    lr, scale = setting(args, "lr", "adamw"), setting(args, "scale", "adamw")
    matrices = {id(p) for _, p in lowrank_weights(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) in matrices], "lr": lr * scale},
              {"params": [p for p in model.parameters() if id(p) not in matrices], "lr": lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay, fused=fused or None)
    return model, opt


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device: torch.device, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) of ``model`` over ``windows`` (N, seq_len), every token weighted alike.

    The windows all have the same length, so the mean of the per-batch means weighted by
    batch size is the mean over tokens; the batch size changes nothing but speed.
    """
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        b = windows[start:start + batch_size].to(device)
        total += float(model(input_ids=b, labels=b).loss) * b.shape[0]
        count += b.shape[0]
    return total / count


def uncompiled(model):
    """The model's eager forward, for evaluation: no inference graph to compile (and the
    numbers of the reference path). A grassfx model's own module reads its plain weights
    outside a training forward."""
    import grassfx

    if isinstance(model, grassfx.GrassModel):
        return model.module
    return getattr(model, "_orig_mod", model)


def timed_eval(model, windows: torch.Tensor, device: torch.device, speed: Throughput,
               batch_size: int = 16) -> float:
    """:func:`evaluate`, batch by batch; a batch during which a graph was compiled (the first
    evaluation of a compiled model, a last batch of another size) adds what it took beyond
    a typical batch (the median of the others, per window) to ``speed``'s compile time."""
    total, count, plain, compiling = 0.0, 0, [], []
    for start in range(0, windows.shape[0], batch_size):
        b = windows[start:start + batch_size].to(device)
        sync(device)
        graphs, t0 = compiled_graphs(), time.perf_counter()
        total += evaluate(model, b, device, batch_size) * b.shape[0]
        sync(device)
        (compiling if compiled_graphs() != graphs else plain).append(((time.perf_counter() - t0), b.shape[0]))
        count += b.shape[0]
    if compiling:
        per_window = statistics.median(dt / n for dt, n in plain) if plain else 0.0
        speed.add_compile(sum(dt - per_window * n for dt, n in compiling))
    return total / count


@dataclass
class EvalSet:
    """The fixed evaluation windows: ``full`` (every window of the split) and ``curve`` (a spread subset)."""

    full: torch.Tensor
    curve: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.full.numel())


def train_step(model, opt, sched, x: torch.Tensor) -> float:
    """One ordinary optimizer step on batch ``x``; returns the loss."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss.detach().item()


def build_run(spec: RunSpec, corpus, args, device):
    """``(model, optimizer, lr scheduler, parameter count)`` of one run, from the shared init."""
    model = presets_mod.build_model(presets_mod.get_preset(args.preset), args.seed, vocab_size=corpus.vocab_size,
                                    arch=args.arch).to(device)
    params = presets_mod.count_params(model)
    model, opt = make_optimizer(model, spec, args)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps)), params


def timed_step(model, opt, sched, x: torch.Tensor, device) -> tuple[float, float, bool]:
    """:func:`train_step`, timed: ``(loss, seconds, whether a graph was compiled in it)``."""
    sync(device)
    graphs, t0 = compiled_graphs(), time.perf_counter()
    loss = train_step(model, opt, sched, x)
    sync(device)
    return loss, time.perf_counter() - t0, compiled_graphs() != graphs


def train_run(spec: RunSpec, corpus, eval_set, args, device, log, out: Path, state: dict | None = None,
              stop: checkpoint.StopRequest | None = None) -> dict:
    """Train one run from the shared init and batches (or from its checkpoint ``state``); ``log``
    gets each step's record. A checkpoint goes to ``out`` every ``--save-every`` steps and when
    ``stop`` is requested, which then ends the run early (:class:`checkpoint.RunStopped`)."""
    from tqdm.auto import tqdm

    gc.collect()
    mem = PeakMemory(device)
    model, opt, sched, params = build_run(spec, corpus, args, device)
    world, proc = getattr(args, "world_size", 1), getattr(args, "proc_rank", 0)
    sampler = data_mod.BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed + 7919 * proc)
    speed = Throughput(args.batch_size * args.seq_len * world)  # tokens of all processes
    done, smooth, eval_loss, peak, mine = 0, None, float("nan"), 0, []
    if state is not None:
        done, smooth, eval_loss, peak, mine = checkpoint.restore(state, model, opt, sched, sampler, speed)
    saved = done or None
    bar = tqdm(total=args.steps, initial=done, desc=f"{spec.name:>8}", unit="step", dynamic_ncols=True,
               disable=args.no_progress or proc != 0, mininterval=0.5, file=sys.stderr)
    step = done
    try:
        for step in range(done + 1, args.steps + 1):
            x = next(sampler).to(device)
            lr = opt.param_groups[0]["lr"]
            loss, dt, compiled = timed_step(model, opt, sched, x, device)
            speed.add(dt, compiled=compiled)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{spec.name}: the training loss became {loss} at step {step}")
            smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
            record = dict(run=spec.name, step=step, loss=loss, lr=lr, tokens_per_s=speed.tokens_per_step / dt)
            if step % args.eval_every == 0 or step == args.steps:  # the curve: the same windows each time
                eval_loss = record["eval_curve"] = timed_eval(uncompiled(model), eval_set.curve, device, speed)
            if step == args.steps:  # the result: every window of the evaluation split
                eval_loss = record["eval_loss"] = timed_eval(uncompiled(model), eval_set.full, device, speed)
            log(record)
            mine.append(record)
            shown_eval = f"eval {eval_loss:.3f}, " if math.isfinite(eval_loss) else ""
            bar.set_postfix_str(f"loss {smooth:.3f}, {shown_eval}{speed.tokens_per_s:,.0f} tok/s, "
                                f"mem {fmt_bytes(mem.peak())}", refresh=False)
            bar.update(1)
            stopping = stop is not None and stop.requested and step < args.steps
            if stopping or (args.save_every and step % args.save_every == 0):
                checkpoint.save(out / checkpoint.CHECKPOINT, checkpoint.run_state(
                    spec.name, step, model, opt, sched, sampler, speed, smooth, eval_loss, max(peak, mem.peak()),
                    mine))
                saved = step
            if stopping:
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # a step cut short is abandoned: the run stopped after the one before
        bar.close()
        last = step if saved == step else step - 1
        raise checkpoint.RunStopped(checkpoint.interrupted_row(spec.optimizer, last, args.steps, smooth, eval_loss,
                                                               saved)) from None
    bar.close()
    summary = dict(
        optimizer=spec.optimizer, eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 700.0)),
        train_loss=smooth, tokens_per_s=speed.tokens_per_s, peak_mem_bytes=max(peak, mem.peak()),
        optimizer_state_bytes=optimizer_state_bytes(opt), steps=args.steps,
        tokens=args.steps * speed.tokens_per_step, params=params,
        train_time_s=speed.seconds + sum(speed.compiling), first_step_s=speed.first_step_s,
        compile_s=speed.compile_s, backend=args.backend)
    summary["lr"] = setting(args, "lr", spec.optimizer)
    if spec.optimizer in PROJECTED:
        summary.update(rank=projection_rank(spec.optimizer, args), update_freq=setting(args, "update_freq", spec.optimizer))
    if spec.optimizer != "adamw":
        summary["scale"] = setting(args, "scale", spec.optimizer)
    if spec.selection:
        summary["selection"] = spec.selection
    return summary


# ----------------------------------------------------------------------------- entry point


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)  # a name options.parse_args has checked


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``grassfx train``, ``python -m grassfx.train``); returns 0, or 130 when
    stopped by Ctrl-C (with a checkpoint and summary.json to resume from)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(argv, args.nproc)
    try:
        run(argv)
    except checkpoint.Interrupted as exc:
        print(f"\ngrassfx train: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the output folder existed: nothing to resume
        print("\ngrassfx train: interrupted", file=sys.stderr)
        return 130
    return 0


def prepare_data(args: argparse.Namespace, preset):
    """Load and tokenize the corpus and cut the fixed evaluation windows."""
    try:
        corpus = data_mod.load_corpus(args.data, vocab_size=preset.vocab_size)
    except data_mod.DataUnavailableError as exc:
        raise SystemExit(f"grassfx train: error: {exc}") from None
    if corpus.train.numel() < args.seq_len + 1 or corpus.eval.numel() < 2:
        raise SystemExit(
            f"grassfx train: error: the text of {corpus.source} is too short: {corpus.train.numel()} training "
            f"tokens for --seq-len {args.seq_len} (and {corpus.eval.numel()} evaluation tokens)")
    windows = data_mod.eval_windows(corpus.eval, min(args.seq_len, corpus.eval.numel()))
    return corpus, EvalSet(full=windows, curve=data_mod.spread(windows, args.eval_windows))


def write_config(out: Path, args, specs, corpus, device) -> None:
    """Save every setting of this comparison to ``out/config.json``."""
    config = dict(vars(args))
    config.update(runs=[s.name for s in specs], corpus=corpus.source, corpus_key=corpus.key,
                  train_tokens=corpus.train.numel(), eval_tokens=corpus.eval.numel(),
                  vocab_size=corpus.vocab_size, device=str(device), threads=torch.get_num_threads())
    (out / "config.json").write_text(json.dumps(config, indent=2, default=json_default) + "\n")


def warm_up(corpus, args, device, steps: int = 2) -> None:
    """A few throwaway forward/backward passes, so the first run is not timed on a cold process."""
    model = presets_mod.build_model(presets_mod.get_preset(args.preset), args.seed,
                                    vocab_size=corpus.vocab_size, arch=args.arch).to(device)
    sampler = data_mod.BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed + 2)
    for _ in range(steps):
        x = next(sampler).to(device)
        model(input_ids=x, labels=x).loss.backward()
    del model
    gc.collect()


SPEED_STEPS = 48  # the side-by-side speed check's steps per run, before rounding up to whole windows
SPEED_WARMUP = 4  # untimed steps of each run first: compile (a refresh graph, the training graph), state


def refresh_interval(spec: RunSpec, args: argparse.Namespace):
    """Steps between the projection refreshes of ``spec``'s run (None: AdamW and Muon have none)."""
    return setting(args, "update_freq", spec.optimizer) if spec.optimizer in PROJECTED else None


def speed_steps(specs: list[RunSpec], args: argparse.Namespace) -> tuple[int, str]:
    """Steps per run of :func:`speed_check` and, when that is 0, why.

    ``--speed-steps N`` (even for one run), else :data:`SPEED_STEPS` rounded up to a
    multiple of every run's refresh interval, so each run's refresh steps count in their
    share. Off for several processes (each would time its own copies), and by default for
    one run (nothing to compare) or when whole windows of every run would take more than
    ``max(4 * SPEED_STEPS, --steps / 10)`` steps."""
    if getattr(args, "world_size", 1) > 1:
        return 0, "several processes"
    if args.speed_steps is not None:
        return args.speed_steps, "" if args.speed_steps else "--speed-steps 0"
    if len(specs) < 2:
        return 0, "one run"
    intervals = sorted({refresh_interval(s, args) or 1 for s in specs})
    windows = math.lcm(*intervals)
    steps = windows * math.ceil(SPEED_STEPS / windows)
    limit = max(4 * SPEED_STEPS, args.steps // 10)
    if steps > limit:
        return 0, (f"whole refresh windows of every run ({', '.join(map(str, intervals))} steps) take {steps} "
                   f"steps, more than {limit}; --speed-steps N runs it anyway")
    return steps, ""


def speed_check(specs: list[RunSpec], corpus, args: argparse.Namespace, device, steps: int) -> dict:
    """Steady tokens/s of every run measured side by side.

    Fresh copies of every run (same init, optimizer, schedule and backend as its training
    run) take :data:`SPEED_WARMUP` untimed steps, then ``steps`` timed ones, one step of
    each run in turn on the same batch, the order rotated every step (each run takes each
    place in turn). Runs trained one after another see the machine at different times, and
    on a shared machine its speed drifts by several percent over a few minutes, more than
    the differences measured; side by side, every run sees the same drift. A timed step that
    compiled a graph is left out and counted (``recompiled``). Returns ``{run:
    {"tokens_per_s", "steps", "recompiled"}}``; ``tokens_per_s`` is None for a run whose
    every timed step compiled.
    """
    from tqdm.auto import tqdm

    live = [(spec.name, *build_run(spec, corpus, args, device)[:3]) for spec in specs]
    sampler = data_mod.BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed + 1)
    times = {name: [] for name, *_ in live}
    recompiled = dict.fromkeys(times, 0)
    total = SPEED_WARMUP + steps
    bar = tqdm(total=total, desc="   speed", unit="step", dynamic_ncols=True, disable=args.no_progress,
               mininterval=0.5, file=sys.stderr)
    for i in range(total):
        x = next(sampler).to(device)
        turn = i % len(live)
        for name, model, opt, sched in live[turn:] + live[:turn]:
            _, dt, compiled = timed_step(model, opt, sched, x, device)
            if i >= SPEED_WARMUP:
                if compiled:
                    recompiled[name] += 1
                else:
                    times[name].append(dt)
        bar.update(1)
    bar.close()
    tokens = args.batch_size * args.seq_len * getattr(args, "world_size", 1)
    return {name: dict(tokens_per_s=len(ts) * tokens / sum(ts) if ts else None, steps=len(ts),
                       recompiled=recompiled[name]) for name, ts in times.items()}


def run_all(specs, corpus, eval_set, args, device, out: Path) -> tuple[dict, list[dict], str]:
    """Train every run in turn, streaming metrics.jsonl and rewriting summary.json after each;
    then the side-by-side speed check (:func:`speed_check`, :func:`speed_steps`), whose
    tokens/s replace the runs' own (kept as ``train_tokens_per_s``). Returns the summary,
    the step records and the line that says where the table's tokens/s come from."""
    warm_up(corpus, args, device)
    summary, records, state = checkpoint.resumed(out, [s.name for s in specs]) if args.resume else ({}, [], None)
    if args.resume:
        print(f"resuming {out}: " + ", ".join([f"{name} finished" for name in summary] + (
            [f"{state['run']} from step {state['step']}"] if state else [])), flush=True)
    with open(out / "metrics.jsonl", "w") as metrics, checkpoint.StopRequest(getattr(args, "world_size", 1) == 1) as stop:
        metrics.writelines(json.dumps(r) + "\n" for r in records)

        def log(record: dict) -> None:
            records.append(record)
            metrics.write(json.dumps(record) + "\n")

        for spec in (s for s in specs if s.name not in summary):
            if stop.requested:  # asked during the last step of the run before
                raise checkpoint.Interrupted(out)
            try:
                summary[spec.name] = train_run(spec, corpus, eval_set, args, device, log, out,
                                               state if state and state["run"] == spec.name else None, stop)
            except checkpoint.RunStopped as stopped:
                summary[spec.name] = stopped.row
                raise checkpoint.Interrupted(out) from None
            finally:
                metrics.flush()
                (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    steps, why = speed_steps(specs, args)
    if not steps:
        note = "" if len(specs) < 2 or why == "--speed-steps 0" else \
            f"tokens/s: each run's own training (no side-by-side speed check: {why})"
        return summary, records, note
    gc.collect()
    t0 = time.perf_counter()
    try:
        checked = speed_check(specs, corpus, args, device, steps)
    except RuntimeError as exc:  # e.g. out of memory with every copy alive: the training results stand
        return summary, records, f"tokens/s: each run's own training (the side-by-side speed check failed: " \
                                 f"{type(exc).__name__}: {exc})"
    wall = time.perf_counter() - t0
    for name, row in checked.items():
        summary[name]["speed_check"] = dict(row, warmup=SPEED_WARMUP, wall_s=wall)
        if row["tokens_per_s"] is not None:
            summary[name]["train_tokens_per_s"] = summary[name]["tokens_per_s"]
            summary[name]["tokens_per_s"] = row["tokens_per_s"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    return summary, records, speed_note(summary)


def speed_note(summary: dict) -> str:
    """The line printed under the results table: where its tokens/s come from (the speed check's rows)."""
    rows = {name: row["speed_check"] for name, row in summary.items() if "speed_check" in row}
    if not rows:
        return ""
    steps = {row["steps"] for row in rows.values()}
    if len(steps) == 1 and not any(row["recompiled"] for row in rows.values()):
        how = f"{steps.pop()} steps each"
    else:
        how = ", ".join(f"{name} {row['steps']} steps" + (f" ({row['recompiled']} left out: a graph compiled)"
                                                        if row["recompiled"] else "") for name, row in rows.items())
    own = ", ".join(f"{name} {row['train_tokens_per_s']:,.0f}" for name, row in summary.items()
                    if "train_tokens_per_s" in row)
    kept = [name for name, row in rows.items() if row["tokens_per_s"] is None]
    return (f"tokens/s: every run's training step side by side after training, {how}, one step of each in turn "
            f"(each run's own training: {own})" + (f"; {', '.join(kept)}: its own training (every timed step "
                                                    "compiled)" if kept else ""))


def run(argv: list[str] | None = None) -> dict:
    """Run the comparison described by ``argv`` and return the summary dict."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_distributed(args, resolve_device(args.device))
    if args.world_size > 1 and (args.save_every or args.resume):
        raise SystemExit("grassfx train: error: --save-every and --resume: one process only")
    # every run of this process alike: steps do not page-fault their activations back in
    kept = args.freed_memory_kept = args.malloc == "keep" and device.type == "cpu" and keep_freed_memory()
    if args.proc_rank != 0:
        args.no_progress = True
    preset = presets_mod.get_preset(args.preset)
    if args.rank is None:
        args.rank = preset.rank
    specs = run_specs(args)
    check_imports(specs)
    lead = args.proc_rank == 0
    say = print if lead else (lambda *a, **k: None)
    if not lead:
        barrier()  # rank 0 fetches/tokenizes the corpus into the cache first
    corpus, eval_set = prepare_data(args, preset)
    if lead:
        barrier()
    out = Path(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if not lead:
        out = out / f"rank{args.proc_rank}"  # other ranks keep their own records apart
    out.mkdir(parents=True, exist_ok=True)
    say(f"data: {corpus.source}: {corpus.train.numel():,} train / {corpus.eval.numel():,} eval tokens, "
        f"vocab {corpus.vocab_size} ({time.perf_counter() - t_start:.1f} s)")
    arch_name = "GPT-2" if args.arch == "gpt2" else "LLaMA"
    say(f"model: {preset.name} {arch_name}; runs: {', '.join(s.name for s in specs)}; {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens x {args.world_size} process(es); device {device}, "
        f"{torch.get_num_threads()} threads{'; freed memory kept' if kept else ''}; out {out}")
    if args.resume:
        checkpoint.check_same_corpus(out, corpus)
    write_config(out, args, specs, corpus, device)
    try:
        summary, records, note = run_all(specs, corpus, eval_set, args, device, out)
    except KeyboardInterrupt:  # outside a training step (warm-up, speed check): the runs done are kept
        raise checkpoint.Interrupted(out) from None
    source = Path(corpus.source).name if args.data else "Shakespeare"
    plotted = lead and plot_losses(records, out / "loss.png",
                                   f"{preset.name} {arch_name} ({summary[specs[0].name]['params'] / 1e6:.1f}M params) on {source}")
    say()
    say(results_table(summary))
    if note:
        say(note)
    if lead and not plotted:
        say("note: no loss.png (matplotlib is not installed; pip install matplotlib to plot)")
    written = "metrics.jsonl, summary.json" + (", loss.png" if plotted else "")
    say(f"\nwrote {out}/{written}  (total {time.perf_counter() - t_start:.0f} s)")
    if args.world_size > 1:
        import torch.distributed as dist

        barrier()  # no rank tears down its process group while another still uses it
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
