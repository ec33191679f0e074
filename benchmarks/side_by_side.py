"""Step time of two checkouts of grassfx, side by side: ``step_time.py`` run in turns.

Each repeat runs ``benchmarks/step_time.py`` (of this checkout) once with the library
imported from ``--base`` and once from this checkout, alternating which goes first, each in
a fresh process; the median over repeats of each side's median step time and compile time
is reported, for grassfx and for the dense baseline (the same code on both sides: the
noise floor).

Example:
    THREADS=1 taskset -c 1 python benchmarks/side_by_side.py --base ../floor-base --repeats 3 \
        --out benchmarks/results/x.json -- --model llama --threads 1 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(tree: Path, step_args: list) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, str(HERE / "step_time.py"), *step_args, "--out", out], env=env, check=True)
    with open(out) as f:
        runs = json.load(f)["runs"]
    os.unlink(out)
    return {r["model"] if "model" in r else str(i): r for i, r in enumerate(runs)}


def _summarize(samples: dict, trees: dict, args) -> dict:
    summary = {}
    for side, runs in samples.items():
        for model in runs[0]:
            for who in ("dense", "grassfx"):
                for key in ("median_step_s", "compile_s"):
                    values = [r[model][who][key] for r in runs]
                    summary.setdefault(model, {}).setdefault(f"{who}_{key}", {})[side] = {
                        "median": statistics.median(values), "values": values}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "argv": sys.argv[1:], "base": str(trees["base"]), "repeats_done": len(samples["base"]),
              "summary": summary}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the other checkout (e.g. a git worktree of the starting commit)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("step_args", nargs=argparse.REMAINDER, help="after --: arguments for step_time.py")
    args = p.parse_args(argv)
    step_args = [a for a in args.step_args if a != "--"]
    trees = {"base": Path(args.base).resolve(), "this": ROOT}
    samples = {"base": [], "this": []}
    result = {}
    for i in range(args.repeats):
        order = ["base", "this"] if i % 2 == 0 else ["this", "base"]
        for side in order:
            samples[side].append(_run(trees[side], step_args))
            print(f"repeat {i + 1}/{args.repeats}: {side} done", flush=True)
        result = _summarize(samples, trees, args)  # written after every repeat: a cut run keeps its data
    for model, rows in result["summary"].items():
        for key, sides in rows.items():
            b, t = sides["base"]["median"], sides["this"]["median"]
            print(f"{model} {key}: base {b:.4f}  this {t:.4f}  (this/base {t / b:.3f})")
    return result


if __name__ == "__main__":
    main()
