"""What compiling a grassfx model produced, for the runtime and the debugging tools.

The backend fills one :class:`CompileReport` per model (``model.compile_report``): the
frames Dynamo compiled and, per AOT graph, each pass's result (changes made, sites
skipped with their reasons). It is small and always kept. The runtime reads it (for
example, the data-parallel reducer skips the compressed gradients that the compiled
graphs already average); nothing in the compiler writes into the runtime.

Snapshots of the graphs before and after each pass are kept only when asked for
(``records``: see :mod:`grassfx.compiler.records`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from grassfx.passes import ALL_REDUCE

__all__ = ["GraphReport", "CompileReport"]


@dataclass
class GraphReport:
    """One AOT graph (``"g0.backward0"``) and what each pass of the pipeline did to it."""

    graph_id: str
    kind: str  # "forward" | "backward" | "inference"
    results: list = field(default_factory=list)  # PassResult per pass, in pipeline order (no graph)

    def add(self, result) -> None:
        self.results.append(dataclasses.replace(result, graph=None))  # the report never holds a graph

    def changes(self) -> list:
        return [c for r in self.results for c in r.changes]

    def skipped(self) -> list:
        return [s for r in self.results for s in r.skipped]


@dataclass
class CompileReport:
    """Everything the backend compiled for one model (see the module docstring)."""

    frames: int = 0  # Dynamo frames compiled (graphs handed to the backend)
    graphs: list = field(default_factory=list)  # GraphReport per AOT graph
    records: Optional[object] = None  # a grassfx.compiler.records.Recorder when recording
    _reduced: set = field(default_factory=set, repr=False)

    def add(self, graph: GraphReport) -> None:
        self.graphs.append(graph)
        self._reduced.update(c.weight for c in graph.changes() if c.action == ALL_REDUCE)

    def changes(self) -> list:
        """Every change of every pass on every graph."""
        return [c for g in self.graphs for c in g.changes()]

    def reduced_in_graph(self) -> set:
        """Weight names whose compressed gradients a compiled graph all-reduces."""
        return set(self._reduced)
