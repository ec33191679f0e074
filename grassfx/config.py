"""Validated settings of one ``grassfx.compile`` call: the one home of their defaults and docs.

:class:`Selection` (which rows train) and :class:`Refresh` (when and how they change) group
``compile``'s keywords where they belong; :data:`OPTION_DOCS` describes every keyword once
(``grassfx.compile``'s docstring is built from it); :class:`GrassConfig` holds the checked
result.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .select import EXPLORING, SELECTORS

__all__ = ["GrassConfig", "Selection", "Refresh", "OPTION_DOCS", "grouped", "PROJ_DIMS", "BACKENDS",
           "MOMENT_POLICIES", "REFRESH_MODES"]

PROJ_DIMS = ("auto", "rows", "cols", "smaller")
BACKENDS = ("inductor", "aot_eager", "eager")
MOMENT_POLICIES = ("reset", "keep_overlap")
REFRESH_MODES = ("eager", "compiled")  # how a compiled model runs its refresh steps
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)


def option_docs(indent: int) -> str:
    """:data:`OPTION_DOCS` as ``Args:`` entries of a docstring, indented by ``indent`` spaces."""
    import textwrap

    pad = " " * indent
    return "\n".join(textwrap.fill(f"{name}: {text}", 100, initial_indent=pad, subsequent_indent=pad + "    ",
                                   break_on_hyphens=False, break_long_words=False)
                     for name, text in OPTION_DOCS.items())


def grouped(selection: Any, refresh: Any, flat: dict) -> dict:
    """``compile``'s keywords with a :class:`Selection` (given as ``selection``) or a
    :class:`Refresh` (as ``refresh``) spread into them; the keywords a group replaces must be
    left at their defaults (else :class:`grassfx.ConfigError`)."""
    flat = dict(flat, selection=selection, refresh=refresh)
    for group in (selection, refresh):
        if not isinstance(group, (Selection, Refresh)):
            continue
        defaults = type(group)()
        for keyword, attr in group.KEYWORDS.items():
            given = flat.get(keyword)
            if keyword not in ("selection", "refresh") and given != getattr(defaults, attr):
                raise ConfigError(f"{keyword}={given!r} and {type(group).__name__}(...): give {keyword} in one "
                                  "place (inside the group, or as a keyword without the group)")
            flat[keyword] = getattr(group, attr)
    return flat


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
class Selection:
    """Which rows of each weight train: ``grassfx.compile(model, selection=Selection(...))``,
    in place of the keywords ``rank``, ``selection`` (here ``method``), ``proj_dim``,
    ``explore``, ``seed`` and ``blocks`` (:data:`OPTION_DOCS`; checked by ``compile``)."""

    rank: Any = 256
    method: str = "top_r"
    proj_dim: str = "auto"
    explore: float = 0.0
    seed: int = 0
    blocks: Any = None

    #: this group's fields, by ``compile`` keyword
    KEYWORDS = {"rank": "rank", "selection": "method", "proj_dim": "proj_dim", "explore": "explore",
                "seed": "seed", "blocks": "blocks"}


@dataclass(frozen=True)
class Refresh:
    """When and how the selected rows change: ``grassfx.compile(model, refresh=Refresh(...))``,
    in place of the keywords ``update_freq``, ``moments`` and ``refresh`` (here ``mode``)."""

    update_freq: int = 200
    moments: str = "reset"
    mode: str = "eager"

    KEYWORDS = {"update_freq": "update_freq", "moments": "moments", "refresh": "mode"}


#: ``grassfx.compile``'s keywords: what each one means, the one text of its docstring's
#: ``Args:`` (:func:`option_docs`; docs/api.md is generated from that docstring)
OPTION_DOCS = {
    "rank": (
        "rows kept per weight (int >= 1; ``rank >= rows`` keeps all) or a fraction of the rows (float in "
        "(0, 1])."
    ),
    "selection": (
        "``\"top_r\"``, ``\"multinorm\"``, ``\"multinorm_nr\"`` or ``\"uniform\"``. Or a "
        ":class:`grassfx.Selection` grouping ``rank``, the selector (``method``), ``proj_dim``, "
        "``explore``, ``seed`` and ``blocks``; the keywords it groups must then stay at their defaults."
    ),
    "update_freq": (
        "optimizer steps between refreshes of the selected rows."
    ),
    "scale": (
        "the update scale alpha applied by grassfx.optim."
    ),
    "proj_dim": (
        "``\"rows\"`` (dim 0 of the weight), ``\"cols\"`` (dim 1), ``\"auto\"`` (the larger dim, which keeps "
        "the optimizer state smallest: r x min(m, n)) or ``\"smaller\"`` (the smaller dim, as GaLore "
        "projects: r of min(m, n) rows or columns train per window, state r x max(m, n))."
    ),
    "targets / exclude": (
        "name globs or predicates ``f(name, param)`` choosing weights (``targets=None``: automatic; "
        "``targets=[]`` is an error). Frozen weights (``requires_grad=False``) are never projected."
    ),
    "seed": (
        "seeds the stochastic selectors (same seed -> same rows in every process)."
    ),
    "backend": (
        "``\"inductor\"`` (compiled, rewritten), ``\"aot_eager\"`` (rewritten graphs without Inductor) or "
        "``\"eager\"`` (no compilation; dense fallback)."
    ),
    "mode": (
        "passed to ``torch.compile`` (``None``, ``\"default\"``, ``\"reduce-overhead\"``, ``\"max-autotune\"`` "
        "or ``\"max-autotune-no-cudagraphs\"``)."
    ),
    "moments": (
        "``\"reset\"`` (zero optimizer moments at a refresh) or ``\"keep_overlap\"`` (keep the moments, and "
        "the per-row step counts, of rows selected before and after; new rows start fresh)."
    ),
    "explore": (
        "share of each rank (a float in [0, 1)) given, at every refresh, to the rows that went unselected "
        "longest (``top_r`` and ``multinorm_nr``), so every row trains now and then; 0 selects by the "
        "selector alone."
    ),
    "dynamic": (
        "passed to ``torch.compile`` (``None``, ``True`` or ``False``)."
    ),
    "options": (
        "extra Inductor options passed to ``torch.compile``."
    ),
    "data_parallel": (
        "``None`` (default): average gradients across ranks whenever ``torch.distributed`` is initialised "
        "with more than one process, sending only compressed gradients for projected weights (see "
        "``grassfx.distributed``); ``False``: never communicate."
    ),
    "record": (
        "keep node snapshots of every compiled graph before and after each pass (for "
        "``grassfx.diff(model)``); off by default (compile time and memory). ``GRASSFX_DEBUG>=1`` turns "
        "it on too."
    ),
    "refresh": (
        "how a compiled model runs its refresh steps (one every ``update_freq`` steps, where the dense "
        "gradients pick the rows): ``\"eager\"`` (default: no second graph to compile, so compiling costs "
        "about what ``torch.compile`` costs; each weight's dense gradient is reduced to row norms and "
        "freed as soon as it is produced) or ``\"compiled\"`` (a refresh graph of its own, compiled with "
        "``backend``). Both pick the same rows. Or a :class:`grassfx.Refresh` grouping "
        "``update_freq``, ``moments`` and this mode (``mode``); the keywords it groups must then stay at "
        "their defaults."
    ),
    "blocks": (
        "fused weights (q|k|v, gate|up) select rows per logical block, each block getting its share of "
        "the rank. ``None`` (default): detect the layouts of Hugging Face and ``nn.MultiheadAttention`` "
        "fused weights (docs/layouts.md); ``False``: never split; a dict ``{name glob: [sizes] or None}`` "
        "sets the block sizes along the selected dim of the weights a glob matches (``None``: no blocks), "
        "others are detected. A glob that matches no projected weight, or sizes that do not sum to the "
        "selected dim, raise :class:`ConfigError`."
    ),
}


@dataclass(frozen=True)
class GrassConfig:
    """Everything ``grassfx.compile`` was asked for, checked once."""

    rank: Any = Selection.rank
    selection: str = Selection.method
    update_freq: int = Refresh.update_freq
    scale: float = 1.0
    proj_dim: str = Selection.proj_dim
    seed: int = Selection.seed
    backend: str = "inductor"
    mode: Any = None
    moments: str = Refresh.moments
    explore: float = Selection.explore
    dynamic: Any = None
    compile_options: dict = field(default_factory=dict)
    data_parallel: Any = None  # None: when torch.distributed is initialised; False: never
    record: bool = False  # keep node snapshots before/after each pass (grassfx.diff)
    refresh: str = Refresh.mode  # how compiled models run refresh steps: "eager" or "compiled"
    blocks: Any = Selection.blocks  # fused-weight block layouts: None (detect), False (none), {glob: sizes | None}

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
