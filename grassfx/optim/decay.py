"""Decoupled weight decay of projected weights: its rules live on the ground floor,
:mod:`grassfx.core.decay` (the model settles owed decay with them too)."""

from __future__ import annotations

from grassfx.core.decay import decay_rows, decay_selected, owe, settle

__all__ = ["decay_rows", "decay_selected", "owe", "settle"]
