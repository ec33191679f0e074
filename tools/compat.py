"""Run a fast subset of the tests against each listed torch version; record the outcome.

Usage (``make compat``)::

    python tools/compat.py 2.13.0 2.14.1 [--remove-venv] [--out benchmarks/results/compat.json]

For each version: a fresh venv ``.venv-compat/torch-VERSION``, ``pip install torch==VERSION``,
then this package and the test dependencies at the versions below (no extras: the subset
needs no tokenizer, plotting or GaLore), then ``pytest`` over :data:`SUBSET`. One entry per
version is written to (merged into) the JSON file: install status, pytest's counts, the
last lines of its output, the seconds each part took.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["tests/instrument/test_eager_grass.py", "tests/optim/test_optimizers.py",
          "tests/compiler/test_compiler.py", "-k", "not slow"]
TEST_DEPS = ["pytest==9.2.0", "hypothesis==6.170.27", "transformers==5.25.0"]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)


def _tail(text: str, n: int = 15) -> list[str]:
    return text.strip().splitlines()[-n:]


def check_version(version: str, python: str, remove_venv: bool) -> dict:
    venv = ROOT / ".venv-compat" / f"torch-{version}"
    py = str(venv / "bin" / "python")
    entry: dict = {"torch": version, "date": datetime.date.today().isoformat(),
                   "machine": f"{platform.machine()}, {platform.system()}", "venv": str(venv.relative_to(ROOT))}
    start = time.perf_counter()
    if not venv.exists():
        _run([python, "-m", "venv", str(venv)], check=True)
    steps = [[py, "-m", "pip", "install", "-q", f"torch=={version}"],
             [py, "-m", "pip", "install", "-q", "-e", ".", *TEST_DEPS]]
    for cmd in steps:
        done = _run(cmd)
        if done.returncode != 0:
            entry.update(status="install failed", install_output=_tail(done.stdout + done.stderr))
            return entry
    entry["install_s"] = round(time.perf_counter() - start, 1)
    entry["installed_torch"] = _run([py, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    entry["python"] = _run([py, "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    start = time.perf_counter()
    done = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET])
    entry["tests_s"] = round(time.perf_counter() - start, 1)
    entry["command"] = "pytest -q " + " ".join(repr(a) if " " in a else a for a in SUBSET)
    summary = _tail(done.stdout, 1)[0] if done.stdout.strip() else ""
    entry["counts"] = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    entry["status"] = "passed" if done.returncode == 0 else f"failed (pytest exit code {done.returncode})"
    entry["output_tail"] = _tail(done.stdout + done.stderr)
    if remove_venv:
        shutil.rmtree(venv)
        entry["venv"] += " (removed after the run)"
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="torch versions, e.g. 2.13.0 2.14.1")
    parser.add_argument("--python", default=sys.executable, help="interpreter the venvs are made from")
    parser.add_argument("--out", default="benchmarks/results/compat.json")
    parser.add_argument("--remove-venv", action="store_true", help="delete each venv after its run (disk)")
    args = parser.parse_args(argv)
    out = ROOT / args.out
    results = json.loads(out.read_text()) if out.exists() else {}
    ok = True
    for version in args.versions:
        print(f"torch {version}: installing and testing ...", flush=True)
        entry = check_version(version, args.python, args.remove_venv)
        results[version] = entry
        out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"torch {version}: {entry['status']} {entry.get('counts', '')}", flush=True)
        ok &= entry["status"] == "passed"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
