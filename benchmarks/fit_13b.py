"""The paper's 13B claim as a run: LLaMA-13B trained in pure bf16 under a 40 GB cap by
grassfx, where AdamW and GaLore run out of memory.

Each method runs in its own process (``--worker``), which:

1. builds Hugging Face's ``LlamaForCausalLM`` at the size asked for (``--size``, LLaMA sizes
   of ``grassfx.cost.LlamaShape.preset``, vocabulary 32000, untied head) on the meta
   device, casts it there and materializes it on the device (``to_empty``; weights drawn
   from N(0, 0.02), norms 1, the rotary tables rebuilt): no full-size copy ever exists
   elsewhere;
2. caps its own memory at ``--cap-gib`` (weights included): on CUDA with
   ``torch.cuda.set_per_process_memory_fraction``, on CPU with ``RLIMIT_DATA`` (every heap
   and anonymous mapping the process makes after it started counts);
3. trains ``--steps`` steps of ``--tokens`` tokens (a refresh at steps 0 and 2 for the
   projection methods: ``update_freq`` 2), each method in pure bf16 (no float32 master
   copy; grassfx with stochastic rounding of the updates).

and reports ``fits`` (every step ran; the peak) or ``out of memory`` with the phase that
failed (materializing, forward + backward, optimizer step).

Methods: ``adamw`` (``torch.optim.AdamW``, ``foreach=False``: no multi-tensor temporaries),
``galore`` (``galore_torch.GaLoreAdamW`` on the attention/MLP weights, rank ``--rank``,
"std" projection), ``grassfx`` (``grassfx.compile(model, rank=--rank)`` +
``grassfx.optim.Muon`` with the embedding's state factored without its first moment and
the head's with it: the memory mode of ``benchmarks/RESULTS.md`` section 4;
``--grassfx-optimizer adamw --full-state adam`` gives the paper's plain AdamW setting).
Each prediction is ``grassfx.cost``'s total for that method.

``--cap-gib`` defaults to 40 for 13B and, at other sizes, to the cap with the same
headroom over grassfx's predicted total as 40 GiB has at 13B (a proportional cap), so a
smaller model can stand in where no large GPU is at hand. ``--dtype fp32`` runs every
tensor in float32 (for CPUs whose bf16 matmuls are slow); the cap then scales with it.

Examples:
    python benchmarks/fit_13b.py --device cuda --out benchmarks/results/fit_13b_h200.json
    python benchmarks/fit_13b.py --size 1B --device cpu --dtype fp32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.measure import proc_status_bytes as _status  # noqa: E402

METHODS = ("adamw", "galore", "grassfx")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2**30
UPDATE_FREQ = 2
CLAIM_GIB = 40.0  # the paper's GPU


def _shape(args):
    from grassfx.cost import LlamaShape

    if args.shape:  # h,ffn,layers,heads,vocab: a small model for a quick check of the script
        h, i, layers, heads, vocab = (int(v) for v in args.shape.split(","))
        return LlamaShape(vocab, h, i, layers, heads, heads)
    return LlamaShape.preset(args.size)


def _grassfx_row(args) -> str:
    """grassfx.cost's method for the grassfx run asked for."""
    if args.grassfx_optimizer == "muon":
        return {"adam": "grassfx_muon", "factored": "grassfx_muon_factored",
                "factored_nomomentum": "grassfx_muon_factored_nomomentum", "split": "grassfx_muon_split"}[args.full_state]
    if args.full_state == "split":
        raise SystemExit("--full-state split is modelled for Muon rows only (grassfx.cost); pass "
                         "--grassfx-optimizer muon or another --full-state")
    return {"adam": "grassfx", "factored": "grassfx_factored",
            "factored_nomomentum": "grassfx_factored_nomomentum"}[args.full_state]


