"""Small helpers shared by explain and diff."""

from __future__ import annotations

from grassfx import _compat
from grassfx.errors import ConfigError
from grassfx.instrument import GrassModel

__all__ = ["require_grass_model", "trace_artifact", "projected_shapes"]


def require_grass_model(model, what: str) -> None:
    """Raise a ConfigError saying how to get a grassfx model when ``model`` is not one."""
    if not isinstance(model, GrassModel):
        raise ConfigError(
            f"grassfx.{what}() takes a model returned by grassfx.compile, got {type(model).__name__}; "
            f"call model = grassfx.compile(model, rank=...) first, then grassfx.{what}(model, ...)"
        )


def trace_artifact(name: str, obj) -> None:
    """Put ``str(obj)`` into a ``TORCH_TRACE`` log (tlparse shows it); free when tracing is off."""
    _compat.trace_artifact(name, lambda: str(obj))


def projected_shapes(model) -> list:
    """The distinct shapes of the projected (not fully kept) weights of a grassfx model."""
    return sorted({tuple(int(s) for s in site.weight.shape) for site in model.sites if not site.full})
