"""Where a training step of the demo's model goes: dense ``torch.compile`` + fused AdamW
against grassfx with Muon rows (the demo's grass run), same process, interleaved.

The tiny LLaMA preset (5.3M parameters, tied 8192 vocabulary), 4 x 128 tokens, rank 64,
the demo's grass settings (``update_freq`` 12; ``scale``, ``moments`` and ``explore`` from
``grassfx.recipes.options.RECOMMENDED``; Muon).
Each round times ``--steps`` steps of each side in turn (machine drift hits both), and
reports medians over rounds of:

* forward + backward of a normal step (dense: every step) and of a refresh step (grassfx,
  once per ``update_freq`` steps; compiled, as ``grassfx train`` runs them, or eager with
  ``--refresh eager``, the library's default);
* the optimizer step (``step()`` + ``zero_grad()``);
* Newton-Schulz alone on grassfx's momenta: batched (``orthogonalize_many``) and one
  matrix at a time.

Like ``grassfx train``, it has glibc keep freed memory (``--malloc keep``): otherwise page
faults of re-allocated activations add a few ms per step, in phases (README, "Speed").

It also counts each side's minor page faults per step. ``--refresh eager`` and
``--muon-compiled`` time those grassfx options.

Example:
    python benchmarks/step_breakdown.py --rounds 3 --out benchmarks/results/step_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from grassfx.recipes.presets import get_preset

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**get_preset("tiny").config_kwargs()))


def _timed_step(model, opt, ids):
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=36, help="steps per side per round (3 refresh windows)")
    p.add_argument("--update-freq", type=int, default=12)
    p.add_argument("--malloc", default="keep", choices=["keep", "system"],
                   help="glibc keeps freed memory (as grassfx train does by default) or its own thresholds")
    p.add_argument("--refresh", default="compiled", choices=["eager", "compiled"],
                   help="grassfx's refresh steps (grassfx.compile(refresh=))")
    p.add_argument("--muon-compiled", action="store_true", help="grassfx.optim.Muon(compiled=True)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.malloc == "keep":
        from grassfx.recipes.measure import keep_freed_memory

        keep_freed_memory()

    import grassfx
    from grassfx.optim.muon import orthogonalize_many
    from grassfx.recipes.options import RECOMMENDED

    dense = torch.compile(_model())
    dopt = torch.optim.AdamW(dense.parameters(), lr=1e-3, fused=True)
    rec = RECOMMENDED["grass"]
    grass = grassfx.compile(_model(), rank=64, update_freq=args.update_freq, scale=rec["scale"],
                            moments=rec["moments"], explore=rec["explore"], refresh=args.refresh)
    gopt = grassfx.optim.Muon(grass.parameters(), lr=1e-3, compiled=args.muon_compiled)
    gen = torch.Generator().manual_seed(0)
    batch = lambda: torch.randint(0, 8192, (4, 128), generator=gen)  # noqa: E731
    for _ in range(args.update_freq + 2):  # compile, first refresh, optimizer state
        _timed_step(dense, dopt, batch())
        _timed_step(grass, gopt, batch())
    done = args.update_freq + 2

    rows = {k: [] for k in ("dense_fwd_bwd", "dense_opt", "grass_fwd_bwd", "grass_refresh_fwd_bwd", "grass_opt",
                            "grass_refresh_opt", "ns_batched", "ns_one_at_a_time")}
    faults = {"dense": [], "grass": []}  # minor page faults per step (ru_minflt)
    for _ in range(args.rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        d = [_timed_step(dense, dopt, batch()) for _ in range(args.steps)]
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        g = []
        for _ in range(args.steps):
            refresh = done % args.update_freq == 0
            g.append((refresh, *_timed_step(grass, gopt, batch())))
            done += 1
        faults["dense"].append((f1 - f0) / args.steps)
        faults["grass"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f1) / args.steps)
        rows["dense_fwd_bwd"].append(statistics.median(a for a, _ in d))
        rows["dense_opt"].append(statistics.median(b for _, b in d))
        rows["grass_fwd_bwd"].append(statistics.median(a for r, a, _ in g if not r))
        rows["grass_opt"].append(statistics.median(b for r, _, b in g if not r))
        rows["grass_refresh_fwd_bwd"].append(statistics.median(a for r, a, _ in g if r))
        rows["grass_refresh_opt"].append(statistics.median(b for r, _, b in g if r))
        momenta = [gopt.state[s.handle]["momentum_buffer"] for s in grass.sites]
        for key, cap in (("ns_batched", None), ("ns_one_at_a_time", 1)):
            kw = {} if cap is None else {"max_elements": cap}
            t0 = time.perf_counter()
            for _ in range(10):
                orthogonalize_many(momenta, **kw)
            rows[key].append((time.perf_counter() - t0) / 10)
    table = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    refresh_extra = (table["grass_refresh_fwd_bwd"] + table["grass_refresh_opt"]
                     - table["grass_fwd_bwd"] - table["grass_opt"])
    table["grass_refresh_extra_per_step"] = refresh_extra / args.update_freq
    table["dense_step"] = table["dense_fwd_bwd"] + table["dense_opt"]
    table["grass_step_mean"] = table["grass_fwd_bwd"] + table["grass_opt"] + table["grass_refresh_extra_per_step"]
    for k, v in table.items():
        print(f"{k:>30}: {v:8.1f} ms")
    print(f"grass / dense mean step time: {table['grass_step_mean'] / table['dense_step']:.3f} "
          f"({len(grass.sites)} projected weights; {torch.get_num_threads()} threads)")
    print("minor page faults per step, per round: " + "; ".join(
        f"{k} " + " ".join(f"{x:.0f}" for x in v) for k, v in faults.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), ms=table, rounds_ms={k: [x * 1e3 for x in v] for k, v in rows.items()},
                           minor_faults_per_step=faults,
                           threads=torch.get_num_threads(), torch=torch.__version__,
                           date=time.strftime("%Y-%m-%d")), f, indent=1)


if __name__ == "__main__":
    main()
