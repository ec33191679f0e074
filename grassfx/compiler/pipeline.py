"""Running ``grassfx.passes.PIPELINE`` on one graph, and the cache key of that pipeline.

:func:`run_pipeline` is the one place a pass is called: it builds the
:class:`~grassfx.passes.PassContext`, skips passes disabled by ``GRASSFX_DISABLE``,
turns any exception a pass raises into a :class:`grassfx.PassError` naming the pass and
the graph, verifies the graph after each change (``GRASSFX_DEBUG>=1``), logs
(``GRASSFX_DEBUG=2``), dumps (``GRASSFX_DUMP_DIR``), records node snapshots when a
:class:`~grassfx.compiler.records.Recorder` is given, and returns a
:class:`~grassfx.compiler.report.GraphReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import sys

import torch.fx as fx

from grassfx import passes as _passes
from grassfx.core import ops as _ops
from grassfx.core import rows as _rows
from grassfx.errors import GrassError, PassError
from grassfx.passes import PassContext, PassResult, settings

from . import records as _records
from .report import GraphReport

__all__ = ["run_pipeline", "pipeline_uuid", "graph_kind"]

_log = logging.getLogger("grassfx")


def graph_kind(graph: fx.Graph) -> str:
    """``"forward"``, ``"backward"`` or ``"inference"``, from AOTAutograd's input names."""
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    if any(n.startswith("tangents") for n in names):
        return "backward"
    if any(n.startswith("primals") for n in names):
        return "forward"
    return "inference"


def run_pipeline(graph: fx.Graph, graph_id: str, kind: str, collectives=None, recorder=None) -> GraphReport:
    """Run every pass of the pipeline on ``graph`` (in place); return what they did.

    ``collectives``: ``(process group name, world size)`` when the model trains
    data-parallel and the graph should average compressed gradients, else None.
    """
    cfg = settings()
    ctx = PassContext(graph_id, kind, cfg)
    if collectives is not None:
        ctx.group_name, ctx.world_size = collectives
    report = GraphReport(graph_id, kind)
    record = recorder.begin(graph_id, kind) if recorder is not None else None
    for fn in _passes.PIPELINE:
        name = fn.__name__
        before = _records.snapshot(graph) if record is not None else None
        code_before = _records.graph_code(graph) if cfg.dump_dir else None
        res = PassResult(name, graph, disabled=True) if name in cfg.disabled else _call(fn, graph, ctx)
        if res.modified:
            graph.lint()
            if cfg.debug >= 1:
                verify(graph, name, graph_id)
        if record is not None:
            after = _records.snapshot(graph) if res.modified else before
            record.stages.append(_records.Stage(name, before, after, dataclasses.replace(res, graph=None)))
        if cfg.dump_dir:
            code_after = _records.graph_code(graph) if res.modified else code_before
            _records.dump(graph_id, name, code_before, code_after, cfg.dump_dir)
        if cfg.debug >= 2:
            _log.info("%s %s: modified=%s, %d change(s), %d skip(s)%s", graph_id, name, res.modified,
                      len(res.changes), len(res.skipped),
                      "".join(f"\n  skipped {k.weight}: {k.reason}" for k in res.skipped))
        report.add(res)
    return report


def _call(fn, graph: fx.Graph, ctx: PassContext) -> PassResult:
    """Run one pass; whatever it raises reaches the user as a PassError naming it."""
    try:
        return fn(graph, ctx)
    except GrassError:
        raise
    except Exception as exc:
        raise PassError(fn.__name__, None, f"{type(exc).__name__}: {exc}", graph=ctx.graph_id) from exc


def verify(graph: fx.Graph, pass_name: str, graph_id=None) -> None:
    """Every call_function node carries ``meta["val"]`` (``GRASSFX_DEBUG>=1``)."""
    for node in graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise PassError(pass_name, node.name, "created node has no meta['val']", graph=graph_id)


def _pass_modules() -> list:
    """The source modules the pipeline's behaviour depends on, derived from PIPELINE."""
    mods = [_passes, _passes.infra]
    for fn in _passes.PIPELINE:
        mod = sys.modules[fn.__module__]
        if mod not in mods:
            mods.append(mod)
    # helper modules of the passes (rowpush, sparsify_experts, which sparsify_wgrad imports)
    mods += [m for m in vars(_passes).values() if inspect.ismodule(m) and m not in mods]
    return mods + [_ops, _rows]  # the contract: the marker ops the passes rewrite, and their eager form


def pipeline_uuid(collectives=None, extra: str = "") -> str:
    """Hash of the pipeline (pass names in order, their modules' sources, the marker ops'
    module :mod:`grassfx.core.ops` and the row helpers they run) and the settings.

    Inductor's FX graph cache keys compiled graphs on it, so a changed pass, a disabled
    pass or data parallelism never gets a graph built by another pipeline.
    """
    h = hashlib.sha256()
    h.update(repr([fn.__name__ for fn in _passes.PIPELINE]).encode())
    for mod in _pass_modules():
        h.update(inspect.getsource(mod).encode())
    cfg = settings()
    h.update(repr((sorted(cfg.disabled), cfg.debug, collectives)).encode())
    h.update(extra.encode())
    return h.hexdigest()
