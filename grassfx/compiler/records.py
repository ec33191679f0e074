"""Opt-in, bounded records of what each pass did: node snapshots before and after.

Off by default: an ordinary compile keeps only the small
:class:`~grassfx.compiler.report.CompileReport`. With ``grassfx.compile(...,
record=True)``, with ``GRASSFX_DEBUG>=1``, or in the copy that ``grassfx.explain``
compiles, a :class:`Recorder` keeps, for the last ``max_graphs`` graphs, a
:class:`Stage` per pass: a :class:`NodeSnapshot` of every node before and after (taken
once when a pass changed nothing), which ``grassfx.diff`` renders as text, HTML or DOT
without re-parsing any code. ``GRASSFX_DUMP_DIR`` writes the graph code of every stage
to numbered files (``NNN_<graph>_<pass>.before.py / .after.py / .diff``).
"""

from __future__ import annotations

import collections
import difflib
import itertools
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

__all__ = ["NodeSnapshot", "Stage", "GraphRecord", "Recorder", "snapshot", "dump", "MAX_GRAPHS"]

MAX_GRAPHS = 64  # graphs a Recorder keeps (the oldest are dropped first)
_DUMP_COUNTER = itertools.count()


@dataclass(frozen=True)
class NodeSnapshot:
    """One graph node as a pass left it."""

    name: str
    op: str  # call_function target as "mm", "grassfx.rowsel", ...; "input", "output", "get_attr"
    target: str  # full label, e.g. "aten.mm.default"
    inputs: tuple  # names of the nodes it reads
    shape: Optional[tuple]  # output shape (None for non-tensors)
    made_by: Optional[str]  # "sparsify_wgrad:<weight>" for nodes a pass created, else None
    line: str  # one readable line: "mm_3 = aten.mm.default(permute_2, view_1)  # (16, 32)"

    @property
    def is_op(self) -> bool:
        return self.op not in ("input", "output", "get_attr")


def _shape(node: fx.Node) -> Optional[tuple]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(int(s) if isinstance(s, int) else str(s) for s in val.shape)


def _target_label(target) -> str:
    if isinstance(target, str):
        return target
    return str(target) if hasattr(target, "overloadpacket") else getattr(target, "__name__", str(target))


def _fmt(arg) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    return repr(arg)


def _snapshot_node(node: fx.Node) -> NodeSnapshot:
    inputs = tuple(n.name for n in node.all_input_nodes)
    tag = node.meta.get("grassfx")
    made_by = f"{tag['pass']}:{tag['weight']}" if tag else None
    shape = _shape(node)
    if node.op == "placeholder":
        return NodeSnapshot(node.name, "input", "input", (), shape, None, f"{node.name} = input()")
    if node.op == "output":
        return NodeSnapshot(node.name, "output", "output", inputs, None, None, f"return {_fmt(node.args[0])}")
    if node.op != "call_function":
        return NodeSnapshot(node.name, node.op, str(node.target), inputs, shape, made_by, f"{node.name} = {node.op}({node.target})")
    target = node.target
    op = str(getattr(target, "overloadpacket", _target_label(target))).replace("aten.", "")
    args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
    line = f"{node.name} = {_target_label(target)}({', '.join(args)})"
    if shape is not None:
        line += f"  # {shape}"
    return NodeSnapshot(node.name, op, _target_label(target), inputs, shape, made_by, line)


def snapshot(graph: fx.Graph) -> tuple:
    """A :class:`NodeSnapshot` of every node of ``graph``, in order."""
    return tuple(_snapshot_node(n) for n in graph.nodes)


def _ops(nodes: tuple) -> list:
    return [(n.op, n.shape, n.made_by) for n in nodes if n.is_op]


@dataclass
class Stage:
    """One pass applied to one graph: the nodes before and after, and the pass's result."""

    pass_name: str
    before: tuple  # (NodeSnapshot, ...)
    after: tuple
    result: object  # the PassResult (without its graph)

    @property
    def ops_before(self) -> list:
        """``[(op, shape, made_by)]`` of every call_function node before the pass."""
        return _ops(self.before)

    @property
    def ops_after(self) -> list:
        return _ops(self.after)


@dataclass
class GraphRecord:
    """Every stage of one compiled graph."""

    graph_id: str
    kind: str
    stages: list = field(default_factory=list)  # [Stage]


class Recorder:
    """Keeps the :class:`GraphRecord` of the last ``max_graphs`` graphs compiled."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self.graphs = collections.deque(maxlen=max_graphs)
        self.seen = 0  # graphs recorded in all (older ones beyond max_graphs are gone)

    def begin(self, graph_id: str, kind: str) -> GraphRecord:
        record = GraphRecord(graph_id, kind)
        self.graphs.append(record)
        self.seen += 1
        return record

    def __iter__(self):
        return iter(self.graphs)

    def __len__(self) -> int:
        return len(self.graphs)


def graph_code(graph: fx.Graph) -> str:
    try:
        return graph.python_code("self").src
    except Exception:  # pragma: no cover - a graph python_code cannot print
        return str(graph)


def dump(graph_id: str, pass_name: str, before: str, after: str, dump_dir: str) -> None:
    """Write one stage's code before/after and their unified diff to numbered files."""
    os.makedirs(dump_dir, exist_ok=True)
    stem = os.path.join(dump_dir, f"{next(_DUMP_COUNTER):03d}_{graph_id}_{pass_name}")
    with open(stem + ".before.py", "w") as f:
        f.write(before)
    with open(stem + ".after.py", "w") as f:
        f.write(after)
    with open(stem + ".diff", "w") as f:
        f.writelines(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "before", "after"))
