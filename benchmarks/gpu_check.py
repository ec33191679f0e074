"""``make gpu-check``: every GPU claim checked in one command, one JSON (docs/gpu-check.md).

Sections, each in its own process group under its own time limit (a failure or a
timeout is recorded and the next section runs; the exit status is 1 if any failed):

1. ``tests``: the GPU tests (pytest ``-k "gpu or cuda"``: the ``gpu`` marker and the
   ``cuda`` parametrizations).
2. ``correctness``: a tiny Llama, grassfx compiled with Inductor (Triton kernels) against
   eager grassfx, fp32 and bf16 autocast: max relative difference of the compressed
   gradients over a refresh step and two normal steps; every projected weight rewritten.
3. ``step_d2048``, ``step_d4096``: step time and peak memory, bf16 autocast, dense
   ``torch.compile`` + fused AdamW against grassfx (benchmarks/step_time.py) at LLaMA
   shapes, LM head dense (grassfx's default: it trains the output embedding densely).
4. ``fit_13b``: LLaMA-13B pure bf16 under a 40 GiB cap (benchmarks/fit_13b.py): grassfx
   with Inductor; AdamW and GaLore uncompiled (their weights, gradients and state alone
   exceed the cap, so compiling them would only spend the time limit).

Without a CUDA device it is a dry run: it prints the plan (shapes, commands, limits),
runs what is cheap on the CPU (the test selection, collected; the correctness check with
Inductor's C++ backend) and writes the JSON with ``"dry_run": true``, which the README
renderer refuses.

Examples:
    python benchmarks/gpu_check.py                        # GPU: benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --sections correctness --limit correctness=120
    python benchmarks/gpu_check.py --render benchmarks/results/gpu_check.json --write README.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_report  # noqa: E402

GIB = 2**30
TEST_SELECTION = "gpu or cuda"
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # measured on an H200 (torch 2.11): 6.4e-7 and 9.7e-3
FIT_CAP_GIB = 40.0
SHAPES = {  # LLaMA-1B- and -7B-wide layers, 4 of them; r / d = 1/8 at both widths
    "step_d2048": dict(hidden=2048, inter=5504, layers=4, vocab=32000, tokens=8192, seq=2048, rank=256),
    "step_d4096": dict(hidden=4096, inter=11008, layers=4, vocab=32000, tokens=8192, seq=2048, rank=512),
}
STEPS, WARMUP = 10, 3


# ----------------------------------------------------------------------------- section 2, in its own process


def correctness(dtype_mode: str) -> dict:
    """Inductor-compiled grassfx against eager grassfx on a tiny Llama (Triton on CUDA, C++ on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import grassfx

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = LlamaForCausalLM(cfg).to(dev).eval()
    eager = grassfx.compile(copy.deepcopy(net), rank=8, update_freq=10, backend="eager")
    comp = grassfx.compile(net, rank=8, update_freq=10, backend="inductor")
    worst = 0.0
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 96, (3, 10), generator=g).to(dev)
        for m in (eager, comp):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype_mode == "bf16"):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        for a, b in zip(eager.sites, comp.sites):
            rel = ((a.handle.grad - b.handle.grad).abs().max() / a.handle.grad.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, rel)
        for m in (eager, comp):
            for s in m.sites:
                s.handle.grad = None
            m.grass_step += 1
    rewritten = {c.weight for c in comp.compile_report.changes() if c.action == "rewrote"}
    return {"dtype": dtype_mode, "max_rel_diff": worst, "tolerance": TOLERANCE[dtype_mode], "rewritten": len(rewritten),
            "projected": len(comp.sites), "linears": 7 * cfg.num_hidden_layers + 1, "frames": comp.compile_report.frames}


def correctness_main(out: str) -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    for mode in ("fp32", "bf16"):
        runs.append(correctness(mode))
        print(json.dumps(runs[-1]), flush=True)
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else platform.machine(),
                                     "lowering": "triton" if dev == "cuda" else "cpp", "runs": runs}, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- the sections


