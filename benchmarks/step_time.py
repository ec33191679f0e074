"""Step time and compile time: dense torch.compile + AdamW against grassfx, same process.

Two models: a LLaMA-shaped causal LM (Hugging Face LlamaForCausalLM from a config) and an
MLP-heavy residual stack. For each, the dense baseline is ``torch.compile(model)`` with
``torch.optim.AdamW(fused=True)`` (the fused kernel: the baseline at its fastest);
grassfx is ``grassfx.compile(model, rank=r)`` (Inductor; refresh steps eager, the
default) with ``grassfx.optim.AdamW`` (eager step, the default; ``--opt-compiled`` compiles
it). Both start from the same weights and see the same batches. Reported per model:
compile time (the steps during which a graph compiled, beyond a steady step), median step
time after warm-up, their ratio, the FLOP-limit ratio for the projected GEMMs, the
refresh step's time, optimizer-state bytes, and on CUDA peak memory.

FLOP-limit speedup: each projected GEMM costs fwd + dgrad + wgrad = 3 units dense and
2 + r/m with grassfx; everything else (attention, norms, optimizer) is counted as equal
on both sides from the measured profile-free model FLOPs (see ``flop_limit``).

Example:
    python benchmarks/step_time.py --model both --steps 6
    python benchmarks/step_time.py --device cuda --dtype bf16 --model llama
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

import grassfx
from grassfx import _compat


class MLPStack(nn.Module):
    """Residual blocks of LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, d=1024, inter=4096, layers=4):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, inter), nn.GELU(), nn.Linear(inter, d)) for _ in range(layers)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x.float().pow(2).mean()


def llama_config(args):
    """The LLaMA shape asked for: heads of 64, untied head, no dropout."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                       attention_dropout=0.0, tie_word_embeddings=False)


def build(args):
    torch.manual_seed(0)
    if args.model == "llama":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llama_config(args))
        g = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(4):
            ids = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq), generator=g)
            batches.append({"input_ids": ids, "labels": ids})
        return model, batches, lambda m, b: m(**b).loss
    model = MLPStack(args.hidden, args.inter, args.layers)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.tokens, args.hidden, generator=g) for _ in range(4)]
    return model, batches, lambda m, b: m(b)


def projected_linears(model):
    """Every Linear layer, with whether grassfx projects it by default (its own target discovery)."""
    from grassfx.instrument.targets import find_targets

    names = {t.module_name for t in find_targets(model)}
    return [(n, m, n in names) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def flop_limit(model, tokens, rank):
    """Upper bound of the speedup if only projected wgrad GEMMs shrink (Linear FLOPs only).

    Every Linear counts fwd + dgrad + wgrad; a projected one's wgrad shrinks by r/max(m, n),
    an unprojected one (e.g. the LM head) keeps all three.
    """
    dense = grass = 0.0
    for _, lin, projected in projected_linears(model):
        m, n = lin.weight.shape
        unit = 2 * tokens * m * n
        r_over = min(rank, max(m, n)) / max(m, n) if projected else 1.0
        dense += 3 * unit
        grass += (2 + r_over) * unit
    return dense / grass


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def state_bytes(opt):
    total = 0
    for st in opt.state.values():
        total += sum(v.nbytes for v in st.values() if torch.is_tensor(v))
    return total


def run(label, model, opt, batches, loss_fn, args, warm):
    times, compiled, device = [], [], args.device
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warm + args.steps):
        b = batches[i % len(batches)]
        if device == "cuda":
            b = {k: v.cuda() for k, v in b.items()} if isinstance(b, dict) else b.cuda()
        sync(device)
        graphs, t0 = _compat.compiled_graph_count(), time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        compiled.append(_compat.compiled_graph_count() != graphs)
        print(f"  {label} step {i}: {times[-1]:.3f}s loss {loss.item():.4f}", file=sys.stderr, flush=True)
    median = statistics.median(times[warm:])
    out = {"first_step_s": times[0], "median_step_s": median, "steps_s": times, "compiled": compiled,
           "compile_s": sum(t - median for t, c in zip(times, compiled) if c),
           "optimizer_state_bytes": state_bytes(opt)}
    if device == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    return out


def bench(args):
    model, batches, loss_fn = build(args)  # on the CPU; each run moves its own copy
    if args.dtype == "bf16" and args.pure_bf16:
        model = model.to(torch.bfloat16)
    tokens = args.tokens
    result = {"model": args.model, "flop_limit_speedup": flop_limit(model, tokens, args.rank)}
    base = copy.deepcopy(model).to(args.device)

    torch._dynamo.reset()
    dense = torch.compile(base)
    dopt = torch.optim.AdamW(base.parameters(), lr=1e-4, fused=True)  # the baseline at its fastest
    result["dense"] = run("dense", dense, dopt, batches, loss_fn, args, warm=args.warmup)
    del dense, dopt, base
    torch._dynamo.reset()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    model = model.to(args.device)

    gmodel = grassfx.compile(model, rank=args.rank, update_freq=args.update_freq, selection="top_r")
    gopt = grassfx.optim.AdamW(gmodel.parameters(), lr=1e-4, compiled=args.opt_compiled)
    result["grassfx"] = run("grassfx", gmodel, gopt, batches, loss_fn, args, warm=args.warmup + 1)
    g = result["grassfx"]
    g["refresh_step_s"] = g["steps_s"][0]  # step 0 is a refresh (eager by default)
    g["second_step_s"] = g["steps_s"][1]  # compiles the normal training graph
    g["rewritten"] = sum(1 for c in gmodel.compile_report.changes() if c.action == "rewrote")
    g["projected"] = len(gmodel.sites)
    g["frames"] = gmodel.compile_report.frames
    result["speedup"] = result["dense"]["median_step_s"] / g["median_step_s"]
    result["fraction_of_flop_limit"] = result["speedup"] / result["flop_limit_speedup"]
    result["compile_ratio"] = g["compile_s"] / max(result["dense"]["compile_s"], 1e-9)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["llama", "mlp", "both"], default="both")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--update-freq", type=int, default=200)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--pure-bf16", action="store_true", help="cast weights to bf16 (else autocast)")
    p.add_argument("--opt-compiled", action="store_true",
                   help="compile grassfx's optimizer step (default: eager, the library default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
               "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "runs": []}
    for name in (["llama", "mlp"] if args.model == "both" else [args.model]):
        args.model = name
        r = bench(args)
        results["runs"].append(r)
        d, g = r["dense"], r["grassfx"]
        print(f"{name}: dense {d['median_step_s']:.3f}s/step, grassfx {g['median_step_s']:.3f}s/step, "
              f"speedup {r['speedup']:.2f}x (FLOP limit {r['flop_limit_speedup']:.2f}x, "
              f"{100 * r['fraction_of_flop_limit']:.0f}% of it); compile dense {d['compile_s']:.1f}s, "
              f"grassfx {g['compile_s']:.1f}s ({r['compile_ratio']:.2f}x); optimizer state "
              f"{d['optimizer_state_bytes'] / 2**20:.1f} MiB -> {g['optimizer_state_bytes'] / 2**20:.1f} MiB; "
              f"rewritten {g['rewritten']}/{g['projected']}", flush=True)
        if args.device == "cuda":
            print(f"  peak memory dense {d['peak_mem_bytes'] / 2**30:.2f} GiB, grassfx {g['peak_mem_bytes'] / 2**30:.2f} GiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
