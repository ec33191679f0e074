"""``grassfx.diff``: what each pass did to each compiled graph.

Reads the node snapshots the compiler recorded (:mod:`grassfx.compiler.records`: on
with ``grassfx.compile(..., record=True)`` or ``GRASSFX_DEBUG>=1``, and always in the
copy :func:`grassfx.explain` compiles) and shows a unified diff per pass with every
created or erased node attributed to its pass and weight, and op counts before/after.
``Diff.to_html`` and ``Diff.to_dot`` render the same data (:mod:`grassfx.debug.render`).
"""

from __future__ import annotations

import collections
import difflib
from dataclasses import dataclass, field
from typing import Optional

from grassfx.errors import GrassError

from . import render
from .common import projected_shapes, require_grass_model, trace_artifact
from .report import Report

__all__ = ["diff", "Diff", "GraphDiff", "StageDiff"]


# ---------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------
@dataclass
class StageDiff:
    """One pass applied to one graph: its nodes before/after (one line each) and who made what."""

    graph_id: str
    pass_name: str
    before: list  # one line per node, e.g. "mm_3 = aten.mm.default(permute_2, view_1)  # (16, 32)"
    after: list
    created: dict  # node name -> weight (made by this pass)
    erased: dict  # node name -> weight
    disabled: bool = False
    before_nodes: tuple = field(default=(), repr=False)  # NodeSnapshot per line of ``before``
    after_nodes: tuple = field(default=(), repr=False)

    def name_of(self, line: str) -> Optional[str]:
        """The node a line of ``before`` or ``after`` shows."""
        if not hasattr(self, "_names"):
            self._names = {n.line: n.name for n in self.before_nodes + self.after_nodes}
        return self._names.get(line)

    @property
    def modified(self) -> bool:
        return self.before != self.after

    def unified(self) -> list:
        """Unified diff lines; created/erased node lines end with their pass and weight."""
        lines = difflib.unified_diff(self.before, self.after, f"{self.graph_id} before {self.pass_name}",
                                     f"{self.graph_id} after {self.pass_name}", lineterm="", n=2)
        return [self._annotate(line) for line in lines]

    def _annotate(self, line: str) -> str:
        if line[:1] not in "+-" or line[:3] in ("+++", "---"):
            return line
        name = self.name_of(line[1:])
        made = self.created if line[0] == "+" else self.erased
        if name in made:
            verb = "created" if line[0] == "+" else "erased"
            return f"{line}  # <- {self.pass_name} {verb} ({made[name]})"
        return line


@dataclass
class GraphDiff:
    """One compiled graph: its stages and the op counts before the first pass / after the last."""

    graph_id: str
    kind: str
    stages: list  # [StageDiff]
    ops_before: list  # op summary before the first pass: [(op, shape, made_by)]
    ops_after: list  # after the last pass
    weight_shapes: list = field(default_factory=list, repr=False)

    def counts(self, which: str = "after") -> collections.Counter:
        """Op counts keyed ``"mm"`` or ``"mm (m x n)"`` (output shaped like a projected weight)."""
        ops = self.ops_before if which == "before" else self.ops_after
        return collections.Counter(_op_key(op, shape, self.weight_shapes) for op, shape, _ in ops)

    def changed_counts(self) -> list:
        """``[(key, before, after)]`` for every op key whose count changed."""
        before, after = self.counts("before"), self.counts("after")
        keys = sorted(set(before) | set(after))
        return [(k, before[k], after[k]) for k in keys if before[k] != after[k]]

    @property
    def modified(self) -> bool:
        return any(st.modified for st in self.stages)


class Diff:
    """What every pass did to every compiled graph of a model (see :func:`diff`)."""

    def __init__(self, graphs: list):
        self.graphs = graphs  # [GraphDiff]

    def __str__(self) -> str:
        changed = sum(g.modified for g in self.graphs)
        out = [f"grassfx diff: {len(self.graphs)} graph(s) compiled, {changed} changed by a pass", ""]
        for g in self.graphs:
            out += _graph_text(g)
        return "\n".join(out)

    def to_html(self, path) -> str:
        """Write one self-contained side-by-side HTML page to ``path``; return the path.

        Created nodes are green, erased nodes red, other changed lines yellow.

        Example:
            >>> grassfx.diff(model).to_html("diff.html")  # doctest: +SKIP
            'diff.html'
        """
        with open(path, "w", encoding="utf-8") as f:
            f.write(render.html_page(self))
        return str(path)

    def to_dot(self) -> str:
        """A DOT digraph of the changed region: created/erased nodes and their neighbours.

        One cluster per graph and pass; created nodes green, erased red, neighbours grey.
        Render with ``dot -Tsvg`` (graphviz is not needed to produce the text).

        Example:
            >>> print(grassfx.diff(model).to_dot())  # doctest: +SKIP
            digraph grassfx_diff { ...
        """
        return render.dot_text(self)

    def to_dict(self) -> dict:
        """A JSON-serialisable summary: per graph, the changed op counts and each pass's nodes."""
        return {"graphs": [{
            "graph_id": g.graph_id, "kind": g.kind,
            "op_counts": [{"op": k, "before": b, "after": a} for k, b, a in g.changed_counts()],
            "stages": [{"pass": st.pass_name, "disabled": st.disabled, "created": st.created, "erased": st.erased}
                       for st in g.stages],
        } for g in self.graphs]}


