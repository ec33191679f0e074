"""Pass infrastructure: results, context, settings, node helpers.

A pass is a plain function ``verb_object(graph, ctx) -> PassResult``. It says honestly
whether it modified the graph, lists the changes it made and the sites it skipped with
a short fixed reason. "Didn't match" is data, not an exception.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from grassfx import _compat

__all__ = [
    "Change", "Skip", "PassResult", "PassContext", "Settings", "settings",
    "norm_args", "meta_val", "make_node", "graph_fake_mode", "same_size", "ALL_REDUCE",
]

#: ``Change.action`` of a compressed gradient averaged across ranks inside the graph
#: (the data-parallel reducer reads it from the compile report and skips that gradient).
ALL_REDUCE = "all_reduce"


@dataclass
class Change:
    """One thing a pass did to a graph."""

    weight: str
    action: str  # e.g. "rewrote", "fallback", ALL_REDUCE
    detail: str = ""
    created: list = field(default_factory=list)  # names of created nodes
    erased: list = field(default_factory=list)  # names of erased nodes


@dataclass
class Skip:
    """A site a pass looked at and left alone (the graph stays correct)."""

    weight: str
    node: str
    reason: str  # a short fixed phrase, e.g. "not a GEMM: aten.cumsum"


@dataclass
class PassResult:
    """What one pass did to one graph."""

    pass_name: str
    graph: fx.Graph
    modified: bool = False
    changes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    disabled: bool = False


@dataclass
class PassContext:
    """Per-graph information handed to every pass."""

    graph_id: str  # e.g. "g0.backward"
    kind: str  # "forward" | "backward" | "inference" | "unknown"
    settings: "Settings"
    group_name: Optional[str] = None  # process group of data-parallel training, if any
    world_size: int = 1
    bucket_bytes: int = 25 * 2**20


@dataclass(frozen=True)
class Settings:
    """The ``GRASSFX_*`` environment knobs, read once per process.

    * ``GRASSFX_DEBUG``: 0 (default), 1 (verify each graph after each pass), 2 (also log).
    * ``GRASSFX_DISABLE``: comma-separated pass names to skip, e.g. ``sparsify_wgrad``.
    * ``GRASSFX_DUMP_DIR``: a folder for numbered ``NNN_<pass>.before.py/.after.py/.diff``.
    """

    debug: int = 0
    disabled: frozenset = frozenset()
    dump_dir: Optional[str] = None

    @staticmethod
    def from_env(env=None) -> "Settings":
        env = os.environ if env is None else env
        raw = env.get("GRASSFX_DEBUG", "0").strip() or "0"
        try:
            debug = int(raw)
        except ValueError:
            from grassfx.errors import ConfigError

            raise ConfigError(f"GRASSFX_DEBUG={raw!r}: expected 0, 1 or 2") from None
        disabled = frozenset(p.strip() for p in env.get("GRASSFX_DISABLE", "").split(",") if p.strip())
        return Settings(debug=debug, disabled=disabled, dump_dir=env.get("GRASSFX_DUMP_DIR") or None)


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings.from_env()


def norm_args(node: fx.Node) -> dict:
    """A node's arguments by schema name (``{"self": ..., "dims": ...}``)."""
    schema = _compat.op_schema(node.target)
    if schema is None:
        raise TypeError(f"{node.format_node()} has no schema")
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def meta_val(x: Any) -> Any:
    """The example value of an FX argument (tensor meta for nodes, the value otherwise)."""
    if isinstance(x, fx.Node):
        return x.meta.get("val")
    if isinstance(x, (list, tuple)):
        return type(x)(meta_val(a) for a in x)
    return x


def make_node(graph: fx.Graph, target, args, kwargs=None, *, provenance: dict, fake_mode=None) -> fx.Node:
    """Create a call_function node with ``meta["val"]`` and a provenance tag."""
    kwargs = kwargs or {}
    node = graph.call_function(target, tuple(args), kwargs)
    vals = [meta_val(a) for a in args]
    kvals = {k: meta_val(v) for k, v in kwargs.items()}
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = target(*vals, **kvals)
    elif all(not isinstance(a, fx.Node) or a.meta.get("val") is not None for a in args):
        node.meta["val"] = target(*vals, **kvals)
    node.meta["grassfx"] = dict(provenance)
    return node


def graph_fake_mode(graph: fx.Graph):
    """The fake mode of the graph's ``meta["val"]`` tensors (new nodes' values are computed under it)."""
    vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return _compat.fake_mode_of(vals)


def same_size(a, b) -> bool:
    """True when two sizes (ints or SymInts) are known to be equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def prod(sizes) -> Any:
    return math.prod(sizes) if sizes else 1
