"""The JSON of ``make gpu-check``: its format, a validator, and the README rows made from it.

The format is documented field by field in docs/gpu-check.md; ``validate`` checks a
document against the same description (the tables below), and the tests check that the
page names every field. ``render_rows`` turns a real GPU run into the README's GPU table
and refuses a dry run, so a CPU dry run never becomes a GPU row.

Example:
    python benchmarks/gpu_report.py benchmarks/results/gpu_check.json            # print the rows
    python benchmarks/gpu_report.py benchmarks/results/gpu_check.json --write README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMAT = "grassfx-gpu-check"
VERSION = 1
MODES = ("gpu", "cpu_dry_run", "plan_only")
STATUSES = ("passed", "failed", "timeout", "planned")
SECTIONS = ("tests", "correctness", "step_d2048", "step_d4096", "fit_13b")
BEGIN = "<!-- gpu-rows:begin"
END = "<!-- gpu-rows:end -->"
GIB = 2**30

NUM = (int, float)
NONE = type(None)
# field -> the types it may hold; docs/gpu-check.md describes each one
TOP = {"format": str, "version": int, "dry_run": bool, "ok": bool, "date": str, "started": str,
       "wall_s": NUM, "budget_s": NUM, "git": dict, "machine": dict, "sections": list}
GIT = {"commit": (str, NONE), "dirty": (bool, NONE)}
MACHINE = {"card": (str, NONE), "card_memory_gib": (*NUM, NONE), "cards": int, "torch": str,
           "cuda": (str, NONE), "triton": (str, NONE), "python": str, "platform": str}
SECTION = {"name": str, "title": str, "mode": str, "status": str, "ok": (bool, NONE), "limit_s": NUM,
           "wall_s": (*NUM, NONE), "commands": list, "plan": dict, "result": (dict, NONE), "checks": dict,
           "error": (str, NONE), "log": (str, NONE)}
# what a passed section's result holds (the renderer reads these)
RESULT = {
    "tests": {"selection": str, "passed": int, "failed": int, "skipped": int, "errors": int},
    "correctness": {"device": str, "lowering": str, "runs": list},
    "step_d2048": {"dense": dict, "grassfx": dict, "speedup": NUM, "flop_limit_speedup": NUM, "memory_ratio": NUM},
    "step_d4096": {"dense": dict, "grassfx": dict, "speedup": NUM, "flop_limit_speedup": NUM, "memory_ratio": NUM},
    "fit_13b": {"cap_gib": NUM, "methods": dict},
}
STEP_SIDE = {"median_step_s": NUM, "peak_mem_bytes": NUM, "compile_s": NUM, "optimizer_state_bytes": NUM}


class RenderError(ValueError):
    """The JSON cannot give README rows (a dry run, a failed run, another format)."""


def _fields(obj, spec: dict, where: str, closed: bool = True) -> list:
    """``obj`` against ``spec``; ``closed``: no other field either (results may hold more)."""
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    errors = [f"{where}: missing {k!r}" for k in spec if k not in obj]
    errors += [f"{where}: unknown field {k!r}" for k in obj if closed and k not in spec]
    for k, types in spec.items():
        if k in obj and (not isinstance(obj[k], types) or (isinstance(obj[k], bool) and bool not in _tuple(types))):
            errors.append(f"{where}.{k}: {type(obj[k]).__name__} is not {_names(types)}")
    return errors


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _names(types) -> str:
    return " or ".join("null" if t is NONE else t.__name__ for t in _tuple(types))


def _section_errors(sec: dict, i: int, dry_run: bool) -> list:
    where = f"sections[{i}]"
    errors = _fields(sec, SECTION, where)
    if errors:
        return errors
    where = f"sections[{i}] ({sec['name']})"
    if sec["name"] not in SECTIONS:
        errors.append(f"{where}: name is not one of {SECTIONS}")
    if sec["mode"] not in MODES:
        errors.append(f"{where}: mode {sec['mode']!r} is not one of {MODES}")
    if sec["status"] not in STATUSES:
        errors.append(f"{where}: status {sec['status']!r} is not one of {STATUSES}")
    if (sec["status"] == "planned") != (sec["mode"] == "plan_only"):
        errors.append(f"{where}: status 'planned' goes with mode 'plan_only' and only with it")
    if not dry_run and sec["mode"] != "gpu":
        errors.append(f"{where}: a run with dry_run false has only mode 'gpu' sections")
    if dry_run and sec["mode"] == "gpu":
        errors.append(f"{where}: a dry run has no mode 'gpu' section")
    expected_ok = None if sec["status"] == "planned" else sec["status"] == "passed"
    if sec["ok"] is not expected_ok:
        errors.append(f"{where}: ok is {sec['ok']!r}, status {sec['status']!r} means {expected_ok!r}")
    if not all(isinstance(c, str) for c in sec["commands"]):
        errors.append(f"{where}: commands are strings")
    if not all(isinstance(v, bool) for v in sec["checks"].values()):
        errors.append(f"{where}: checks are booleans")
    if sec["status"] == "passed" and not all(sec["checks"].values()):
        errors.append(f"{where}: passed with a failed check")
    if sec["status"] == "passed" and sec["mode"] == "gpu":
        errors += _fields(sec["result"], RESULT[sec["name"]], f"{where}.result", closed=False)
        if not errors and sec["name"].startswith("step_"):
            for side in ("dense", "grassfx"):
                errors += _fields(sec["result"][side], STEP_SIDE, f"{where}.result.{side}", closed=False)
    return errors


def validate(doc) -> list:
    """Every way ``doc`` departs from the documented format (an empty list: it conforms)."""
    errors = _fields(doc, TOP, "top level")
    if errors:
        return errors
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        errors.append(f"format/version {doc['format']!r}/{doc['version']!r}, expected {FORMAT!r}/{VERSION}")
    errors += _fields(doc["git"], GIT, "git") + _fields(doc["machine"], MACHINE, "machine")
    for i, sec in enumerate(doc["sections"]):
        errors += _section_errors(sec, i, doc["dry_run"])
    names = [s.get("name") for s in doc["sections"] if isinstance(s, dict)]
    if len(names) != len(set(names)):
        errors.append(f"a section appears twice: {names}")
    ran = [s for s in doc["sections"] if isinstance(s, dict) and s.get("status") != "planned"]
    if doc["ok"] is not all(s.get("status") == "passed" for s in ran):
        errors.append("ok disagrees with the sections' status")
    return errors


# ----------------------------------------------------------------------------- README rows


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _failed(sec: dict) -> str:
    failed = [k for k, v in sec["checks"].items() if not v]
    why = f"checks failed: {', '.join(failed)}" if failed else (sec["error"] or "no result")
    return f"{sec['status']} ({why[:120]})".replace("|", "/")


def _step_row(sec: dict, card: str, link: str) -> str:
    s = sec["plan"].get("shape")
    shape = (f"d {s['hidden']}, {s['layers']} layers, {s['tokens']} tokens" if isinstance(s, dict)
             else f"d {sec['name'][len('step_d'):]}")
    label = f"{card} step time and peak memory, LLaMA-shaped ({shape}, bf16, LM head dense, r = {s['rank'] if s else '?'})"
    r = sec["result"] or {}
    measured = not _fields(r, RESULT[sec["name"]], "", closed=False) and not any(
        _fields(r[side], STEP_SIDE, "", closed=False) for side in ("dense", "grassfx"))
    if not measured:
        return f"| [{label}]({link}) | — | {_failed(sec)} |"
    d, g = r["dense"], r["grassfx"]
    note = "" if sec["status"] == "passed" else f"; {_failed(sec)}"
    return (f"| [{label}]({link}) | `torch.compile` + fused AdamW {_ms(d['median_step_s'])}, "
            f"{_gib(d['peak_mem_bytes'])} | **{_ms(g['median_step_s'])} ({r['speedup']:.2f}x), "
            f"{_gib(g['peak_mem_bytes'])}**{note} |")


def _fit_row(sec: dict, card: str, link: str) -> str:
    label = f"{card}: LLaMA-13B pure bf16 training under a 40 GiB cap (3 steps)"
    if sec["status"] != "passed":
        return f"| [{label}]({link}) | — | {_failed(sec)} |"
    m = sec["result"]["methods"]

    def outcome(name):
        return m[name]["outcome"] if name in m else "not run"

    g = m["grassfx"]
    return (f"| [{label}]({link}) | AdamW {outcome('adamw')}, GaLore {outcome('galore')} | "
            f"**fits, peak {_gib(g['peak_bytes'])}** |")


def _check_row(tests: dict | None, corr: dict | None, card: str, link: str) -> str:
    label = f"{card}: GPU tests, and Triton-lowered gradients against eager grassfx (tiny Llama)"
    parts = []
    if tests is not None:
        parts.append(f"tests {tests['result']['passed']} passed" if tests["status"] == "passed"
                     else f"tests {_failed(tests)}")
    if corr is not None:
        if corr["status"] == "passed":
            diffs = ", ".join(f"{run['dtype']} {run['max_rel_diff']:.1e}" for run in corr["result"]["runs"])
            parts.append(f"max relative difference {diffs}")
        else:
            parts.append(f"gradients {_failed(corr)}")
    return f"| [{label}]({link}) | eager grassfx | {'; '.join(parts)} |"


def render_rows(doc: dict, link: str) -> list:
    """The README's GPU table (header included) from a real run; ``link``: where the JSON lives."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RenderError(f"not a {FORMAT} document")
    if doc.get("dry_run") is not False:
        raise RenderError("this JSON is a dry run (no GPU): it gives no GPU rows; run make gpu-check on a GPU")
    errors = validate(doc)
    if errors:
        raise RenderError("the JSON does not match docs/gpu-check.md: " + "; ".join(errors[:5]))
    m = doc["machine"]
    card = m["card"] or "GPU"
    by = {s["name"]: s for s in doc["sections"]}
    head = (f"| GPU: {card}, torch {m['torch']} (CUDA {m['cuda']}), {doc['date']}, commit "
            f"{(doc['git']['commit'] or 'unknown')[:9]}, generated by make gpu-check | baseline | grassfx |")
    rows = [head, "|---|---|---|"]
    if "tests" in by or "correctness" in by:
        rows.append(_check_row(by.get("tests"), by.get("correctness"), card, link))
    rows += [_step_row(by[n], card, link) for n in ("step_d2048", "step_d4096") if n in by]
    if "fit_13b" in by:
        rows.append(_fit_row(by["fit_13b"], card, link))
    return rows


def replace_block(text: str, rows: list) -> str:
    """``text`` with the lines between the GPU-row markers replaced by ``rows``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise RenderError(f"expected one {BEGIN} ... {END} block, found {len(starts)} begin and {len(ends)} end markers")
    return "".join(lines[: starts[0] + 1] + [r + "\n" for r in rows] + lines[ends[0]:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="the JSON make gpu-check wrote")
    p.add_argument("--write", metavar="README", help="replace the rows between the markers in this file")
    p.add_argument("--link", help="the link in each row (default: the JSON's path)")
    args = p.parse_args(argv)
    doc = json.loads(Path(args.json).read_text())
    try:
        rows = render_rows(doc, args.link or args.json)
        if args.write:
            path = Path(args.write)
            path.write_text(replace_block(path.read_text(), rows))
    except RenderError as exc:
        print(f"gpu_report: {exc}", file=sys.stderr)
        return 2
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
