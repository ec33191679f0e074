"""The torch.compile backends: the grassfx pass pipeline inside Inductor or aot_eager.

This is the one module that touches ``torch._inductor`` / ``torch._dynamo`` /
``torch._functorch`` internals, so a torch upgrade changes one file.

* ``inductor``: ``compile_fx`` with ``post_grad_custom_pre_pass`` set *per compile*
  through ``config_patches`` (Inductor's global hook is never assigned); a user's own
  pass in that slot is chained after ours.
* ``aot_eager``: AOTAutograd with forward/backward compilers that run the same pipeline
  on the joint-partitioned graphs and then execute them without Inductor.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import itertools
import logging
import os
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from grassfx import passes as _passes
from grassfx.passes import PassContext, settings

__all__ = ["GraphRecord", "Stage", "op_summary", "CompileStats", "install_compiled_runner", "run_pipeline", "pipeline_uuid"]

_DUMP_COUNTER = itertools.count()
_log = logging.getLogger("grassfx")


@dataclass
class GraphRecord:
    """One compiled graph: its code before/after each pass and the pass results."""

    graph_id: str
    kind: str
    stages: list = field(default_factory=list)  # [Stage]

    def results(self) -> list:
        return [st.result for st in self.stages]


@dataclass
class Stage:
    """One pass applied to one graph: code and op summary before/after, and the result."""

    pass_name: str
    before: str
    after: str
    ops_before: list  # [(op name, output shape)] of every call_function node
    ops_after: list
    result: object


@dataclass
class CompileStats:
    """What the backend saw for one GrassModel."""

    frames: int = 0  # Dynamo frames compiled (graphs handed to the backend)
    graphs: list = field(default_factory=list)  # GraphRecord per AOT graph


def _graph_code(graph: fx.Graph) -> str:
    try:
        return graph.python_code("self").src
    except Exception:  # pragma: no cover - a graph python_code cannot print
        return str(graph)


def op_summary(graph: fx.Graph) -> list:
    """``[(op, shape, made_by)]`` for every call_function node.

    ``shape`` is None for non-tensors; ``made_by`` is the creating pass's tag
    (``"sparsify_wgrad:<weight>"``) or None for nodes that came from tracing.
    """
    out = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        shape = tuple(int(s) if isinstance(s, int) else str(s) for s in val.shape) if isinstance(val, torch.Tensor) else None
        target = node.target
        name = str(getattr(target, "overloadpacket", target)).replace("aten.", "")
        tag = node.meta.get("grassfx")
        out.append((name, shape, f"{tag['pass']}:{tag['weight']}" if tag else None))
    return out


def _dump(record: GraphRecord, pass_name: str, before: str, after: str, dump_dir: str) -> None:
    os.makedirs(dump_dir, exist_ok=True)
    n = next(_DUMP_COUNTER)
    stem = os.path.join(dump_dir, f"{n:03d}_{record.graph_id}_{pass_name}")
    with open(stem + ".before.py", "w") as f:
        f.write(before)
    with open(stem + ".after.py", "w") as f:
        f.write(after)
    with open(stem + ".diff", "w") as f:
        f.writelines(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "before", "after"))


def _distributed(model):
    """``(group name, world size)`` when the compiled graphs should reduce gradients."""
    dp = getattr(model, "_dp", None) if model is not None else None
    if dp is None or not dp.enabled:
        return None
    return dp.group.group_name, dp.size


def run_pipeline(graph: fx.Graph, record: GraphRecord, model=None) -> list:
    """Run every pass of ``grassfx.passes.PIPELINE`` on ``graph`` and record it."""
    cfg = settings()
    ctx = PassContext(record.graph_id, record.kind, cfg)
    dist_info = _distributed(model)
    if dist_info is not None:
        ctx.group_name, ctx.world_size = dist_info
    results = []
    for fn in _passes.PIPELINE:
        name = fn.__name__
        before = _graph_code(graph)
        ops_before = op_summary(graph)
        if name in cfg.disabled:
            res = _passes.PassResult(name, graph, disabled=True)
        else:
            res = fn(graph, ctx)
            if res.modified:
                graph.lint()
                if cfg.debug >= 1:
                    _verify(graph, name)
        after = _graph_code(graph) if res.modified else before
        ops_after = op_summary(graph) if res.modified else ops_before
        record.stages.append(Stage(name, before, after, ops_before, ops_after, res))
        if cfg.dump_dir:
            _dump(record, name, before, after, cfg.dump_dir)
        if cfg.debug >= 2:
            _log.info("%s %s: modified=%s, %d change(s), %d skip(s)%s", record.graph_id, name, res.modified,
                      len(res.changes), len(res.skipped),
                      "".join(f"\n  skipped {k.weight}: {k.reason}" for k in res.skipped))
        results.append(res)
        if name == "compress_allreduce" and res.modified:
            _note_in_graph_reduction(model, res)
    return results


def _note_in_graph_reduction(model, res) -> None:
    """Tell the eager reducer which compressed gradients the graph already averages."""
    dp = model._dp
    for change in res.changes:
        site = model.site(change.weight)
        dp.reduced_in_graph.add(change.weight)
        dp.in_graph_bytes[change.weight] = site.handle.numel() * site.handle.element_size()


def _verify(graph: fx.Graph, pass_name: str) -> None:
    from grassfx.errors import PassError

    for node in graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise PassError(pass_name, node.name, "created node has no meta['val']")


def pipeline_uuid(extra: str = "", model=None) -> str:
    """Hash of every pass module's source and the settings that change the graphs."""
    h = hashlib.sha256()
    import grassfx.ops

    for mod in (_passes, _passes.infra, _passes.sparsify_wgrad, _passes.compress_allreduce, grassfx.ops):
        h.update(inspect.getsource(mod).encode())
    cfg = settings()
    h.update(repr((sorted(cfg.disabled), cfg.debug, _distributed(model))).encode())
    h.update(extra.encode())
    return h.hexdigest()


