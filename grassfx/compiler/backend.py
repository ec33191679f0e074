"""The torch.compile backends: the grassfx pass pipeline inside Inductor or aot_eager.

* ``inductor``: Inductor's ``compile_fx`` with ``post_grad_custom_pre_pass`` set *per
  compile* through ``config_patches`` (Inductor's global hook is never assigned) to a
  tuple: our pass first, then whatever the user set there (one pass, a list or a tuple);
  Inductor runs each entry and keys its cache on each entry's ``uuid()``.
* ``aot_eager``: AOTAutograd with forward/backward compilers that run the same pipeline
  on the joint-partitioned graphs and then execute them without Inductor.

:func:`compile_runner` returns what it made, the runner and the
:class:`~grassfx.compiler.report.CompileReport` its graphs fill; it reads the model's
configuration and, per graph, whether compiled graphs should average gradients across
ranks (a ``collectives()`` callable), and never touches the model.
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Callable, Optional

import torch
import torch.fx as fx

from grassfx import _compat
from grassfx.passes import settings

from .pipeline import graph_kind, pipeline_uuid, run_pipeline
from .records import Recorder
from .report import CompileReport

__all__ = ["compile_runner", "inductor_patches", "grass_post_grad_pass"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # grassfx/


def grass_post_grad_pass(report: CompileReport, frame_id: int, collectives):
    """The Inductor hook object of one Dynamo frame: runs the pipeline on each graph."""
    base = _compat.custom_graph_pass_base()

    class GrassPostGradPass(base):
        def __init__(self):
            self.report_ref = weakref.ref(report)
            self.count = itertools.count()

        def __call__(self, graph: fx.Graph) -> None:
            kind = graph_kind(graph)
            graph_id = f"g{frame_id}.{kind}{next(self.count)}"
            target = self.report_ref()
            recorder = target.records if target is not None else None
            result = run_pipeline(graph, graph_id, kind, collectives(), recorder)
            if target is not None:
                target.add(result)

        def uuid(self):
            return pipeline_uuid(collectives())

    return GrassPostGradPass()


def inductor_patches(cfg) -> dict:
    """Inductor config patches for ``torch.compile``'s ``mode=`` and ``options=``."""
    patches = {}
    if cfg.mode is not None:
        patches.update(_compat.mode_options(cfg.mode, cfg.dynamic))
    patches.update(cfg.compile_options)
    return patches


def _inductor_backend(report: CompileReport, cfg, collectives):
    patches = inductor_patches(cfg)

    def backend(gm: fx.GraphModule, example_inputs):
        frame = report.frames
        report.frames += 1
        ours = grass_post_grad_pass(report, frame, collectives)
        passes = _compat.post_grad_pre_passes(ours, _compat.user_post_grad_pre_pass())
        extra = {"post_grad_custom_pre_pass": passes}
        if collectives() is not None:
            # a graph served from Inductor's FX graph cache skips our pass, so the report would
            # not list the compressed gradients it averages and the eager hooks would reduce
            # them a second time: data-parallel graphs are always compiled
            extra["fx_graph_cache"] = False
        # the anchors are autograd Functions: let the AOTAutograd cache keep this graph
        # for the next process when they are the only ones in it (warm restarts)
        return _compat.compile_fx(gm, example_inputs, {**patches, **extra}, cache_functions_of=_PACKAGE_DIR,
                                  cache_key=pipeline_uuid(collectives()))

    return backend


def _aot_eager_backend(report: CompileReport, collectives):
    def compiler_for(frame):
        counter = itertools.count()

        def compiler(gm: fx.GraphModule, example_inputs):
            kind = graph_kind(gm.graph)
            result = run_pipeline(gm.graph, f"g{frame}.{kind}{next(counter)}", kind, collectives(), report.records)
            report.add(result)
            if any(r.modified for r in result.results):
                gm.recompile()
            return _compat.boxed(gm)

        return compiler

    def backend(gm: fx.GraphModule, example_inputs):
        frame = report.frames
        report.frames += 1
        compiler = compiler_for(frame)
        return _compat.aot_autograd(compiler, compiler, compiler)(gm, example_inputs)

    return backend


def compile_runner(run: Callable, cfg, collectives: Optional[Callable] = None):
    """Compile ``run`` (a model's runner, ``GrassModel._run``) with the grassfx backend ``cfg``
    (a :class:`grassfx.config.GrassConfig`) chooses; return ``(runner, report)``.

    ``runner`` is called as ``run`` is; ``report`` (a :class:`CompileReport`) fills as its
    graphs compile. ``collectives()`` says, per graph, whether compiled graphs should average
    gradients (``(group name, world size)``) or not (None, also when not given). Node
    snapshots are recorded only with ``compile(..., record=True)`` or ``GRASSFX_DEBUG>=1``.
    """
    recording = cfg.record or settings().debug >= 1
    report = CompileReport(records=Recorder() if recording else None)
    if collectives is None:
        collectives = _no_collectives
    if cfg.backend == "inductor":
        _compat.load_inductor()
        backend = _inductor_backend(report, cfg, collectives)
    elif cfg.backend == "aot_eager":
        backend = _aot_eager_backend(report, collectives)
    else:  # pragma: no cover - validated by GrassConfig
        raise ValueError(cfg.backend)
    compiled = torch.compile(_compat.own_code(run), backend=backend, dynamic=cfg.dynamic)

    def runner(refresh, args, kwargs):
        # a library's logging call, or its context variable set and reset in a checkpointed
        # layer, must not split the graph
        with _compat.quiet_logging_calls(), _compat.checkpoint_side_effects_once():
            return compiled(refresh, args, kwargs)

    return runner, report


def _no_collectives():
    return None
