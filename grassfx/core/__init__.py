"""The ground floor: what instrument, passes and optim share.

* :mod:`.ops` -- the marker ops ``grassfx::rowsel`` and ``grassfx::expertsel`` with their
  fake implementations: the contract between eager mode (instrument) and the compiler
  (passes). The compile cache key hashes this package and the passes, nothing else.
* :mod:`.rows` -- row selection on tensors: ``broadcast_along``, ``select_scaled``,
  ``select_experts``, ``squared_norms``.
* :mod:`.decay` -- decoupled weight decay of projected weights (decay once per row, owed decay).

Nothing here imports instrument, passes, optim or the compiler.
"""

from __future__ import annotations

from . import decay, ops, rows

__all__ = ["decay", "ops", "rows"]