def predictions(args, shape=None) -> dict:
    """``{method: predicted total bytes}`` (grassfx.cost) at this size, rank, tokens and dtype."""
    from grassfx.cost import evaluate, memory

    shape = shape or _shape(args)
    b = DTYPES[args.dtype].itemsize
    nums = evaluate(memory(shape), r=args.rank, b_w=b, b_g=b, b_s=b, b_a=b, T=args.tokens, S=args.tokens)
    rows = {"adamw": "adamw", "galore": "galore", "grassfx": _grassfx_row(args)}
    return {m: nums[row]["total"] for m, row in rows.items()}


def default_cap_gib(args) -> float:
    """40 GiB at 13B; elsewhere the cap with the same headroom over grassfx's prediction."""
    from grassfx.cost import LlamaShape

    if not args.shape and args.size == "13B":
        return CLAIM_GIB
    at_13b = predictions(argparse.Namespace(**{**vars(args), "dtype": "bf16", "rank": 1024, "tokens": args.tokens}),
                         LlamaShape.preset("13B"))["grassfx"]
    return CLAIM_GIB * predictions(args)["grassfx"] / at_13b


# ----------------------------------------------------------------------------- the worker


def _cap(device: torch.device, cap_bytes: int) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    else:
        resource.setrlimit(resource.RLIMIT_DATA, (_status("VmData") + cap_bytes, resource.RLIM_INFINITY))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _materialize(shape, dtype, device):
    """The LLaMA on ``device`` in ``dtype``, built on the meta device first."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                         max_position_embeddings=4096, attention_dropout=0.0, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its tables are not parameters
    return model


def _optimizer(method: str, model, args):
    import grassfx

    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    if method == "galore":
        from recipes.optimizers import import_galore, lowrank_weights

        lowrank = {id(p) for _, p in lowrank_weights(model)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in lowrank]},
                  {"params": [p for p in model.parameters() if id(p) in lowrank], "rank": args.rank,
                   "update_proj_gap": UPDATE_FREQ, "scale": 0.25, "proj_type": "std"}]
        return model, import_galore()(groups, lr=1e-4, no_deprecation_warning=True)
    runner = grassfx.compile(model, rank=args.rank, update_freq=UPDATE_FREQ, backend=args.backend)
    full_state = "factored" if args.full_state == "split" else args.full_state
    groups = runner.parameters()
    if args.full_state == "split":  # the input embedding without its first moment
        groups = grassfx.optim.embedding_groups(groups, model.get_input_embeddings().weight, "factored_nomomentum")
    rounding = "stochastic" if args.dtype == "bf16" else "nearest"
    cls = grassfx.optim.Muon if args.grassfx_optimizer == "muon" else grassfx.optim.AdamW
    return runner, cls(groups, lr=1e-4, full_state=full_state, update_rounding=rounding)


def worker(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = _shape(args)
    cap = int(args.cap_gib * GIB)
    out = dict(method=method, cap_bytes=cap, phase="materialize", steps_done=0, step_seconds=[])
    # everything imported before the cap: the cap is for what the run allocates
    import transformers.models.llama.modeling_llama  # noqa: F401

    import grassfx.optim  # noqa: F401
    if method == "galore":
        from recipes.optimizers import import_galore

        import_galore()
    rss_start = _status("VmRSS")
    _cap(device, cap)
    try:
        model = _materialize(shape, DTYPES[args.dtype], device)
        out["params"] = sum(p.numel() for p in model.parameters())
        out["phase"] = "optimizer set-up"
        runner, opt = _optimizer(method, model, args)
        if method != "grassfx" and args.backend == "inductor":
            runner = torch.compile(runner)
        gen = torch.Generator().manual_seed(1)
        for step in range(args.steps):
            ids = torch.randint(0, shape.vocab, (1, args.tokens), generator=gen).to(device)
            start = time.perf_counter()
            out["phase"] = f"step {step}: forward + backward"
            runner(input_ids=ids, labels=ids).loss.backward()
            out["phase"] = f"step {step}: optimizer step"
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["step_seconds"].append(time.perf_counter() - start)
            out["steps_done"] = step + 1
        out["outcome"] = "fits"
    except Exception as exc:  # noqa: BLE001 - an out-of-memory error is the expected outcome of some methods
        if not _is_oom(exc):
            raise
        out["outcome"] = "out of memory"
        out["error"] = str(exc).splitlines()[0][:300]
    # CUDA: the allocator's peak; CPU: the process's peak RSS above what it held when capped
    out["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM") - rss_start
    return out


# ----------------------------------------------------------------------------- the driver


def _run(method: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", method] + _forward(args)
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        # killed outright (the kernel's OOM killer on CPU) or an error that is not memory
        return dict(method=method, outcome=f"process failed (exit {res.returncode})", error=res.stderr[-2000:],
                    wall_seconds=time.perf_counter() - start)
    out = json.loads(lines[-1])
    out["wall_seconds"] = time.perf_counter() - start
    return out


def _forward(args) -> list:
    return ["--size", args.size, "--shape", args.shape, "--rank", str(args.rank), "--tokens", str(args.tokens),
            "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
            "--backend", args.backend, "--cap-gib", repr(args.cap_gib), "--grassfx-optimizer", args.grassfx_optimizer,
            "--full-state", args.full_state]


def report(results: list, predicted: dict, cap_gib: float) -> str:
    lines = [f"| method | predicted (GiB) | outcome under {cap_gib:.2f} GiB | steps run | peak (GiB) | step s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r['peak_bytes'] / GIB:.2f}" if "peak_bytes" in r else "-"
        outcome = r["outcome"] + (f" ({r['phase']})" if r["outcome"] == "out of memory" else "")
        steps = ", ".join(f"{t:.1f}" for t in r.get("step_seconds", [])) or "-"
        lines.append(f"| {r['method']} | {predicted[r['method']] / GIB:.2f} | {outcome} | {r.get('steps_done', '-')} | "
                     f"{peak} | {steps} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="13B", choices=["60M", "350M", "1B", "7B", "13B"])
    p.add_argument("--shape", default="", help="h,ffn,layers,heads,vocab instead of --size (a quick check)")
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=256, help="tokens per step (batch 1)")
    p.add_argument("--steps", type=int, default=3, help="training steps (refreshes at steps 0 and 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="inductor: torch.compile for AdamW and GaLore, grassfx's Inductor backend; eager: nothing compiled")
    p.add_argument("--cap-gib", type=float, default=None,
                   help="memory cap, weights included (default: 40 at 13B, proportional elsewhere)")
    p.add_argument("--grassfx-optimizer", default="muon", choices=["muon", "adamw"])
    p.add_argument("--full-state", default="split", choices=["adam", "factored", "factored_nomomentum", "split"],
                   help="grassfx: state of the embedding and head (split: the embedding factored without its first "
                        "moment, the head factored with it)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=None, help="write the raw numbers here (JSON)")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cap_gib is None:
        args.cap_gib = default_cap_gib(args)
    if args.cap_gib <= 0:
        p.error(f"--cap-gib must be positive, got {args.cap_gib}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    predicted = predictions(args)
    start = time.perf_counter()
    results = [_run(m, args) for m in args.methods]
    total = time.perf_counter() - start
    shape = _shape(args)
    name = f"h {shape.hidden}, ffn {shape.inter}, {shape.layers} layers" if args.shape else f"LLaMA-{args.size}"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.machine()
    print(f"{name} ({shape.params() / 1e9:.2f}B parameters), pure {args.dtype}, rank {args.rank}, 1 x {args.tokens} "
          f"tokens, {args.steps} steps, cap {args.cap_gib:.2f} GiB, backend {args.backend}, grassfx "
          f"{args.grassfx_optimizer} / {args.full_state}; {device}, torch {torch.__version__}; total {total:.0f} s")
    print(report(results, predicted, args.cap_gib))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), predicted=predicted, results=results,
                                                  seconds=total), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
