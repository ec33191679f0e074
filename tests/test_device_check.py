"""``make gpu-check`` without a GPU: its plan gives a JSON of the documented format, every
field is documented, and the README renderer takes a GPU run and refuses a dry run.

(The file and test names avoid "gpu" and "cuda": the check's own test selection is
``-k "gpu or cuda"``, and these tests are for the CPU.)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402

GIB = 2**30


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("check") / "plan.json"
    assert gpu_check.main(["--plan-only", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _real_run(planned: dict) -> dict:
    """The plan made into a passed GPU run, with made-up numbers of the right shape."""
    doc = copy.deepcopy(planned)
    doc.update(dry_run=False, ok=True)
    doc["machine"].update(card="NVIDIA H100 80GB HBM3", card_memory_gib=79.2, cards=1, cuda="13.0", triton="3.6.0")
    side = dict(median_step_s=0.04, first_step_s=9.0, compile_s=9.0, peak_mem_bytes=8 * GIB, optimizer_state_bytes=GIB)
    results = {
        "tests": {"selection": '-k "gpu or cuda"', "passed": 10, "failed": 0, "skipped": 0, "errors": 0},
        "correctness": {"device": "NVIDIA H100 80GB HBM3", "lowering": "triton",
                        "runs": [{"dtype": "fp32", "max_rel_diff": 6e-7}, {"dtype": "bf16", "max_rel_diff": 1e-2}]},
        "fit_13b": {"cap_gib": 40.0, "methods": {"grassfx": {"outcome": "fits", "peak_bytes": 36 * GIB},
                                                 "adamw": {"outcome": "out of memory"},
                                                 "galore": {"outcome": "out of memory"}}},
    }
    for name in ("step_d2048", "step_d4096"):
        results[name] = {"dense": dict(side), "grassfx": dict(side, median_step_s=0.033, peak_mem_bytes=7 * GIB),
                         "speedup": 1.21, "flop_limit_speedup": 1.30, "fraction_of_flop_limit": 0.93,
                         "memory_ratio": 0.875}
    for sec in doc["sections"]:
        sec.update(mode="gpu", status="passed", ok=True, wall_s=30.0, result=results[sec["name"]],
                   checks={"made_up": True}, log=f"raw/{sec['name']}.log")
    return doc


def test_plan_follows_the_documented_format(planned):
    assert gpu_report.validate(planned) == []
    assert planned["dry_run"] is True and planned["machine"]["card"] is None
    assert [s["name"] for s in planned["sections"]] == list(gpu_report.SECTIONS)
    assert {s["status"] for s in planned["sections"]} == {"planned"}
    for name in ("step_d2048", "step_d4096"):
        plan = next(s for s in planned["sections"] if s["name"] == name)["plan"]
        assert plan["lm_head_projected"] is False and plan["projected"] == 7 * plan["shape"]["layers"]
        assert plan["shape"]["hidden"] == int(name[-4:])
    fit = next(s for s in planned["sections"] if s["name"] == "fit_13b")["plan"]
    assert fit["predicted_gib"]["grassfx"] < fit["cap_gib"] < fit["predicted_gib"]["galore"]
    assert sum(s["limit_s"] for s in planned["sections"]) <= 8 * 60


def test_validator_catches_a_dry_run_passed_off_as_a_run(planned):
    doc = copy.deepcopy(planned)
    doc["dry_run"] = False
    assert any("only mode 'gpu'" in e for e in gpu_report.validate(doc))
    doc = _real_run(planned)
    doc["sections"][0].update(status="failed", ok=False)
    assert any("ok disagrees" in e for e in gpu_report.validate(doc))
    del doc["machine"]["card"]
    assert any("missing 'card'" in e for e in gpu_report.validate(doc))


def test_every_field_is_documented():
    page = (ROOT / "docs" / "gpu-check.md").read_text()
    tables = [gpu_report.TOP, gpu_report.GIT, gpu_report.MACHINE, gpu_report.SECTION, gpu_report.STEP_SIDE,
              *gpu_report.RESULT.values()]
    missing = sorted({k for t in tables for k in t if f"`{k}`" not in page})
    assert missing == []
    assert all(f"`{v}`" in page for v in (*gpu_report.MODES, *gpu_report.STATUSES, *gpu_report.SECTIONS))


def test_renderer_refuses_a_dry_run(planned, tmp_path, capsys):
    with pytest.raises(gpu_report.RenderError, match="dry run"):
        gpu_report.render_rows(planned, "x.json")
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    path = tmp_path / "dry.json"
    path.write_text(json.dumps(planned))
    assert gpu_check.main(["--render", str(path), "--write", str(readme)]) == 2
    assert readme.read_text() == (ROOT / "README.md").read_text()
    assert "dry run" in capsys.readouterr().err


def test_renderer_writes_the_readme_rows_of_a_run(planned, tmp_path):
    doc = _real_run(planned)
    assert gpu_report.validate(doc) == []
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    before = (ROOT / "README.md").read_text()
    readme.write_text(before)
    assert gpu_report.main([str(path), "--write", str(readme), "--link", "benchmarks/results/gpu_check.json"]) == 0
    after = readme.read_text()
    block = after.split(gpu_report.BEGIN)[1].split(gpu_report.END)[0]
    assert "stale" not in block and "H100" in block and "LM head dense" in block
    assert "**33.0 ms (1.21x), 7.00 GiB**" in block and "d 4096" in block and "fits, peak 36.00 GiB" in block
    assert after.split(gpu_report.BEGIN)[0] == before.split(gpu_report.BEGIN)[0]
    assert after.split(gpu_report.END)[1] == before.split(gpu_report.END)[1]


def test_readme_rows_are_labelled_stale_or_generated():
    text = (ROOT / "README.md").read_text()
    assert text.count(gpu_report.BEGIN) == 1 and text.count(gpu_report.END) == 1
    block = text.split(gpu_report.BEGIN)[1].split(gpu_report.END)[0]
    header = block.splitlines()[1]
    assert "stale" in header or "generated by make gpu-check" in header