@dataclass
class Section:
    """One part of the check: its commands on a GPU, on a CPU dry run, and how to read their output."""

    name: str
    title: str
    limit_s: int  # on a GPU; the five add up to the ~8 minute budget
    gpu: Callable[[str, Path], list]  # (python, raw dir) -> argv lists
    read: Callable[[Path, str], tuple]  # (raw dir, log text) -> (result, checks)
    plan: Callable[[], dict] = dict
    cpu: Callable[[str, Path], list] | None = None  # what a dry run runs on the CPU (None: nothing)
    read_cpu: Callable[[Path, str], tuple] | None = None
    cpu_limit_s: int = 240


def _pytest(py, raw, *extra):
    return [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", TEST_SELECTION, *extra, "tests"]]


def _read_tests(raw, log):
    suite = ET.parse(raw / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result = {"selection": f'-k "{TEST_SELECTION}"', "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
              "failed": n["failures"], "skipped": n["skipped"], "errors": n["errors"]}
    return result, {"no_failures": n["failures"] == 0 and n["errors"] == 0, "some_ran": result["passed"] > 0}


def _read_collected(raw, log):
    ids = [line.strip() for line in log.splitlines() if "::" in line and not line.startswith("$ ")]
    return {"selection": f'-k "{TEST_SELECTION}"', "collected": ids}, {"collected": bool(ids)}


def _correctness_cmd(py, raw):
    return [[py, "benchmarks/gpu_check.py", "--correctness-out", str(raw / "correctness.json")]]


def _read_correctness(raw, log):
    result = json.loads((raw / "correctness.json").read_text())
    checks = {f"{r['dtype']}_gradients_match": r["max_rel_diff"] <= r["tolerance"] for r in result["runs"]}
    checks["every_projected_weight_rewritten"] = all(r["rewritten"] == r["projected"] > 0 for r in result["runs"])
    checks["lm_head_dense"] = all(r["projected"] == r["linears"] - 1 for r in result["runs"])
    return result, checks


def _step_argv(shape: dict) -> list:
    return ["--model", "llama", "--hidden", str(shape["hidden"]), "--inter", str(shape["inter"]),
            "--layers", str(shape["layers"]), "--vocab", str(shape["vocab"]), "--tokens", str(shape["tokens"]),
            "--seq", str(shape["seq"]), "--rank", str(shape["rank"])]


def _step_cmd(name):
    def cmd(py, raw):
        return [[py, "benchmarks/step_time.py", "--device", "cuda", "--dtype", "bf16", *_step_argv(SHAPES[name]),
                 "--steps", str(STEPS), "--warmup", str(WARMUP), "--threads", "8", "--out", str(raw / f"{name}.json")]]
    return cmd


def _step_plan(name):
    def plan():
        shape = SHAPES[name]
        out = {"shape": dict(shape), "steps": STEPS, "warmup": WARMUP, "dtype": "bf16 autocast",
               "baseline": "torch.compile + torch.optim.AdamW(fused=True)",
               "grassfx": "grassfx.compile(rank, selection='top_r') + grassfx.optim.AdamW"}
        try:
            import step_time
            from transformers import LlamaForCausalLM

            with torch.device("meta"):
                model = LlamaForCausalLM(step_time.llama_config(argparse.Namespace(**shape)))
            linears = step_time.projected_linears(model)
        except Exception as exc:  # noqa: BLE001 - the shape stays in the plan; the rest is reported missing
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
            return out
        out.update(params=sum(p.numel() for p in model.parameters()), linears=len(linears),
                   projected=sum(1 for *_, proj in linears if proj),
                   lm_head_projected=any(proj for n, _, proj in linears if n == "lm_head"),
                   flop_limit_speedup=step_time.flop_limit(model, shape["tokens"], shape["rank"]))
        return out
    return plan


def _read_step(name):
    def read(raw, log):
        run = json.loads((raw / f"{name}.json").read_text())["runs"][0]
        keep = ("median_step_s", "first_step_s", "compile_s", "peak_mem_bytes", "optimizer_state_bytes")
        dense = {k: run["dense"][k] for k in keep}
        grass = {k: run["grassfx"][k] for k in (*keep, "refresh_step_s", "rewritten", "projected", "frames")}
        result = {"dense": dense, "grassfx": grass, "speedup": run["speedup"],
                  "flop_limit_speedup": run["flop_limit_speedup"],
                  "fraction_of_flop_limit": run["fraction_of_flop_limit"],
                  "memory_ratio": grass["peak_mem_bytes"] / dense["peak_mem_bytes"]}
        checks = {"every_projected_weight_rewritten": grass["rewritten"] >= grass["projected"] > 0,
                  "lm_head_dense": grass["projected"] == 7 * SHAPES[name]["layers"],
                  "peak_memory_below_dense": grass["peak_mem_bytes"] < dense["peak_mem_bytes"]}
        return result, checks
    return read


def _fit_cmd(py, raw):
    base = [py, "benchmarks/fit_13b.py", "--device", "cuda", "--size", "13B", "--cap-gib", str(FIT_CAP_GIB)]
    return [base + ["--methods", "grassfx", "--out", str(raw / "fit_13b_grassfx.json")],
            base + ["--methods", "adamw", "galore", "--backend", "eager", "--out", str(raw / "fit_13b_baselines.json")]]


def _fit_plan():
    import fit_13b

    args = fit_13b.parse_args(["--device", "cpu", "--size", "13B", "--cap-gib", str(FIT_CAP_GIB)])
    predicted = fit_13b.predictions(args)
    return {"size": "13B", "dtype": "pure bf16", "rank": args.rank, "tokens": args.tokens, "steps": args.steps,
            "cap_gib": FIT_CAP_GIB, "predicted_gib": {m: b / GIB for m, b in predicted.items()},
            "grassfx": f"{args.grassfx_optimizer}, full state {args.full_state}, Inductor"}


def _read_fit(raw, log):
    methods, predicted = {}, {}
    for part in ("grassfx", "baselines"):
        path = raw / f"fit_13b_{part}.json"
        if path.exists():
            data = json.loads(path.read_text())
            predicted.update(data["predicted"])
            for r in data["results"]:
                methods[r["method"]] = {k: r.get(k) for k in ("outcome", "phase", "steps_done", "peak_bytes",
                                                             "step_seconds", "wall_seconds", "error")}
    for m, r in methods.items():
        r["predicted_bytes"] = predicted.get(m)
    card = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 0.0
    g = methods.get("grassfx", {})
    checks = {"card_holds_the_cap": card >= FIT_CAP_GIB,
              "grassfx_fits": g.get("outcome") == "fits" and g.get("steps_done") == 3,
              "adamw_out_of_memory": methods.get("adamw", {}).get("outcome") == "out of memory",
              "galore_out_of_memory": methods.get("galore", {}).get("outcome") == "out of memory"}
    return {"cap_gib": FIT_CAP_GIB, "methods": methods}, checks


SECTIONS = [
    Section("tests", "GPU-marked tests and cuda parametrizations", 40,
            lambda py, raw: _pytest(py, raw, "--junitxml", str(raw / "tests.xml")), _read_tests,
            cpu=lambda py, raw: _pytest(py, raw, "--collect-only"), read_cpu=_read_collected, cpu_limit_s=120),
    Section("correctness", "Triton-lowered gradients against eager grassfx (tiny Llama, fp32 and bf16 autocast)",
            70, _correctness_cmd, _read_correctness, plan=lambda: {"tolerance": TOLERANCE},
            cpu=_correctness_cmd, read_cpu=_read_correctness),
    *[Section(n, f"step time and peak memory, d {SHAPES[n]['hidden']}, bf16, LM head dense, vs torch.compile + "
              f"fused AdamW", limit, _step_cmd(n), _read_step(n), plan=_step_plan(n))
      for n, limit in (("step_d2048", 90), ("step_d4096", 120))],
    Section("fit_13b", "LLaMA-13B pure bf16 under a 40 GiB cap: grassfx fits, AdamW and GaLore do not", 160,
            _fit_cmd, _read_fit, plan=_fit_plan),
]
assert tuple(s.name for s in SECTIONS) == gpu_report.SECTIONS


# ----------------------------------------------------------------------------- running them


def _pump(stream, log, prefix):
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        print(f"  {prefix} {line}", end="", flush=True)


def run_command(argv: list, limit_s: float, log_path: Path, cache: str | None) -> int | None:
    """Run ``argv`` in its own process group; its exit status, or None if it ran past ``limit_s``.

    A graph served from Inductor's FX graph cache or AOTAutograd's cache runs no pass and
    reports no rewrite, so both are off. ``cache``: an empty directory for every compile cache
    (a GPU run: compiles as cold as on a fresh machine); None keeps the compiled kernels of
    earlier runs (a dry run: the C++ kernels of a CPU compile are slow to build).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    if cache:
        env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, "|"), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        reader.join(timeout=5)
    return rc


def plan_section(sec: Section, mode: str, py: str, raw: Path, limit_s: float) -> dict:
    """The section's JSON entry before it runs: its commands and plan, status 'planned'."""
    commands = (sec.cpu if mode == "cpu_dry_run" else sec.gpu)(py, raw)
    out = {"name": sec.name, "title": sec.title, "mode": mode, "status": "planned", "ok": None, "limit_s": limit_s,
           "wall_s": None, "commands": [shlex.join(c) for c in commands], "plan": {}, "result": None, "checks": {},
           "error": None, "log": None}
    try:
        out["plan"] = sec.plan()
    except Exception as exc:  # noqa: BLE001 - a plan that cannot be worked out is reported, not fatal
        out["plan"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def run_section(sec: Section, out: dict, py: str, raw: Path) -> dict:
    """Run the planned section under its limit and fill in status, result and checks."""
    mode, limit_s = out["mode"], out["limit_s"]
    if mode == "cpu_dry_run":
        commands, read = sec.cpu(py, raw), sec.read_cpu
    else:
        commands, read = sec.gpu(py, raw), sec.read
    log_path = ROOT / raw / f"{sec.name}.log"
    log_path.write_text("")
    out["log"] = str(raw / f"{sec.name}.log")
    start = time.perf_counter()
    rcs = []
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{sec.name}_") as cache:
        for argv in commands:
            rcs.append(run_command(argv, limit_s - (time.perf_counter() - start), log_path,
                                   cache if mode == "gpu" else None))
            if rcs[-1] is None:
                break
    out["wall_s"] = round(time.perf_counter() - start, 1)
    log = log_path.read_text()
    try:
        out["result"], out["checks"] = read(ROOT / raw, log)
    except Exception as exc:  # noqa: BLE001 - missing or partial output: the section failed
        out["error"] = f"no result: {type(exc).__name__}: {exc}"[:300]
    if None in rcs:
        out["status"] = "timeout"
        out["error"] = f"ran past its limit of {limit_s:.0f} s"
    elif any(rcs) or out["result"] is None or not all(out["checks"].values()):
        out["status"] = "failed"
        if any(rcs):
            out["error"] = f"exit status {rcs}; log tail: " + log[-400:].strip()
    else:
        out["status"] = "passed"
    out["ok"] = out["status"] == "passed"
    return out


def _git() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    cuda = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"card": torch.cuda.get_device_name(0) if cuda else None,
            "card_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if cuda else None,
            "cards": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "python": platform.python_version(), "platform": platform.platform()}


def _print_plan(sec: Section, i: int, n: int, entry: dict, raw: Path, dry: bool):
    limit = entry["limit_s"] if entry["mode"] == "gpu" else sec.limit_s
    print(f"[{i}/{n}] {sec.name}: {sec.title}; limit {limit:.0f} s on a GPU", flush=True)
    for c in sec.gpu(sys.executable, raw):
        print(f"    {'on a GPU would run' if dry else 'runs'}: {shlex.join(c)}")
    if entry["mode"] == "cpu_dry_run":
        for c in entry["commands"]:
            print(f"    cpu dry run (limit {entry['limit_s']:.0f} s): {c}")
    plan = {k: v for k, v in entry["plan"].items() if k != "shape"}
    if "shape" in entry["plan"]:
        print(f"    shape: {entry['plan']['shape']}")
    if plan:
        print(f"    plan: {json.dumps(plan, default=str)}")


def _parse_limits(items) -> dict:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in gpu_report.SECTIONS or not seconds:
            raise SystemExit(f"--limit takes SECTION=SECONDS with SECTION one of {gpu_report.SECTIONS}, got {item!r}")
        limits[name] = float(seconds)
    return limits


def check(args) -> int:
    cuda = torch.cuda.is_available()
    if args.require_gpu and not cuda:
        print(f"gpu_check: a GPU was expected (nvidia-smi found) but torch {torch.__version__} sees no CUDA device; "
              "install a CUDA build of torch (docs/gpu-check.md)", file=sys.stderr)
        return 2
    dry = args.plan_only or not cuda
    out = Path(args.out or ("build/gpu_check_dry_run.json" if dry else "benchmarks/results/gpu_check.json"))
    out = out if out.is_absolute() else ROOT / out
    if dry and out.exists() and json.loads(out.read_text()).get("dry_run") is False:
        print(f"gpu_check: {out} holds a GPU run; a dry run does not overwrite it (pass another --out)", file=sys.stderr)
        return 2
    raw = out.with_name(out.stem + "_raw")
    raw.mkdir(parents=True, exist_ok=True)
    raw = raw.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw  # the commands run in ROOT
    limits = _parse_limits(args.limit)
    chosen = [s for s in SECTIONS if not args.sections or s.name in args.sections]
    started = datetime.datetime.now(datetime.timezone.utc)
    if dry:
        print("gpu_check: CPU DRY RUN (no CUDA device): the plan, and the cheap parts run on the CPU; "
              "no number here is a GPU result", flush=True)
    total = time.perf_counter()
    sections = []
    for i, sec in enumerate(chosen, 1):
        mode = "gpu" if not dry else ("cpu_dry_run" if sec.cpu and not args.plan_only else "plan_only")
        limit = limits.get(sec.name, sec.cpu_limit_s if mode == "cpu_dry_run" else sec.limit_s)
        entry = plan_section(sec, mode, sys.executable, raw, limit)
        _print_plan(sec, i, len(chosen), entry, raw, dry)
        if mode != "plan_only":
            entry = run_section(sec, entry, sys.executable, raw)
        if mode == "cpu_dry_run":
            print(f"    cpu dry run: {entry['status']} in {entry['wall_s']} s, checks {entry['checks']}", flush=True)
        elif mode == "gpu":
            print(f"    {entry['status']} in {entry['wall_s']} s, checks {entry['checks']}"
                  + (f"; {entry['error']}" if entry["error"] else ""), flush=True)
        sections.append(entry)
    ran = [s for s in sections if s["status"] != "planned"]
    doc = {"format": gpu_report.FORMAT, "version": gpu_report.VERSION, "dry_run": dry,
           "ok": all(s["status"] == "passed" for s in ran), "date": started.strftime("%Y-%m-%d"),
           "started": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - total, 1),
           "budget_s": sum(s["limit_s"] for s in sections), "git": _git(), "machine": machine(), "sections": sections}
    errors = gpu_report.validate(doc)
    if errors:  # a bug here, not in what was measured
        print("gpu_check: the JSON departs from docs/gpu-check.md: " + "; ".join(errors), file=sys.stderr)
        doc["ok"] = False
    out.write_text(json.dumps(doc, indent=1) + "\n")
    failed = [s["name"] for s in ran if s["status"] != "passed"]
    print(f"gpu_check: {'dry run ' if dry else ''}wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} in {doc['wall_s']} s; "
          + (f"failed: {', '.join(failed)}" if failed else "every section that ran passed"))
    return 1 if failed or errors else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="the JSON (default: benchmarks/results/gpu_check.json; a dry run: "
                                 "build/gpu_check_dry_run.json); raw files and logs go to <out>_raw/")
    p.add_argument("--sections", nargs="+", choices=gpu_report.SECTIONS, help="run only these")
    p.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS", help="another time limit")
    p.add_argument("--plan-only", action="store_true", help="run nothing: the plan and the JSON (a dry run)")
    p.add_argument("--require-gpu", action="store_true", help="fail (exit 2) instead of a dry run without CUDA")
    p.add_argument("--render", metavar="JSON", help="print the README's GPU rows from a GPU run's JSON")
    p.add_argument("--write", metavar="README", help="with --render: replace the rows between the markers here")
    p.add_argument("--correctness-out", help=argparse.SUPPRESS)  # the correctness section's own process
    args = p.parse_args(argv)
    if args.correctness_out:
        return correctness_main(args.correctness_out)
    if args.render:
        return gpu_report.main([args.render] + (["--write", args.write] if args.write else []))
    try:
        import grassfx.passes  # noqa: F401 - an install made from this checkout (docs/gpu-check.md)
    except ImportError as exc:
        print(f"gpu_check: grassfx does not import ({exc}); install this checkout into {sys.executable}: "
              f"{sys.executable} -m pip install --no-deps --no-build-isolation -e .", file=sys.stderr)
        return 2
    return check(args)


if __name__ == "__main__":
    raise SystemExit(main())
