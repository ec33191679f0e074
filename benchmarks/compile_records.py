"""What recording the passes costs: compile time and retained memory, record off vs on.

Compiles the first two training steps (the refresh graph, then the normal graph) of a
small Llama with ``grassfx.compile(..., record=False)`` (the default since records became
opt-in) and ``record=True`` (node snapshots before/after each pass, as ``grassfx.diff``
needs), alternating the two in one process, with Inductor's and AOTAutograd's caches off
so every graph really compiles. Reports per run: wall time of the two steps, time spent
inside the pass pipeline (where recording happens), and the bytes the model's compile
report keeps alive afterwards (a recursive ``sys.getsizeof`` walk: strings, tuples,
dataclasses; tensors are not involved).

The same script measures the tree before records became opt-in (always on, code text
and op lists per pass, pass results holding their graphs) when that tree is imported
instead, for comparison.

Example:
    python benchmarks/compile_records.py --backend aot_eager --repeats 3
    git archive 7f42140 | tar -x -C /tmp/before && ln -s ../passes /tmp/before/grassfx/passes
    PYTHONPATH=/tmp/before python benchmarks/compile_records.py --backend aot_eager --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import types

import torch
from compile_breakdown import build  # the same small Llama (this folder is on sys.path when run as a script)

import grassfx

try:  # this tree
    import grassfx.compiler.backend as backend_mod
    from grassfx._compat import compile_caches_off
    ALWAYS_ON = False
except ImportError:  # the tree before records became opt-in (commit 7f42140), for comparison
    import grassfx.backend as backend_mod
    from grassfx.debug import _fresh_compile as compile_caches_off
    ALWAYS_ON = True


def _opaque(obj) -> bool:
    """Shared or foreign objects a report may point at but does not own."""
    return isinstance(obj, (type, types.ModuleType, torch.Tensor, torch.nn.Module)) or callable(obj)


def deep_size(root) -> int:
    """Bytes of ``root`` and every object it reaches (each once), stopping at tensors,
    modules, types and callables (ops, functions)."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or _opaque(obj):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


class PipelineClock:
    """Seconds spent inside grassfx's pass pipeline (the backend's calls to run_pipeline)."""

    def __init__(self):
        self.seconds = 0.0
        self._inner = backend_mod.run_pipeline

    def __enter__(self):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self._inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        backend_mod.run_pipeline = timed
        return self

    def __exit__(self, *exc):
        backend_mod.run_pipeline = self._inner


def one_run(record: bool, backend: str, layers: int) -> dict:
    torch._dynamo.reset()
    gc.collect()
    net, batch = build(layers, intermediate=688, seq=128)
    options = {} if ALWAYS_ON else {"record": record}
    model = grassfx.compile(net, rank=32, backend=backend, **options)
    with compile_caches_off(), PipelineClock() as clock:
        t0 = time.perf_counter()
        for _ in range(2):  # refresh step, then the normal step
            model(**batch).loss.backward()
            for p in model.parameters():
                p.grad = None
            model.grass_step.add_(1)
        seconds = time.perf_counter() - t0
    if ALWAYS_ON:
        report = model.compile_stats
        return {"record": "always", "compile_s": round(seconds, 2), "pipeline_s": round(clock.seconds, 3),
                "graphs": len(report.graphs), "report_bytes": deep_size(report), "records_bytes": deep_size(report)}
    report = model.compile_report
    return {"record": record, "compile_s": round(seconds, 2), "pipeline_s": round(clock.seconds, 3),
            "graphs": len(report.graphs), "report_bytes": deep_size(report),
            "records_bytes": deep_size(report.records) if report.records is not None else 0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="aot_eager", choices=["aot_eager", "inductor"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    one_run(False, args.backend, 1)  # warm-up: imports, first Dynamo use
    modes = ("always",) if ALWAYS_ON else (False, True)
    runs = [one_run(record, args.backend, args.layers) for _ in range(args.repeats) for record in modes]
    summary = {}
    for record in modes:
        mine = [r for r in runs if r["record"] == record]
        summary[{False: "off", True: "on"}.get(record, record)] = {
            k: statistics.median(r[k] for r in mine) for k in ("compile_s", "pipeline_s", "report_bytes", "records_bytes")}
    print(json.dumps({"backend": args.backend, "layers": args.layers, "torch": torch.__version__,
                      "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                      "runs": runs, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
