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
]


class GrassError(Exception):
    """Base class of every error raised by grassfx."""


class ConfigError(GrassError, ValueError):
    """A bad argument: the message names the argument and the allowed values."""


class UnsupportedModelError(GrassError):
    """The model cannot be instrumented (for example: it has no target weights)."""


class PassError(GrassError):
    """A compiler pass failed; the message names the pass and the graph node."""

    def __init__(self, pass_name: str, node: str, message: str):
        super().__init__(f"[{pass_name}] at node {node!r}: {message}")
        self.pass_name = pass_name
        self.node = node


class OptimizerMisuseError(GrassError):
    """The model is being stepped in a way that would silently train nothing."""


class NonFiniteGradientError(GrassError, FloatingPointError):
    """A gradient held NaN or Inf; no weight was modified."""
