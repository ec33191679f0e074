"""Debugging tools: grassfx.explain, grassfx.diff, the GRASSFX_* knobs and the CLI."""

from __future__ import annotations

import collections
import json
import re
import sys
import types
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

import grassfx
import grassfx.passes
import grassfx.recipes
from grassfx import cli
from grassfx.passes import infra

import zoo
from conftest import llama_batch, make_llama, make_mlp


# -- helpers ---------------------------------------------------------------------------
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _backward_graphs(d):
    return [g for g in d.graphs if g.kind == "backward" and g.modified]


class _TagChecker(HTMLParser):
    """Records every start/end tag mismatch (void elements need no end tag)."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


Sliced = zoo.Sliced


@pytest.fixture
def env_knobs(monkeypatch):
    """Set GRASSFX_* variables for one test; the cached settings are re-read before and after."""

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        infra.settings.cache_clear()

    yield set_env
    monkeypatch.undo()
    infra.settings.cache_clear()


@pytest.fixture(scope="module")
def llama_case():
    """A tiny Llama explained once (aot_eager) and its state before/after."""
    torch._dynamo.reset()
    # every Linear, the LM head included on request (by default it is not projected)
    model = grassfx.compile(make_llama(), rank=8, backend="aot_eager", targets=["*_proj", "lm_head"])
    batch = llama_batch(0, seq=24)  # T = 48: no weight dimension
    before = _state(model)
    report = grassfx.explain(model, **batch)
    return model, report, before


# -- explain ---------------------------------------------------------------------------
def test_llama_report_lists_every_linear_rewritten(llama_case):
    model, report, _ = llama_case
    assert len(report.weights) == 15
    assert all(w.rewritten and w.reason is None for w in report.weights)
    assert {w.name for w in report.weights} == {s.name for s in model.sites}
    assert report.tokens() == 48 and report.graph_breaks == {}
    assert report.frames == 1 and report.frames_refresh == 0  # refresh steps run eagerly (the default)
    assert "refresh steps run eagerly" in str(report)
    not_projected = {u.name: u.reason for u in report.unprojected}
    assert not_projected["model.embed_tokens.weight"] == "embedding"
    assert not_projected["model.norm.weight"] == "1-D (bias/norm)"
    text = str(report)
    assert "15/15 rewritten" in text
    assert "model.embed_tokens.weight (96 x 32)" in text


def test_llama_report_numbers(llama_case):
    _, report, _ = llama_case
    head = next(w for w in report.weights if w.name == "lm_head.weight")  # (96, 32), rows
    assert (head.shape, head.rank, head.dim) == ((96, 32), 8, "rows")
    assert str(head.flops_dense) == "6144*T" and str(head.flops_grassfx) == "512*T"
    assert head.flops() == (2 * 48 * 96 * 32, 2 * 48 * 8 * 32)
    assert (head.grad_bytes_dense, head.grad_bytes_grassfx) == (96 * 32 * 4, 8 * 32 * 4)
    assert (head.state_bytes_dense, head.state_bytes_grassfx) == (2 * 96 * 32 * 4, 2 * 8 * 32 * 4)
    k = next(w for w in report.weights if w.name.endswith("0.self_attn.k_proj.weight"))  # (16, 32), cols
    assert k.dim == "cols" and str(k.flops_grassfx) == "256*T"  # 2*T*m*r
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["rewritten"] == 15
    assert data["totals"]["wgrad_flops"]["dense"] == sum(w.flops()[0] for w in report.weights)


def test_explain_leaves_the_model_untouched(llama_case):
    model, _, before = llama_case
    after = _state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert model.step == 0 and not model._pending
    assert all(p.grad is None for p in model.parameters())
    assert model.compile_report.frames == 0  # only the copy compiled


def test_explain_mid_training_changes_nothing_and_adds_no_recompile():
    model = grassfx.compile(make_mlp(), rank=4, update_freq=2, backend="aot_eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 12, generator=g) for _ in range(4)]

    def step(x):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step(batches[0])
    step(batches[1])
    before, frames = _state(model), model.compile_report.frames
    report = grassfx.explain(model, batches[2])
    assert all(w.rewritten for w in report.weights)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    step(batches[2])
    step(batches[3])  # a refresh and a normal step again: the graphs compiled before serve them
    assert model.compile_report.frames == frames == 1  # the normal graph (refresh steps run eagerly)


def test_unpushable_use_is_reported_not_rewritten():
    model = grassfx.compile(Sliced(), rank=4, targets=["w", "fc.weight"], backend="aot_eager")
    report = grassfx.explain(model, torch.randn(5, 8))
    rows = {w.name: w for w in report.weights}
    assert rows["fc.weight"].rewritten
    assert not rows["w"].rewritten and "not a GEMM" in rows["w"].reason
    assert rows["w"].flops_grassfx == rows["w"].flops_dense  # dense fallback
    assert "not a GEMM" in str(report) and "1/2 rewritten" in str(report)


def test_eager_backend_and_full_rank_reasons():
    report = grassfx.explain(grassfx.compile(make_mlp(), rank=4, backend="eager"), torch.randn(7, 12))
    assert {w.reason for w in report.weights} == {"not compiled (backend=eager): dense fallback"}
    assert report.frames == 0 and report.tokens() == 7
    full = grassfx.explain(grassfx.compile(make_mlp(), rank=1000, backend="eager"), torch.randn(7, 12))
    assert all(w.reason.startswith("rank >= rows") for w in full.weights)


def test_not_projected_reasons():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)
            self.skip = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight
            self.table = nn.Parameter(torch.randn(8, 8))  # 2-D, never multiplied

        def forward(self, ids):
            h = self.emb(ids) + self.table[0]
            return self.head(self.skip(self.fc(h)))

    model = grassfx.compile(Net(), rank=2, exclude=["skip"], backend="eager")
    reasons = {u.name: u.reason for u in grassfx.explain(model, torch.randint(0, 10, (3, 4))).unprojected}
    assert reasons == {
        "emb.weight": "embedding",
        "fc.bias": "1-D (bias/norm)",
        "skip.weight": "excluded by filter",
        "skip.bias": "1-D (bias/norm)",
        "head.weight": "tied to an embedding (emb.weight)",
        "table": "not used by a matmul",
    }


def test_plain_module_is_refused():
    with pytest.raises(grassfx.ConfigError, match="grassfx.compile"):
        grassfx.explain(nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(grassfx.ConfigError, match="grassfx.compile"):
        grassfx.diff(nn.Linear(4, 4))


# -- diff ------------------------------------------------------------------------------
def test_diff_op_counts_match_op_summaries(llama_case):
    _, report, _ = llama_case
    d = grassfx.diff(report)
    assert [g.graph_id for g in d.graphs] == [r.graph_id for r in report.stats.graphs]
    for g, rec in zip(d.graphs, report.stats.records):
        for which, ops in (("before", rec.stages[0].ops_before), ("after", rec.stages[-1].ops_after)):
            merged = collections.Counter()
            for key, n in g.counts(which).items():
                merged[key.split(" (")[0]] += n
            assert merged == collections.Counter(op for op, _, _ in ops), (g.graph_id, which)
    (bw,) = _backward_graphs(d)
    before, after = bw.counts("before"), bw.counts("after")
    assert before["mm (m x n)"] >= 15 and after["mm (m x n)"] == 0
    assert before["grassfx.rowsel"] == 15 and after["grassfx.rowsel"] == 0
    assert after["index"] == 15
    text = str(d)
    assert re.search(r"mm \(m x n\)\s*: \d+ -> 0", text)
    assert "# <- sparsify_wgrad created (lm_head.weight)" in text
    assert "# <- sparsify_wgrad erased (lm_head.weight)" in text


def _created_gemm(report, weight):
    changes = report.stats.changes()
    change = next(c for c in changes if c.weight == weight)
    return next(n for n in change.created if n.startswith("mm"))


def test_diff_html_is_valid_and_self_contained(llama_case, tmp_path):
    _, report, _ = llama_case
    path = grassfx.diff(report).to_html(tmp_path / "diff.html")
    page = open(path, encoding="utf-8").read()
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert _created_gemm(report, "lm_head.weight") in "".join(checker.text)
    assert 'class="created"' in page and 'class="erased"' in page
    assert not re.search(r"(src|href)=", page)  # no external assets


def test_diff_dot_is_a_digraph_of_the_changed_region(llama_case):
    _, report, _ = llama_case
    dot = grassfx.diff(report).to_dot()
    assert dot.startswith("digraph grassfx_diff {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    nodes = set(re.findall(r'^\s*("[^"]+") \[label=', dot, re.M))
    edges = re.findall(r'^\s*("[^"]+") -> ("[^"]+");$', dot, re.M)
    assert nodes and edges
    assert all(a in nodes and b in nodes for a, b in edges)
    gemm = _created_gemm(report, "lm_head.weight")
    assert any(n.endswith(f'/{gemm}"') for n in nodes)
    assert '"#c8f0c8"' in dot and '"#f5c2c2"' in dot  # created and erased nodes


def test_diff_needs_a_compiled_recorded_step():
    model = grassfx.compile(make_mlp(), rank=4, backend="aot_eager", record=True)
    with pytest.raises(grassfx.GrassError, match="training step"):
        grassfx.diff(model)
    with pytest.raises(grassfx.GrassError, match="backend='eager'"):
        grassfx.diff(grassfx.compile(make_mlp(), rank=4, backend="eager"))
    unrecorded = grassfx.compile(make_mlp(), rank=4, backend="aot_eager", refresh="compiled")
    unrecorded(torch.randn(5, 12)).sum().backward()
    assert unrecorded.compile_report.records is None and unrecorded.compile_report.graphs
    with pytest.raises(grassfx.GrassError, match="record=True"):
        grassfx.diff(unrecorded)
    model(torch.randn(5, 12)).sum().backward()
    model(torch.randn(5, 12)).sum().backward()
    d = grassfx.diff(model)
    (bw,) = _backward_graphs(d)
    assert ("mm (m x n)", 2, 0) in bw.changed_counts()


# -- knobs -----------------------------------------------------------------------------
def test_disable_keeps_the_dense_gemm_and_says_so(env_knobs):
    env_knobs(GRASSFX_DISABLE="sparsify_wgrad")
    report = grassfx.explain(grassfx.compile(make_mlp(), rank=4, backend="aot_eager"), torch.randn(5, 12))
    assert all(not w.rewritten and "disabled (GRASSFX_DISABLE)" in w.reason for w in report.weights)
    assert "0/2 rewritten" in str(report)
    d = grassfx.diff(report)
    assert "disabled (GRASSFX_DISABLE)" in str(d)
    backward = [g for g in d.graphs if g.kind == "backward"]
    assert backward and all(g.counts("after")["grassfx.rowsel"] == 2 for g in backward[1:])
    assert sum(g.counts("after")["mm (m x n)"] for g in backward) >= 2  # the dense GEMMs stay


def test_dump_dir_and_debug_verify(env_knobs, tmp_path):
    env_knobs(GRASSFX_DUMP_DIR=str(tmp_path), GRASSFX_DEBUG="1")
    model = grassfx.compile(make_mlp(), rank=4, backend="aot_eager", refresh="compiled")
    report = grassfx.explain(model, torch.randn(5, 12))
    assert all(w.rewritten for w in report.weights)
    names = sorted(p.name for p in tmp_path.iterdir())
    passes = "|".join(fn.__name__ for fn in grassfx.passes.PIPELINE)
    pattern = re.compile(r"^\d{3}_g\d+\.(forward|backward)\d+_(" + passes + r")\.(before\.py|after\.py|diff)$")
    assert names and all(pattern.match(n) for n in names), names
    diffs = [(tmp_path / n).read_text() for n in names if n.endswith(".diff")]
    # forward + backward of the refresh and the training step, one dump per pass
    assert len(diffs) == 4 * len(grassfx.passes.PIPELINE)
    assert sum("aten.index.Tensor" in text for text in diffs) == 1


def _unchecked_node_pass(graph, ctx):
    """Creates a node without meta["val"]: what GRASSFX_DEBUG=1 must catch."""
    x = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        graph.call_function(torch.ops.aten.clone.default, (x,))
    return infra.PassResult("_unchecked_node_pass", graph, modified=True)


@pytest.mark.parametrize("debug", ["0", "1"])
def test_debug_verify_catches_a_node_without_meta_val(env_knobs, monkeypatch, debug):
    env_knobs(GRASSFX_DEBUG=debug)
    monkeypatch.setattr(grassfx.passes, "PIPELINE", grassfx.passes.PIPELINE + (_unchecked_node_pass,))
    model = grassfx.compile(make_mlp(), rank=4, backend="aot_eager", refresh="compiled")
    if debug == "0":
        model(torch.randn(5, 12)).sum().backward()  # not verified: the node goes through
        return
    with pytest.raises(Exception, match=r"\[_unchecked_node_pass\] at node 'clone\w*' of graph g0\.forward0: "
                                        r"created node has no meta\['val'\]"):
        model(torch.randn(5, 12)).sum().backward()


def test_bad_debug_level_is_a_config_error():
    with pytest.raises(grassfx.ConfigError, match="GRASSFX_DEBUG"):
        infra.Settings.from_env({"GRASSFX_DEBUG": "verbose"})


@pytest.mark.slow
def test_inductor_explain_runs_the_passes():
    # The FX graph cache is off for explain: even with a warm cache the pass runs.
    report = grassfx.explain(grassfx.compile(make_mlp(), rank=4, backend="inductor"), torch.randn(5, 12))
    assert [w.rewritten for w in report.weights] == [True, True]
    (bw,) = _backward_graphs(grassfx.diff(report))
    assert bw.counts("after")["mm (m x n)"] == 0


# -- CLI -------------------------------------------------------------------------------
def test_cli_explain_demo_mlp_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli.main(["explain", "--demo", "mlp", "--backend", "aot_eager", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3/3 rewritten" in text and "T = 40 tokens" in text
    assert json.loads(out.read_text())["totals"]["rewritten"] == 3


def test_cli_explain_demo_llama_eager(capsys):
    assert cli.main(["explain", "--demo", "llama-tiny", "--backend", "eager"]) == 0
    text = capsys.readouterr().out
    assert "0/14 rewritten" in text and "not compiled (backend=eager)" in text
    assert "embedding: model.embed_tokens.weight" in text
    assert "output embedding (LM head): lm_head.weight (96 x 32)" in text


def test_cli_diff_demo_gpt2_html_dot(tmp_path, capsys):
    html, dot = tmp_path / "d.html", tmp_path / "d.dot"
    argv = ["diff", "--demo", "gpt2-tiny", "--backend", "aot_eager", "--html", str(html), "--dot", str(dot)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "op counts:" in text and "sparsify_wgrad created (transformer.h.0.attn.c_attn.weight)" in text
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert dot.read_text().startswith("digraph")


def test_cli_factory_from_a_file(tmp_path, capsys):
    (tmp_path / "factory_mod.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)), (torch.randn(6, 8),)\n"
    )
    assert cli.main(["explain", f"{tmp_path / 'factory_mod.py'}:make", "--backend", "eager", "--rank", "0.25"]) == 0
    assert "rank=0.25" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["explain"], "exactly one of MODULE:FACTORY or --demo"),
    (["explain", "no_colon_here"], "expected MODULE:FACTORY"),
    (["explain", "no_such_module_xyz:make"], "cannot import"),
    (["explain", "json:no_such_factory"], "no callable"),
    (["explain", "--demo", "mlp", "--rank", "lots"], "is not a rank"),
    (["explain", "--demo", "nope"], "invalid choice"),
    (["explain", "--demo", "mlp", "--rank", "-3", "--backend", "eager"], "rank=-3"),
    (["diff", "--demo", "mlp", "--backend", "eager"], "no compiled graphs"),
    ([], "required"),
])
def test_cli_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_train_dispatches_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("grassfx.recipes.train")
    fake.main = seen.append
    monkeypatch.setitem(sys.modules, "grassfx.recipes.train", fake)
    monkeypatch.setattr(grassfx.recipes, "train", fake, raising=False)
    assert cli.main(["train", "--demo", "--steps", "3"]) == 0
    assert seen == [["--demo", "--steps", "3"]]



def test_explain_counts_tokens_of_weights_read_outside_their_module():
    """nn.MultiheadAttention reads out_proj.weight in a functional helper, not in out_proj's forward."""

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    report = grassfx.explain(grassfx.compile(Attn(), rank=4, backend="aot_eager"), torch.randn(3, 5, 16))
    tokens = {w.name: w.tokens for w in report.weights}
    assert tokens == {"att.in_proj_weight": 15, "att.out_proj.weight": 15, "fc.weight": 15}
    assert all(w.flops()[0] == 2 * 15 * w.shape[0] * w.shape[1] for w in report.weights)


def test_track_memory_counts_frees_only_of_blocks_allocated_while_recording():
    """The blind spot its docstring names (PyTorch's CPU allocator), and the way around it.

    This pins PyTorch's behaviour (torch 2.13): if a release reports those frees, this test
    fails, and track_memory's docstring and benchmarks/memory_check.py can be simplified."""
    from grassfx.debug.memory import track_memory

    size = 1 << 20  # floats: 4 MiB
    before = torch.ones(size)  # made with nothing recording
    with track_memory() as unseen:
        del before
        after = torch.ones(size)
    assert unseen.net == unseen.peak == 4 * size  # the free of `before` was not reported
    del after

    with track_memory():
        before = torch.ones(size)  # made while recording
    with track_memory() as seen:
        del before
        after = torch.ones(size)
    assert seen.net == 0 and seen.peak == 0  # freed, then made again
    del after
