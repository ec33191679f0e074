"""Validated settings of one ``grassfx.compile`` call."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .select import EXPLORING, SELECTORS

__all__ = ["GrassConfig", "PROJ_DIMS", "BACKENDS", "MOMENT_POLICIES", "REFRESH_MODES"]

PROJ_DIMS = ("auto", "rows", "cols", "smaller")
BACKENDS = ("inductor", "aot_eager", "eager")
MOMENT_POLICIES = ("reset", "keep_overlap")
REFRESH_MODES = ("eager", "compiled")  # how a compiled model runs its refresh steps
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def _check_blocks(blocks: Any) -> None:
    """``blocks=``: None, False, or {glob: a list of block sizes, or None/False/[] for no blocks}."""
    if blocks is None or blocks is False:
        return
    if not isinstance(blocks, dict):
        raise ConfigError(
            f"blocks={blocks!r}: expected None (detect fused q|k|v and gate|up weights), False (never "
            "split) or a dict {name glob: [block sizes along the selected dim] or None (no blocks)}"
        )
    for glob, sizes in blocks.items():
        if not isinstance(glob, str) or not glob:
            raise ConfigError(f"blocks={{{glob!r}: ...}}: keys are parameter or module name globs (str)")
        if sizes is None or sizes is False:
            continue
        if (not isinstance(sizes, (list, tuple)) or
                any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sizes)):
            raise ConfigError(
                f"blocks[{glob!r}]={sizes!r}: expected a list of block sizes (ints >= 1) that sum to the "
                "weight's selected dim, or None for no blocks"
            )


@dataclass(frozen=True)
class GrassConfig:
    """Everything ``grassfx.compile`` was asked for, checked once."""

    rank: Any = 256
    selection: str = "top_r"
    update_freq: int = 200
    scale: float = 1.0
    proj_dim: str = "auto"
    seed: int = 0
    backend: str = "inductor"
    mode: Any = None
    moments: str = "reset"
    explore: float = 0.0
    dynamic: Any = None
    compile_options: dict = field(default_factory=dict)
    data_parallel: Any = None  # None: when torch.distributed is initialised; False: never
    record: bool = False  # keep node snapshots before/after each pass (grassfx.diff)
    refresh: str = "eager"  # how compiled models run refresh steps: "eager" or "compiled"
    blocks: Any = None  # fused-weight block layouts: None (detect), False (none), {glob: sizes | None}

    def __post_init__(self):
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, numbers.Real)):
            raise ConfigError(
                f"rank={rank!r}: expected an int >= 1 (rows kept per weight) or a float in (0, 1] "
                "(a fraction of the rows)"
            )
        if isinstance(rank, numbers.Integral):
            if rank < 1:
                raise ConfigError(f"rank={rank}: must be >= 1 (or a float fraction in (0, 1])")
        elif not (0.0 < float(rank) <= 1.0) or math.isnan(float(rank)):
            raise ConfigError(f"rank={rank}: a float rank is a fraction of the rows and must lie in (0, 1]")
        _check_choice("selection", self.selection, SELECTORS)
        _check_choice("proj_dim", self.proj_dim, PROJ_DIMS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("moments", self.moments, MOMENT_POLICIES)
        _check_choice("refresh", self.refresh, REFRESH_MODES)
        if isinstance(self.update_freq, bool) or not isinstance(self.update_freq, numbers.Integral):
            raise ConfigError(f"update_freq={self.update_freq!r}: expected an int >= 1")
        if self.update_freq < 1:
            raise ConfigError(f"update_freq={self.update_freq}: must be >= 1 (steps between refreshes)")
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale):
            raise ConfigError(f"scale={self.scale!r}: expected a finite float (the update scale alpha)")
        if self.scale <= 0:
            raise ConfigError(f"scale={self.scale!r}: must be > 0 (a negative scale would ascend the loss)")
        explore = self.explore
        if isinstance(explore, bool) or not isinstance(explore, numbers.Real) or not (0.0 <= float(explore) < 1.0):
            raise ConfigError(f"explore={explore!r}: expected a float in [0, 1) (the share of each rank "
                              "given to the rows unselected longest)")
        if explore and self.selection not in EXPLORING:
            raise ConfigError(f"explore={explore!r} needs selection in {sorted(EXPLORING)}, "
                              f"not {self.selection!r}")
        if self.data_parallel not in (None, True, False):
            raise ConfigError(f"data_parallel={self.data_parallel!r}: expected None (auto), True or False")
        if self.mode is not None:
            _check_choice("mode", self.mode, COMPILE_MODES)
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise ConfigError(f"dynamic={self.dynamic!r}: expected None (let torch.compile decide), True or False")
        if not isinstance(self.record, bool):
            raise ConfigError(f"record={self.record!r}: expected True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ConfigError(f"seed={self.seed!r}: expected an int")
        _check_blocks(self.blocks)

    def rows_kept(self, rows: int) -> int:
        """The number of rows ``r`` kept out of ``rows`` (``rank >= rows`` keeps all)."""
        if isinstance(self.rank, numbers.Integral):
            return min(int(self.rank), rows)
        return max(1, min(rows, math.ceil(float(self.rank) * rows)))

    def explored(self, rank: int) -> int:
        """How many of ``rank`` rows go to the rows unselected longest (``explore``)."""
        if not self.explore:
            return 0
        return min(rank - 1, max(1, round(float(self.explore) * rank))) if rank > 1 else 0

    def select_dim(self, shape: tuple) -> int:
        """Which dim of a 2-D weight is sampled: 0 (rows) or 1 (columns)."""
        if self.proj_dim == "rows":
            return 0
        if self.proj_dim == "cols":
            return 1
        if self.proj_dim == "smaller":  # r of min(m, n) kept: more of W trained per window
            return 0 if shape[0] <= shape[1] else 1
        return 0 if shape[0] >= shape[1] else 1  # auto: r of max(m, n), the smallest state
