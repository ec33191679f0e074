"""The grassfx error hierarchy.

Every error grassfx raises derives from :class:`GrassError`. Bad arguments raise
:class:`ConfigError`, which is also a :class:`ValueError`, so ``except ValueError``
keeps working for callers that do not know grassfx.
"""

from __future__ import annotations

__all__ = [
    "GrassError",
    "ConfigError",
    "UnsupportedModelError",
    "PassError",
    "OptimizerMisuseError",
    "NonFiniteGradientError",
    "LostGradientError",
    "ModelChangedError",
]


class GrassError(Exception):
    """Base class of every error raised by grassfx."""


class ConfigError(GrassError, ValueError):
    """A bad argument: the message names the argument and the allowed values."""


class UnsupportedModelError(GrassError):
    """The model cannot be instrumented (for example: it has no target weights)."""


class PassError(GrassError):
    """A compiler pass failed; the message names the pass, the graph node (or graph) and a way out."""

    def __init__(self, pass_name: str, node, message: str, graph=None):
        where = f"at node {node!r}" if node is not None else ""
        if graph is not None:
            where = f"{where} of graph {graph}" if where else f"in graph {graph}"
        super().__init__(
            f"[{pass_name}] {where}: {message} (set GRASSFX_DISABLE={pass_name} to compile without this pass)"
        )
        self.pass_name = pass_name
        self.node = node
        self.graph = graph


class OptimizerMisuseError(GrassError):
    """The model is being stepped in a way that would silently train nothing."""


class NonFiniteGradientError(GrassError, FloatingPointError):
    """A gradient held NaN or Inf; no weight was modified."""


class LostGradientError(GrassError):
    """A forward used the projected weights but their gradients never reached grassfx; no weight was changed."""


class ModelChangedError(GrassError):
    """The model was changed after ``grassfx.compile`` in a way the compiled model cannot follow
    (a projected module or weight replaced); the message names it and says how to go on."""
