"""Debugging tools: what did grassfx do to a model, and to which graph node?

* :mod:`.explain`: ``grassfx.explain`` compiles one training step of a copy and reports,
  per projected weight, whether the dense weight-gradient GEMM was removed and what it saves;
* :mod:`.report`: the :class:`Report` it returns and its text table;
* :mod:`.diff`: ``grassfx.diff``, what each pass did to each compiled graph (text);
* :mod:`.render`: the same as a side-by-side HTML page or a DOT graph.
"""

from __future__ import annotations

from .diff import Diff, GraphDiff, StageDiff, diff
from .explain import explain
from .report import Report, T, Unprojected, WeightRow

__all__ = ["explain", "diff", "Report", "WeightRow", "Unprojected", "Diff", "GraphDiff", "StageDiff", "T"]
