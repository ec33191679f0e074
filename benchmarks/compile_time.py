"""Compile time of a Hugging Face Llama training step: grassfx vs plain ``torch.compile``.

Each measurement runs in a fresh process with its own Inductor cache directory:

* *cold*: an empty cache directory (nothing to reuse: Dynamo, AOTAutograd and Inductor
  all run);
* *warm*: a second process on the directory the cold one filled (Inductor's FX graph
  cache and the AOTAutograd cache serve what they can; Dynamo still traces).

Compile time of a run = the time of the steps during which a graph was compiled, minus
as many steady steps (the median of the steps after them). Dense = ``torch.compile(model)``
+ ``torch.optim.AdamW(fused=True)``; grassfx = ``grassfx.compile(model, rank=...)`` +
``grassfx.optim.AdamW``, in the configurations given by ``--variants``: refresh steps
eager (the default) or compiled, optimizer step eager (the default) or compiled. Each
cold run also records how many C++ files Inductor generated (and compiled) into its
cache directory, and their lines. ``--base PATH`` adds the variant ``grassfx@base``: the
``grassfx`` variant with the library imported from another checkout (e.g. a ``git
worktree`` of an older commit), interleaved with the others, for before/after
comparisons within one run.

The ``train_*`` variants measure the main job instead: ``grassfx train``'s model and
optimizer at the demo's run shape (tiny preset, 4 x 128 tokens, a refresh every 12 steps),
``TRAIN_STEPS`` steps: ``train_adamw`` (its baseline: AdamW, ``torch.compile``) against
``train_grass`` (its defaults: Muon rows, refresh steps eager) and
``train_grass_refresh_compiled`` (``--refresh compiled``: a second graph for refresh
steps). For grass they also report what refresh steps cost over a run: a refresh step's
time beyond a steady step, as a share of its window's steps.

Example:
    python benchmarks/compile_time.py --repeats 3 --out benchmarks/results/compile_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "dense": {},
    # the main job (``grassfx train``, its defaults, the demo's run shape): AdamW through
    # torch.compile, against grass (Muon rows; refresh steps eager, the default, or compiled)
    "train_adamw": dict(train=["--optimizer", "adamw"]),
    "train_grass": dict(train=["--optimizer", "grass"]),
    "train_grass_refresh_compiled": dict(train=["--optimizer", "grass", "--refresh", "compiled"]),
    "grassfx": dict(refresh="eager", opt_compiled=False),
    "grassfx_refresh_compiled": dict(refresh="compiled", opt_compiled=False),
    "grassfx_opt_compiled": dict(refresh="eager", opt_compiled=True),
    "grassfx_both_compiled": dict(refresh="compiled", opt_compiled=True),
}


def _build(layers: int, hidden: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


# the main job's run shape: the demo's (``grassfx train --demo``: tiny preset, 300 steps of
# 4 x 128 tokens, so a refresh every 12 steps); TRAIN_STEPS of them are run, two refreshes
TRAIN_ARGS = ["--preset", "tiny", "--steps", "300", "--batch-size", "4", "--seq-len", "128", "--no-progress"]
TRAIN_STEPS = 26


def measure_train(variant: str) -> dict:
    """One process, a main-job variant: ``grassfx train``'s model and optimizer, its steps timed."""
    import torch

    from grassfx import _compat
    from grassfx.recipes import data as data_mod
    from grassfx.recipes import options, presets, train

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    args = options.parse_args(TRAIN_ARGS + VARIANTS[variant]["train"])
    corpus = data_mod.load_corpus(args.data, vocab_size=presets.get_preset(args.preset).vocab_size)
    spec = options.run_specs(args)[0]
    device = torch.device("cpu")
    model, opt, sched, _ = train.build_run(spec, corpus, args, device)
    sampler = data_mod.BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=1)
    every = train.refresh_interval(spec, args)
    times, compiled = [], []
    for _ in range(TRAIN_STEPS):
        before = _compat.compiled_graph_count()
        _, dt, _ = train.timed_step(model, opt, sched, next(sampler), device)
        times.append(dt)
        compiled.append(_compat.compiled_graph_count() != before)
    refresh = [bool(every) and i % every == 0 for i in range(TRAIN_STEPS)]
    row = dict(variant=variant, step_s=times, compiled=compiled, refresh=refresh, refresh_every=every)
    return dict(row, **step_costs(row), phases_s=_phases(),
                grassfx_from=os.path.dirname(os.path.dirname(_compat.__file__)))


def step_costs(row: dict) -> dict:
    """Steady step, compile time and (grass) the cost of refresh steps of one main-job process.

    ``refresh_extra_s``: each refresh step's time beyond a steady step, for refresh steps
    that compiled nothing, the first step of the process left out (it also warms the
    allocator up); ``refresh_share``: their mean over the steps of a window (``refresh_every``
    steady steps), i.e. what refresh steps add to the time of a run.
    """
    times, compiled, refresh, every = row["step_s"], row["compiled"], row["refresh"], row["refresh_every"]
    later = [i > 0 for i in range(len(times))]
    steady = statistics.median(t for t, c, r, k in zip(times, compiled, refresh, later) if k and not c and not r)
    compile_s = sum(t - steady for t, c in zip(times, compiled) if c)
    extra = [t - steady for t, c, r, k in zip(times, compiled, refresh, later) if k and r and not c]
    share = statistics.mean(extra) / (every * steady) if extra else None
    return dict(steady_s=steady, compile_s=compile_s, refresh_extra_s=extra, refresh_share=share)