def _custom_pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class GrassPostGradPass(CustomGraphPass):
        """Inductor hook object: runs the pipeline, then a user's pass if one was set."""

        def __init__(self, stats_ref, frame_id, chained=None, model_ref=None):
            self.stats_ref = stats_ref
            self.model_ref = model_ref
            self.frame_id = frame_id
            self.chained = chained
            self.count = 0

        def __call__(self, graph: fx.Graph) -> None:
            stats = self.stats_ref()
            kind = _graph_kind(graph)
            record = GraphRecord(f"g{self.frame_id}.{kind}{self.count}", kind)
            self.count += 1
            run_pipeline(graph, record, self.model_ref() if self.model_ref is not None else None)
            if stats is not None:
                stats.graphs.append(record)
            if self.chained is not None:
                self.chained(graph)

        def uuid(self):
            chained = ""
            if self.chained is not None:
                chained = str(self.chained.uuid()) if hasattr(self.chained, "uuid") else repr(self.chained)
            return pipeline_uuid(chained, self.model_ref() if self.model_ref is not None else None)

    return GrassPostGradPass


def _graph_kind(graph: fx.Graph) -> str:
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    if any(n.startswith("tangents") for n in names):
        return "backward"
    if any(n.startswith("primals") for n in names):
        return "forward"
    return "inference"


def inductor_patches(cfg) -> dict:
    """Inductor config patches for ``torch.compile``'s ``mode=`` and ``options=``."""
    patches = {}
    if cfg.mode is not None:
        patches.update(torch._inductor.list_mode_options(cfg.mode, cfg.dynamic))
    patches.update(cfg.compile_options)
    return patches


def _inductor_backend(model, stats: CompileStats):
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    pass_cls = _custom_pass_class()
    patches = inductor_patches(model.grass_config)

    def backend(gm: fx.GraphModule, example_inputs):
        frame = stats.frames
        stats.frames += 1
        user_pass = inductor_config.post_grad_custom_pre_pass
        hook = pass_cls(weakref.ref(stats), frame, chained=user_pass, model_ref=weakref.ref(model))
        return compile_fx(gm, example_inputs, config_patches={**patches, "post_grad_custom_pre_pass": hook})

    return backend


def _aot_eager_backend(model, stats: CompileStats):
    model_ref = weakref.ref(model)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler_for(frame):
        counter = itertools.count()

        def compiler(gm: fx.GraphModule, example_inputs):
            kind = _graph_kind(gm.graph)
            record = GraphRecord(f"g{frame}.{kind}{next(counter)}", kind)
            results = run_pipeline(gm.graph, record, model_ref())
            stats.graphs.append(record)
            if any(r.modified for r in results):
                gm.recompile()
            return make_boxed_func(gm)

        return compiler

    def backend(gm: fx.GraphModule, example_inputs):
        frame = stats.frames
        stats.frames += 1
        compiler = compiler_for(frame)
        return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, inference_compiler=compiler)(gm, example_inputs)

    return backend


def install_compiled_runner(model) -> None:
    """Compile ``model._run`` with the grassfx backend chosen by its config."""
    cfg = model.grass_config
    stats = CompileStats()
    model.compile_stats = stats
    if cfg.backend == "inductor":
        backend = _inductor_backend(model, stats)
    elif cfg.backend == "aot_eager":
        backend = _aot_eager_backend(model, stats)
    else:  # pragma: no cover - validated by GrassConfig
        raise ValueError(cfg.backend)
    model._runner = torch.compile(_own_code(model._run), backend=backend, dynamic=cfg.dynamic)


def _own_code(method):
    """``method`` bound to a private copy of its code object.

    Dynamo keeps compiled entries, and the recompile limit (8), per code object. Every
    GrassModel shares ``GrassModel._run``, so without this the fifth compiled model in a
    process (2 frames each) would silently run uncompiled.
    """
    fn = method.__func__
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(fresh, method.__self__)
