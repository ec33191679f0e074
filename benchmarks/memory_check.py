"""Memory at scale on CPU: a ~444M-parameter LLaMA in pure bf16 (or fp32), measured against grassfx.cost.

Each method runs in two processes of its own (fresh heaps): one reads the peak RSS with
nothing watching the steps, the other counts tensor bytes (see :func:`worker` for why):

* ``dense``: ``torch.compile(model)`` + ``torch.optim.AdamW``; ``dense_compact``: the same
  with grassfx's pass ``compact_embedding_grad`` given to Inductor (what dense gains from
  it: the baseline with the same embedding backward);
* ``grassfx``: ``grassfx.compile(model, rank=r)`` (Inductor, refresh steps eager, the
  default; ``--refresh compiled``: through a compiled refresh graph) + ``grassfx.optim.AdamW``;
* ``grassfx_fused``: the same with ``grassfx.optim.AdamW(..., update_in_backward=True)``;
* ``grassfx_factored``, ``grassfx_factored_nomomentum``: ``grassfx.optim.AdamW(...,
  full_state="factored" / "factored_nomomentum")``: the embedding and head keep a factored
  second moment (:mod:`grassfx.optim.factored`);
* ``grassfx_muon``: ``grassfx.optim.Muon``: one moment per selected row (``grassfx
  train``'s row optimizer); ``grassfx_muon_factored``, ``grassfx_muon_factored_nomomentum``:
  the same with ``full_state="factored"`` / ``"factored_nomomentum"``; ``grassfx_muon_split``:
  the input embedding ``"factored_nomomentum"``, the head ``"factored"`` (parameter groups).

The model is a Hugging Face ``LlamaForCausalLM`` from the recipes' builder, shape h 2048,
ffn 5760, 6 layers, 16 heads, vocabulary 32000 (untied head): 444M parameters, cast to
bf16 (weights, gradients, optimizer state and activations all bf16, no autocast;
``--dtype fp32``: all fp32, for CPUs whose bf16 GEMMs are slow). Two
warm-up steps (compilation; step 0 is a refresh), then a window of three steps that
includes a refresh (``update_freq=3``: steps 2, 3 (refresh), 4).

Measured per method:

* **peak RSS above weights**: ``VmHWM`` at the end of the window (the high-water mark is
  reset by ``/proc/self/clear_refs`` just before it) minus ``VmRSS`` once the bf16 model
  exists. glibc is told to serve every allocation of 128 KiB or more by ``mmap``
  (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the RSS at once.
* **tensor peak above weights**: the tensors alive when the window starts besides the
  weights (optimizer state, grassfx's buffers and handles) plus the highest excess of
  live tensor bytes within any window step (``grassfx.debug.memory.track_memory``: every
  allocation and free, in order; the warm-up steps run under it too, so every block a
  window step frees was seen being allocated). This is what ``grassfx.cost`` models; the RSS also
  holds what compiling left behind (graphs, generated code, Python objects).
* **prediction**: ``grassfx.cost`` for the same shape, rank and tokens, the dtype's bytes everywhere:
  its total (``adamw`` for dense, else the method's own row; ``grassfx`` for ``grassfx_fused``, below) minus the model's weights (grassfx's
  gradient handles count above them, as measured).

Example:
    python benchmarks/memory_check.py --threads 2 --out benchmarks/results/memory_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.measure import proc_status_bytes as _status  # noqa: E402

# {method: (optimizer class name, its options)} of the grassfx runs
GRASSFX_RUNS = {
    "grassfx": ("AdamW", {}),
    "grassfx_fused": ("AdamW", dict(update_in_backward=True)),
    "grassfx_factored": ("AdamW", dict(full_state="factored")),
    "grassfx_factored_nomomentum": ("AdamW", dict(full_state="factored_nomomentum")),
    "grassfx_muon": ("Muon", {}),
    "grassfx_muon_factored": ("Muon", dict(full_state="factored")),
    "grassfx_muon_factored_nomomentum": ("Muon", dict(full_state="factored_nomomentum")),
    "grassfx_muon_split": ("Muon", dict(full_state="factored", embedding_full_state="factored_nomomentum")),
}
METHODS = ("dense", "dense_compact") + tuple(GRASSFX_RUNS)
# grassfx.cost's row for each method. Updates inside backward are predicted as grassfx's:
# the compiled backward graph returns every gradient at once, before any hook runs
# (grassfx.cost's docstring); its own row assumes an eager backward
PREDICTED_AS = dict({m: m for m in METHODS}, dense="adamw", dense_compact="adamw", grassfx_fused="grassfx")
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5760, num_hidden_layers=6,
             num_attention_heads=16)
UPDATE_FREQ = 3
WARMUP = 2
WINDOW = 3


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _set_shape(spec) -> None:
    """``--shape h,ffn,layers,heads,vocab`` (a small one for a quick check of the script)."""
    if spec:
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        SHAPE.update(zip(keys, (int(v) for v in spec.split(","))))


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _build(dtype: str, seed: int = 0):
    from recipes.presets import Preset, build_model

    preset = Preset("memory_check", rank=256, max_position_embeddings=512, **SHAPE)
    model = build_model(preset, seed=seed)
    return model.to(DTYPES[dtype])


def _compact_pass():
    """``grassfx.passes.compact_embedding_grad`` as an Inductor post-grad pass of a plain
    ``torch.compile`` (the ``dense_compact`` baseline)."""
    from grassfx import _compat
    from grassfx.passes import PassContext, compact_embedding_grad, settings

    class CompactPass(_compat.custom_graph_pass_base()):
        changes = 0  # sites rewritten, over every graph this pass saw

        def __call__(self, graph):
            self.changes += len(compact_embedding_grad(graph, PassContext("dense", "unknown", settings())).changes)

        def uuid(self):  # None: a graph compiled with this pass is never cached (nor served from a cache)
            return None

    return CompactPass()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _persistent(model, opt, weights: set) -> int:
    """Bytes of live tensors besides the weights: optimizer state, buffers, handles."""
    state = [v for s in opt.state.values() for v in s.values()]
    others = [p for p in model.parameters() if id(p) not in weights] + list(model.buffers())
    return _tensor_bytes(state + others)


def worker(method: str, rank: int, tokens: int, threads: int, dtype: str, refresh: str = "eager",
           measure: str = "rss") -> dict:
    """One method's warm-up and window in this process.

    ``measure="rss"``: nothing watches the steps; the window's peak RSS is read from
    ``VmHWM``. ``measure="tensors"``: every step, warm-up included, runs under
    ``track_memory``; the window's per-step tensor peaks are kept. Two processes, because
    each measurement disturbs the other: the profiler behind ``track_memory`` keeps a
    record of every op and allocation in the process's heap (52-69 MiB of RSS over a grassfx
    window with an eager refresh step), and PyTorch's CPU allocator reports the free of a
    block only if it was allocated while a profiler was recording, so a window whose
    blocks were made unwatched (a refresh freeing the momentum made at step 0) would count
    the new blocks and not the freed ones.
    """
    torch.set_num_threads(threads)
    import grassfx
    from grassfx.debug.memory import track_memory

    model = _build(dtype)
    gc.collect()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = {id(p) for p in model.parameters()}
    params = sum(p.numel() for p in model.parameters())
    rss_weights = _status("VmRSS")
    if method == "dense":
        runner, opt = torch.compile(model), torch.optim.AdamW(model.parameters(), lr=1e-4)
    elif method == "dense_compact":  # the same, with grassfx's embedding-gradient pass in Inductor
        compact = _compact_pass()
        runner = torch.compile(model, options={"post_grad_custom_pre_pass": compact})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        runner = grassfx.compile(model, rank=rank, update_freq=UPDATE_FREQ, refresh=refresh)
        name, options = GRASSFX_RUNS[method]
        options = dict(options)
        groups = runner.parameters()
        if "embedding_full_state" in options:  # the input embedding in a group of its own
            groups = grassfx.optim.embedding_groups(groups, model.get_input_embeddings().weight,
                                                    options.pop("embedding_full_state"))
        opt = getattr(grassfx.optim, name)(groups, lr=1e-4, **options)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SHAPE["vocab_size"], (1, tokens), generator=gen) for _ in range(WARMUP + WINDOW)]
    watch = track_memory if measure == "tensors" else contextlib.nullcontext

    def step(ids):
        with watch() as mem:
            runner(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return mem

    times = []
    for ids in batches[:WARMUP]:
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    gc.collect()
    out = dict(method=method, params=params, weight_bytes=weight_bytes, rss_weights=rss_weights)
    if measure == "tensors":
        out["persistent_tensor_bytes"] = _persistent(model if method.startswith("dense") else runner, opt, weights)
    else:
        out["rss_window_start"] = _status("VmRSS")
        _reset_peak()
    peaks = []
    for ids in batches[WARMUP:]:
        start = time.perf_counter()
        mem = step(ids)
        times.append(time.perf_counter() - start)
        if mem is not None:
            peaks.append(mem.peak)
    if method == "dense_compact":  # 0 would mean a missed match: no comparison
        out["compacted_sites"] = compact.changes
    if measure == "tensors":
        out.update(window_step_peaks=peaks, tensor_peak_above_weights=out["persistent_tensor_bytes"] + max(peaks),
                   step_seconds_watched=times)
    else:
        hwm = _status("VmHWM")
        out.update(hwm=hwm, rss_peak_above_weights=hwm - rss_weights, step_seconds=times)
    return out


def predictions(rank: int, tokens: int, nbytes: int) -> dict:
    """``{method: bytes above the weights}`` from grassfx.cost."""
    from grassfx.cost import LlamaShape, evaluate, memory

    shape = LlamaShape(SHAPE["vocab_size"], SHAPE["hidden_size"], SHAPE["intermediate_size"],
                       SHAPE["num_hidden_layers"], SHAPE["num_attention_heads"], SHAPE["num_attention_heads"])
    b = nbytes
    nums = evaluate(memory(shape), r=rank, b_w=b, b_g=b, b_s=b, b_a=b, T=tokens, S=tokens)
    weights = nums["adamw"]["weights"]  # the model's own: grassfx's handles count above them
    return {m: nums[PREDICTED_AS[m]]["total"] - weights for m in METHODS}, shape.params()


def _run_worker(method: str, args) -> dict:
    """Both measurements of ``method``, each in a fresh process (see :func:`worker`)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    result = {}
    for measure in ("rss", "tensors"):
        cmd = [sys.executable, __file__, "--worker", method, "--measure", measure, "--rank", str(args.rank),
               "--tokens", str(args.tokens), "--threads", str(args.threads), "--shape", args.shape or "",
               "--dtype", args.dtype, "--refresh", args.refresh]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{method} ({measure}) failed:\n{out.stderr[-4000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def report(results: list, predicted: dict) -> str:
    dense = next((r for r in results if r["method"] == "dense"), None)
    lines = ["| method | peak RSS above weights (MiB) | tensor peak above weights (MiB) | predicted (MiB) | "
             "tensor / predicted | RSS / predicted | RSS vs dense | step s (window) | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        pred = predicted[r["method"]]
        vs = f"{r['rss_peak_above_weights'] / dense['rss_peak_above_weights']:.2f}x" if dense else "-"
        window = ", ".join(f"{t:.1f}" for t in r["step_seconds"][WARMUP:])
        lines.append(f"| {r['method']} | {_mib(r['rss_peak_above_weights'])} | {_mib(r['tensor_peak_above_weights'])} | "
                     f"{_mib(pred)} | {r['tensor_peak_above_weights'] / pred:.2f} | "
                     f"{r['rss_peak_above_weights'] / pred:.2f} | {vs} | {window} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="tokens per step (batch 1 x this)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the raw numbers here (JSON)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                   help="every tensor's dtype (bf16: pure bf16; fp32 where bf16 GEMMs are slow)")
    p.add_argument("--shape", default="", help="h,ffn,layers,heads,vocab (default: the 444M model)")
    p.add_argument("--refresh", default="eager", choices=["eager", "compiled"],
                   help="grassfx.compile(refresh=): refresh steps eager (default) or through a compiled graph")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["rss", "tensors"], default="rss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _set_shape(args.shape)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rank, args.tokens, args.threads, args.dtype, args.refresh,
                                args.measure)))
        return 0
    predicted, params = predictions(args.rank, args.tokens, DTYPES[args.dtype].itemsize)
    start = time.perf_counter()
    results = [_run_worker(m, args) for m in args.methods]
    total = time.perf_counter() - start
    print(f"LLaMA h {SHAPE['hidden_size']}, ffn {SHAPE['intermediate_size']}, {SHAPE['num_hidden_layers']} layers, "
          f"vocab {SHAPE['vocab_size']} (untied): {results[0]['params'] / 1e6:.0f}M parameters "
          f"(grassfx.cost: {params / 1e6:.0f}M), pure {args.dtype}, rank {args.rank}, 1 x {args.tokens} tokens, "
          f"{args.threads} threads, grassfx refresh {args.refresh}; {platform.machine()}, torch {torch.__version__}")
    print(f"weights: {_mib(results[0]['weight_bytes'])} MiB; window = steps {WARMUP}..{WARMUP + WINDOW - 1} "
          f"(refresh at step {UPDATE_FREQ}); total {total:.0f} s")
    print(report(results, predicted))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(results=results, predicted=predicted, seconds=total,
                                                  refresh=args.refresh, dtype=args.dtype), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