def measure(variant: str, layers: int, hidden: int, steps: int, rank: int) -> dict:
    """One process, one variant: per-step seconds and which steps compiled."""
    import torch

    import grassfx
    from grassfx import _compat

    variant = variant.split("@")[0]  # grassfx@base: the same variant, another checkout
    if "train" in VARIANTS[variant]:
        return measure_train(variant)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = _build(layers, hidden)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (2, 128), generator=g) for _ in range(steps)]
    if variant == "dense":
        model = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        cfg = VARIANTS[variant]
        model = grassfx.compile(model, rank=rank, update_freq=1000, refresh=cfg["refresh"])
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-4, compiled=cfg["opt_compiled"])
    times, compiled = [], []
    for ids in batches:
        before, t0 = _compat.compiled_graph_count(), time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        compiled.append(_compat.compiled_graph_count() != before)
    steady = statistics.median(t for t, c in zip(times, compiled) if not c)
    compile_s = sum(t - steady for t, c in zip(times, compiled) if c)
    return dict(variant=variant, step_s=times, compiled=compiled, steady_s=steady, compile_s=compile_s,
                phases_s=_phases(), grassfx_from=os.path.dirname(os.path.dirname(grassfx.__file__)))


# Dynamo's timers (``torch._dynamo.utils.compile_times``) for the phases this benchmark
# reports: Dynamo's bytecode tracing, AOTAutograd's joint trace, Inductor's code
# generation and its compilation of the generated code (C++ on CPU)
PHASES = ("bytecode_tracing", "aot_trace_joint_graph", "GraphLowering.codegen", "compile_file")


def _phases() -> dict:
    from torch._dynamo.utils import compile_times

    headers, values = compile_times(repr="csv", aggregate=True)
    return {name: float(value) for name, value in zip(headers, values) if name in PHASES}


def _generated_cpp(cache_dir: str) -> dict:
    """The C++ sources Inductor generated and compiled into an (empty before) cache directory."""
    files = [os.path.join(d, f) for d, _, names in os.walk(cache_dir) for f in names if f.endswith(".cpp")]
    lines = 0
    for path in files:
        with open(path, errors="replace") as f:
            lines += sum(1 for _ in f)
    return {"files": len(files), "lines": lines}


def _shim(tree: str, into: str) -> str:
    """A folder from which ``import grassfx`` loads the checkout ``tree``, laid out as the
    installed package (``passes/`` and ``recipes/`` are its subpackages)."""
    pkg = os.path.join(into, "grassfx")
    os.makedirs(pkg)
    for name in os.listdir(os.path.join(tree, "grassfx")):
        os.symlink(os.path.join(tree, "grassfx", name), os.path.join(pkg, name))
    for sub in ("passes", "recipes"):
        os.symlink(os.path.join(tree, sub), os.path.join(pkg, sub))
    return into


def _child(variant, cache_dir, args) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    if variant.endswith("@base"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.base_shim, env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", variant, "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--steps", str(args.steps), "--rank", str(args.rank)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--base", default=None, help="another checkout: adds the variant grassfx@base")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.layers, args.hidden, args.steps, args.rank)))
        return
    if args.base:
        if not os.path.isdir(os.path.join(args.base, "grassfx")) or not os.path.isdir(os.path.join(args.base, "passes")):
            p.error(f"--base {args.base}: not a grassfx checkout (needs grassfx/ and passes/)")
        args.variants = args.variants + ["grassfx@base"]
        shim_dir = tempfile.TemporaryDirectory(prefix="grassfx-base-")
        args.base_shim = _shim(os.path.abspath(args.base), shim_dir.name)
    runs = []
    for repeat in range(args.repeats):  # variants interleaved: drifts in machine load hit all alike
        for variant in args.variants:
            with tempfile.TemporaryDirectory(prefix="grassfx-cc-") as cache:
                cold = _child(variant, cache, args)
                cold["generated_cpp"] = _generated_cpp(cache)
                warm = _child(variant, cache, args)
            runs.append(dict(variant=variant, repeat=repeat, cold=cold, warm=warm))
            cpp = cold["generated_cpp"]
            print(f"{variant:>28} repeat {repeat}: cold {cold['compile_s']:.1f} s, warm {warm['compile_s']:.1f} s, "
                  f"steady {cold['steady_s']:.3f} s/step; {cpp['files']} C++ files, {cpp['lines']} lines; cold phases "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in cold["phases_s"].items()), flush=True)
    table = {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        if variant.endswith("@base"):
            assert all(r["cold"]["grassfx_from"] == args.base_shim for r in mine), "the base variant imported another grassfx"
        table[variant] = {kind: statistics.median(r[kind]["compile_s"] for r in mine) for kind in ("cold", "warm")}
        table[variant]["steady_s"] = statistics.median(r["cold"]["steady_s"] for r in mine)
        shares = [r[kind]["refresh_share"] for r in mine for kind in ("cold", "warm")
                  if r[kind].get("refresh_share") is not None]
        if shares:  # refresh steps' cost over a run, from every process of the variant
            table[variant]["refresh_share"] = statistics.median(shares)
    print("\nmedians:")
    for variant, row in table.items():
        base = "train_adamw" if "train" in VARIANTS[variant.split("@")[0]] else "dense"
        ref = table.get(base)
        ratio = (f"  ({row['cold'] / ref['cold']:.2f}x cold, {row['warm'] / ref['warm']:.2f}x warm vs {base})"
                 if ref and variant != base else "")
        share = f", refresh steps {100 * row['refresh_share']:.1f}% of step time" if "refresh_share" in row else ""
        print(f"{variant:>28}: cold {row['cold']:.1f} s, warm {row['warm']:.1f} s, steady {row['steady_s']:.3f} s/step"
              f"{share}{ratio}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), table=table, runs=runs, threads=os.environ.get("THREADS", "2"),
                           date=time.strftime("%Y-%m-%d")), f, indent=1)


if __name__ == "__main__":
    main()