def diff(model) -> Diff:
    """Before/after of each pass on each compiled graph of a grassfx model.

    Args:
        model: a model from :func:`grassfx.compile` with ``record=True`` (or compiled
            under ``GRASSFX_DEBUG>=1``) that ran at least one compiled training step, or
            a :class:`Report` from :func:`explain` (its compiled copy records always).

    Returns:
        A :class:`Diff`: ``str(d)`` is text (unified diffs with every created/erased node
        attributed to its pass and weight, and op counts such as ``mm (m x n): 7 -> 0``);
        ``d.to_html(path)`` writes a side-by-side page; ``d.to_dot()`` is a DOT graph.

    Raises:
        ConfigError: ``model`` is not a grassfx model or report.
        GrassError: nothing was compiled (or recorded) yet.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(16, 64), rank=8, backend="aot_eager", record=True)
        >>> model(torch.randn(4, 16)).sum().backward()   # the refresh step
        >>> model(torch.randn(4, 16)).sum().backward()   # a normal step: the rewritten graph
        >>> d = grassfx.diff(model)
        >>> [c for g in d.graphs for c in g.changed_counts() if c[0].startswith("mm")]
        [('mm', 0, 1), ('mm (m x n)', 1, 0)]
    """
    records, shapes = _diff_source(model)
    result = Diff([_graph_diff(rec, shapes) for rec in records])
    trace_artifact("grassfx_diff", result)
    return result


def _diff_source(model) -> tuple:
    """``(graph records, projected weight shapes)`` of a model or an explain report."""
    if isinstance(model, Report):
        if model.stats is None or model.stats.records is None or not len(model.stats.records):
            raise GrassError("this report has no compiled graphs (backend='eager'): explain a model "
                             "compiled with backend='aot_eager' or 'inductor'")
        return list(model.stats.records), model.projected_shapes
    require_grass_model(model, "diff")
    report = model.compile_report
    if report is None:
        raise GrassError("grassfx.diff() needs compiled graphs, but this model was made with backend='eager'; "
                         "use grassfx.compile(..., backend='aot_eager') or 'inductor'")
    if not report.frames:
        raise GrassError("no graph was compiled yet: run one training step (forward and backward) first, "
                         "or call grassfx.diff(grassfx.explain(model, *example_inputs))")
    if report.records is None:
        raise GrassError("this model was compiled without recording what the passes did: compile it with "
                         "grassfx.compile(..., record=True) (or GRASSFX_DEBUG=1), or call "
                         "grassfx.diff(grassfx.explain(model, *example_inputs)), which records a copy")
    if not len(report.records):
        raise GrassError("no pass ran in this process: Inductor served every graph from its FX graph cache; "
                         "call grassfx.diff(grassfx.explain(model, *example_inputs)), which compiles a copy "
                         "with the caches off")
    return list(report.records), projected_shapes(model)


def _graph_diff(record, shapes: list) -> GraphDiff:
    stages = []
    for stage in record.stages:
        created, erased = {}, {}
        for change in stage.result.changes:
            created.update(dict.fromkeys(change.created, change.weight))
            erased.update(dict.fromkeys(change.erased, change.weight))
        stages.append(StageDiff(record.graph_id, stage.pass_name, [n.line for n in stage.before],
                                [n.line for n in stage.after], created, erased, bool(stage.result.disabled),
                                stage.before, stage.after))
    first, last = record.stages[0], record.stages[-1]
    return GraphDiff(record.graph_id, record.kind, stages, list(first.ops_before), list(last.ops_after), shapes)


def _op_key(op: str, shape, weight_shapes: list) -> str:
    return f"{op} (m x n)" if _is_weight_shaped(shape, weight_shapes) else op


def _is_weight_shaped(shape, weight_shapes: list) -> bool:
    """True when ``shape`` (leading 1s dropped) is a projected weight's shape or its transpose."""
    if not shape:
        return False
    dims = list(shape)
    while len(dims) > 2 and dims[0] == 1:
        dims.pop(0)
    dims = tuple(dims)
    return any(dims in (ws, ws[::-1]) for ws in weight_shapes)


# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------
def _graph_text(g: GraphDiff) -> list:
    out = [f"=== {g.graph_id} ({g.kind}) ==="]
    for st in g.stages:
        if st.disabled:
            out.append(f"--- {st.pass_name}: disabled (GRASSFX_DISABLE)")
        elif not st.modified:
            out.append(f"--- {st.pass_name}: no change")
        else:
            out.append(f"--- {st.pass_name}: {len(st.created)} node(s) created, {len(st.erased)} erased")
            out += st.unified()
    counts = g.changed_counts()
    if counts:
        out.append("op counts:")
        width = max(len(k) for k, _, _ in counts)
        out += [f"  {k.ljust(width)}: {b} -> {a}" for k, b, a in counts]
    out.append("")
    return out
