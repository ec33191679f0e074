"""What the optimizer's NaN/Inf check of one gradient costs, per reduction it could use.

``grassfx.optim.base.finite_flags`` checks every gradient before a step. For bf16/fp16 it
needs a reduction that cannot overflow and makes no float32 copy: the largest magnitude
(``vector_norm(t, inf)``) or the smallest and largest entries (``aminmax``, what it uses).
A float32 sum (what it uses for float32 gradients) is timed for reference.

Example:
    python benchmarks/finite_check.py --out benchmarks/results/finite_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[8192, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = torch.randn(*args.shape).to(dtype)
        ways = {"vector_norm_inf": lambda: torch.linalg.vector_norm(t, float("inf")),
                "aminmax": lambda: torch.aminmax(t),
                "sum_float32": lambda: t.sum(dtype=torch.float32)}
        rows[str(dtype).replace("torch.", "")] = {k: _time(f, args.repeats) * 1e3 for k, f in ways.items()}
    for dtype, ms in rows.items():
        print(f"{dtype:>9}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(shape=args.shape, ms=rows, threads=torch.get_num_threads(), torch=torch.__version__,
                           machine=platform.machine(), date=time.strftime("%Y-%m-%d")), f, indent=1)


if __name__ == "__main__":
    main()
