"""Compiling a grassfx model: backends, the pass pipeline, the report, opt-in records.

* :mod:`.backend`: the ``inductor`` and ``aot_eager`` backends and ``compile_runner`` (returns the runner and its report);
* :mod:`.pipeline`: ``run_pipeline`` (every pass, PassError on failure) and ``pipeline_uuid``;
* :mod:`.report`: ``CompileReport``, what compilation produced (read by the runtime);
* :mod:`.records`: opt-in, bounded node snapshots before/after each pass, and dumps.
"""

from __future__ import annotations

from .backend import compile_runner, inductor_patches
from .pipeline import pipeline_uuid, run_pipeline
from .records import GraphRecord, NodeSnapshot, Recorder, Stage
from .report import CompileReport, GraphReport

__all__ = ["compile_runner", "inductor_patches", "run_pipeline", "pipeline_uuid", "CompileReport",
           "GraphReport", "Recorder", "GraphRecord", "Stage", "NodeSnapshot"]
