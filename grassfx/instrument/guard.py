"""Misuse detection: an optimizer that is not grassfx-aware stepping a grassfx model.

Gradient handles are zero parameters that only carry ``.grad``; ``grassfx.optim`` never
writes them. A foreign optimizer (``torch.optim.AdamW`` on ``model.parameters()``) steps
them instead of the frozen weights, which would silently train nothing: the next forward
notices a handle written in place that no longer holds zeros, and raises.
"""

from __future__ import annotations

from grassfx import _compat
from grassfx.errors import OptimizerMisuseError

__all__ = ["check_handles_untouched", "snapshot_handle_versions"]


def check_handles_untouched(sites) -> None:
    """Raise :class:`grassfx.OptimizerMisuseError` if a handle was stepped by a foreign optimizer."""
    for site in sites:
        version = _compat.version(site.handle)
        if version == site.handle_version:
            continue
        # written in place since the last check: harmless if it still holds zeros
        # (e.g. DDP's initial broadcast, a device move); a foreign optimizer step leaves nonzeros
        if not bool(site.handle.detach().any()):
            site.handle_version = version
            continue
        raise OptimizerMisuseError(
            f"the gradient handle of {site.name!r} was modified in place: an optimizer that "
            "is not grassfx-aware (e.g. torch.optim.AdamW) is stepping this model's "
            "parameters, which would train none of the projected weights. Use "
            "grassfx.optim.AdamW / SGD / Adafactor with model.parameters()"
        )


def snapshot_handle_versions(sites) -> None:
    """Accept the handles as they are now (after loading a state dict)."""
    for site in sites:
        site.handle_version = _compat.version(site.handle)
