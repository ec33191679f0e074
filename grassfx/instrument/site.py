"""``Site``: the Grass state of one projected weight.

A target weight ``W`` (m x n) is frozen and gets

* ``handle`` — a zero parameter of the compressed gradient's shape ((r, n) for row
  selection, (m, r) for columns); its ``.grad`` receives ``C = rho * G[idx]``,
* ``idx`` / ``rho`` — buffers: the selected rows and their scales,
* ``decay_pending`` — decoupled weight decay owed by rows outside ``idx`` (see
  :mod:`grassfx.optim.decay`),
* ``last_seen`` — the step at which each of the ``rows`` rows was last selected (-1:
  never); coverage (``explore``) reads it as each row's age,
* ``block_labels`` — for a fused weight (q|k|v, gate|up; :mod:`.blocks`), each row's
  block, int64 (rows,), with ``blocks`` = static ``(size, quota, explore)`` per block:
  every refresh selects exactly ``quota`` rows of each block. ``None`` otherwise. Not
  saved in ``state_dict`` (the layout is configuration, rebuilt by ``grassfx.compile``).

What an optimizer may use: ``weight``, ``handle``, ``idx``, ``rho``, ``dim``, ``rows``,
``rank``, ``full``, ``method``, ``scale``, ``moments``, ``refreshed`` / ``prev_idx`` (a committed
refresh the optimizer has not handled yet) and ``schedule`` (the model's step counter).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from grassfx import _compat, fsdp
from grassfx import select as _select
from grassfx.config import GrassConfig

from .blocks import LayoutChoice
from .targets import TargetSpec

__all__ = ["Site"]


class Site(nn.Module):
    """Grass state of one projected weight (see the module docstring)."""

    trainable = True  # False while the user has frozen the weight (see .surgery)

    def __init__(self, spec: TargetSpec, index: int, weight: torch.Tensor, config: GrassConfig,
                 layout: LayoutChoice | None = None):
        super().__init__()
        self.name = spec.name
        self.module_name = spec.module_name
        self.attr = spec.attr
        self.kind = spec.kind
        self.index = index
        self.method = config.selection
        self.scale = float(config.scale)
        self.moments = config.moments
        dev = weight.device
        handle, selection, rows = self._geometry(weight, config)
        self.handle = nn.Parameter(torch.zeros(handle, dtype=weight.dtype, device=dev))
        self.register_buffer("idx", torch.arange(self.rank, device=dev).repeat(*selection[:-1], 1))
        self.register_buffer("rho", torch.ones(selection, device=dev))
        self.register_buffer("decay_pending", torch.ones((), dtype=torch.float64, device=dev))
        self.register_buffer("last_seen", torch.full(rows, -1, dtype=torch.int64, device=dev))
        self._set_blocks(layout or LayoutChoice(None), weight.device)
        self.prev_idx = None  # rows selected before the last refresh (set when one commits)
        self.refreshed = False  # a refresh committed and the optimizer has not seen it yet
        self.handle_version = _compat.version(self.handle)
        self.schedule = None  # the model's RefreshSchedule (set by link)
        self._owner = None  # weakref to the module that owns the weight (set by link)

    def _geometry(self, weight: torch.Tensor, config: GrassConfig):
        """Set ``dim``, ``rows``, ``rank``, ``full``, ``explore``, ``sharded``; return the shapes
        ``(handle, selection, rows)``: of the handle, of ``idx``/``rho``, of ``last_seen``."""
        self.dim = config.select_dim(tuple(weight.shape))
        self.rows = int(weight.shape[self.dim])
        self.rank = config.rows_kept(self.rows)
        self.full = self.rank >= self.rows
        self.explore = config.explored(self.rank) if not self.full else 0  # rows reserved for coverage
        self.sharded = fsdp.is_dtensor(weight)  # an FSDP2 shard when grassfx.compile ran
        shape = list(weight.shape)
        shape[self.dim] = self.rank
        return tuple(shape), (self.rank,), (self.rows,)

    #: an expert stack (:class:`~grassfx.instrument.experts.ExpertSite`): rows of each expert
    per_expert = False

    def matrix(self):
        """What an optimizer updates: the site as a 2-D weight with rows ``idx`` along ``dim``
        (itself; an expert stack answers with its (E*m, n) view)."""
        return self

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a handle-shaped tensor) as :meth:`matrix`'s rules see it: unchanged here."""
        return t

    def _set_blocks(self, choice: LayoutChoice, device) -> None:
        """Install a block layout: labels, names and per-block ``(size, quota, explore)``."""
        layout, self.block_note = choice.layout, choice.note
        if layout is not None and (self.full or self.rank < len(layout.names)):
            why = "every row kept" if self.full else f"rank {self.rank} < {len(layout.names)} blocks"
            layout, self.block_note = None, f"{layout.describe()}: {why}, selection over the whole weight"
        self.layout = layout
        self.blocks = None
        labels = None
        if layout is not None:
            quotas = _select.split_rank(self.rank, layout.sizes)
            explores = [min(e, q - 1) for e, q in zip(_select.split_rank(self.explore, quotas), quotas)]
            self.explore = sum(explores)  # a block's quota keeps at least one selected row
            self.blocks = tuple(zip(layout.sizes, quotas, explores))
            labels = layout.labels(device)
        self.register_buffer("block_labels", labels, persistent=False)

    def link(self, owner: nn.Module, schedule) -> None:
        """Point this site at the module owning its weight and at the model's schedule."""
        self._owner = weakref.ref(owner)
        self.schedule = schedule

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_owner"] = state["schedule"] = None  # weak references: the model links them again
        return state

    @property
    def weight(self) -> torch.Tensor:
        """The projected weight itself (the Parameter, never an anchored view)."""
        return _compat.raw_parameter(self._owner(), self.attr)

    @property
    def needs_norms(self) -> bool:
        return not self.full and self.method in _select.NEEDS_NORMS

    def extra_repr(self) -> str:
        axis = "rows" if self.dim == 0 else "cols"
        split = "" if self.blocks is None else f", blocks={[q for _, q, _ in self.blocks]}"
        return f"{self.name!r}, {axis} {self.rank}/{self.rows}, selection={self.method}{split}"

    def commit(self, idx: torch.Tensor, rho: torch.Tensor, step: int) -> None:
        """Install a new selection (called by a refresh at optimizer step ``step``)."""
        if not self.refreshed:  # a redone refresh keeps the rows of before the first
            self.prev_idx = self.idx.clone()
        with torch.no_grad():
            self.idx.copy_(idx.to(self.idx.device))
            self.rho.copy_(rho.to(self.rho.device))
            self.last_seen.index_fill_(0, self.idx, step)
        self.refreshed = True

    def ages(self, step: int) -> torch.Tensor:
        """Steps since each row was last selected (never selected: ``step + 1``), float64 (rows,)."""
        return (step - self.last_seen).to(torch.float64)

    #: buffers whose dtype does not follow the model's: the decay debt (float64: in bf16,
    #: 0.999 rounds to 1 and rows outside the selection would never decay) and rho
    #: (float32, as made for a weight of any dtype)
    _FIXED_DTYPES = {"decay_pending": torch.float64, "rho": torch.float32}

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.bfloat16()``, ...: buffers move, but keep :attr:`_FIXED_DTYPES`."""
        before = {name: getattr(self, name) for name in self._FIXED_DTYPES}
        result = super()._apply(fn, recurse)
        for name, dtype in self._FIXED_DTYPES.items():
            moved = getattr(self, name)
            if moved.dtype != dtype:  # the old values, not the rounded ones
                setattr(self, name, before[name].to(device=moved.device, dtype=dtype))
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "last_seen"
        if key not in state_dict:  # a checkpoint from before coverage tracking: nothing seen yet
            state_dict = dict(state_dict)
            state_dict[key] = torch.full_like(self.last_seen, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
