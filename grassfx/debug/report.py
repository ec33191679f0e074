"""The :class:`Report` that :func:`grassfx.explain` returns, and its text table."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy

__all__ = ["Report", "WeightRow", "Unprojected", "T"]

#: The token count of one step: rows of the activations a weight multiplies.
T = sympy.Symbol("T", positive=True, integer=True)


@dataclass
class WeightRow:
    """One projected weight in a :class:`Report`.

    FLOPs count the weight-gradient GEMM only (``2*T*m*n`` dense; ``2*T*r*n`` when rows
    are selected, ``2*T*m*r`` for columns). Bytes are the stored gradient and the AdamW
    state (two moments), dense vs grassfx.
    """

    name: str
    shape: tuple  # (m, n); (E, m, n) for an expert stack
    rank: int  # r: rows (or columns) kept (of each expert)
    dim: str  # "rows" | "cols" | "rows/expert"
    rewritten: bool
    reason: Optional[str]  # why not rewritten (None when rewritten)
    detail: str  # what the pass did, e.g. "1 dense GEMM(s) -> 1 selected GEMM(s)"
    tokens: Optional[int]  # T for this weight in the example (None: unknown)
    flops_dense: sympy.Expr
    flops_grassfx: sympy.Expr
    grad_bytes_dense: int
    grad_bytes_grassfx: int
    state_bytes_dense: int
    state_bytes_grassfx: int
    blocks: str = ""  # fused weight: its blocks and rows selected per block, or why none ("": not fused)

    def flops(self) -> tuple:
        """``(dense, grassfx)`` FLOPs for the example's token count (None if unknown)."""
        if self.tokens is None:
            return None, None
        return int(self.flops_dense.subs(T, self.tokens)), int(self.flops_grassfx.subs(T, self.tokens))

    def to_dict(self) -> dict:
        """This row as JSON-ready data (formulas as strings)."""
        dense, grass = self.flops()
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "dim": self.dim,
            "rewritten": self.rewritten,
            "reason": self.reason,
            "detail": self.detail,
            "tokens": self.tokens,
            "wgrad_flops": {"dense_formula": str(self.flops_dense), "grassfx_formula": str(self.flops_grassfx),
                            "dense": dense, "grassfx": grass},
            "grad_bytes": {"dense": self.grad_bytes_dense, "grassfx": self.grad_bytes_grassfx},
            "optimizer_state_bytes": {"dense": self.state_bytes_dense, "grassfx": self.state_bytes_grassfx},
            "blocks": self.blocks,
        }


@dataclass
class Unprojected:
    """A parameter grassfx trains densely, and why it is not projected."""

    name: str
    shape: tuple
    reason: str  # "embedding", "tied to an embedding", "1-D (bias/norm)", ...


@dataclass
class Report:
    """What :func:`explain` found. ``str(report)`` is a table; ``to_dict()`` is JSON-ready.

    ``stats`` holds the compiled copy's compile report and records, so ``grassfx.diff(report)`` shows
    the graphs behind the table.
    """

    model: str
    backend: str
    config: dict
    weights: list  # [WeightRow]
    unprojected: list  # [Unprojected]
    frames: int  # Dynamo frames compiled for the two steps
    frames_refresh: int  # ... of which during the refresh step
    graph_breaks: dict  # {reason: count} during the explain run
    notes: list = field(default_factory=list)
    stats: Any = field(default=None, repr=False)  # grassfx.compiler.CompileReport of the copy (with records)
    projected_shapes: list = field(default_factory=list, repr=False)  # shapes of non-full sites

    # -- totals ----------------------------------------------------------------------
    def totals(self) -> dict:
        """Sums over all projected weights (formulas in T, numbers for the example)."""
        rows = self.weights
        known = all(w.tokens is not None for w in rows)
        flops = [w.flops() for w in rows]
        return {
            "weights": len(rows),
            "rewritten": sum(w.rewritten for w in rows),
            "wgrad_flops": {
                "dense_formula": str(sum((w.flops_dense for w in rows), sympy.Integer(0))),
                "grassfx_formula": str(sum((w.flops_grassfx for w in rows), sympy.Integer(0))),
                "dense": sum(f[0] for f in flops) if known else None,
                "grassfx": sum(f[1] for f in flops) if known else None,
            },
            "grad_bytes": {"dense": sum(w.grad_bytes_dense for w in rows),
                           "grassfx": sum(w.grad_bytes_grassfx for w in rows)},
            "optimizer_state_bytes": {"dense": sum(w.state_bytes_dense for w in rows),
                                      "grassfx": sum(w.state_bytes_grassfx for w in rows)},
        }

    def tokens(self) -> Optional[int]:
        """The token count T shared by every weight, or None when they differ."""
        seen = {w.tokens for w in self.weights}
        return seen.pop() if len(seen) == 1 else None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the whole report.

        Example:
            >>> json.dumps(report.to_dict())  # doctest: +SKIP
        """
        return {
            "model": self.model,
            "backend": self.backend,
            "config": dict(self.config),
            "tokens": self.tokens(),
            "frames": self.frames,
            "frames_refresh": self.frames_refresh,
            "graph_breaks": dict(self.graph_breaks),
            "weights": [w.to_dict() for w in self.weights],
            "not_projected": [{"name": u.name, "shape": list(u.shape), "reason": u.reason} for u in self.unprojected],
            "totals": self.totals(),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return _format_report(self)



# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------
def _si(x: Optional[int]) -> str:
    if x is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return str(x)


def _nbytes(x: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def _ratio(dense, grass) -> str:
    return f"({100 * grass / dense:.3g}%)" if dense else ""


def _table(header: list, rows: list) -> list:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _format_report(rep: Report) -> str:
    reasons = {}  # reason -> footnote number
    rows = []
    for w in rep.weights:
        if w.reason is not None:
            reasons.setdefault(w.reason, len(reasons) + 1)
        dense, grass = w.flops()
        rows.append([
            w.name, " x ".join(map(str, w.shape)), w.rank, w.dim,
            "yes" if w.rewritten else f"no [{reasons[w.reason]}]",
            f"{w.flops_dense} = {_si(dense)}", f"{w.flops_grassfx} = {_si(grass)}",
            f"{_nbytes(w.grad_bytes_dense)} -> {_nbytes(w.grad_bytes_grassfx)}",
            f"{_nbytes(w.state_bytes_dense)} -> {_nbytes(w.state_bytes_grassfx)}",
        ])
    tot = rep.totals()
    fl, gb, sb = tot["wgrad_flops"], tot["grad_bytes"], tot["optimizer_state_bytes"]
    rows.append([f"total: {tot['rewritten']}/{tot['weights']} rewritten", "", "", "", "",
                 _total_flops(rep, "dense"), f"{_total_flops(rep, 'grassfx')} {_ratio(fl['dense'], fl['grassfx'])}".strip(),
                 f"{_nbytes(gb['dense'])} -> {_nbytes(gb['grassfx'])}",
                 f"{_nbytes(sb['dense'])} -> {_nbytes(sb['grassfx'])}"])
    header = ["weight", "shape", "r", "sel", "rewritten", "wgrad FLOPs: dense", "grassfx", "grad bytes",
              "AdamW state bytes"]
    lines = [_report_title(rep), _report_summary(rep), ""] + _table(header, rows)
    lines += _footnotes(reasons) + _block_lines(rep.weights) + _unprojected_lines(rep.unprojected) + _break_lines(rep.graph_breaks)
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)


def _total_flops(rep: Report, which: str) -> str:
    flops = rep.totals()["wgrad_flops"]
    if rep.tokens() is None:
        return _si(flops[which])
    return f"{flops[which + '_formula']} = {_si(flops[which])}"


def _report_title(rep: Report) -> str:
    cfg = rep.config
    return (f"grassfx explain: {rep.model} (backend={rep.backend}, rank={cfg['rank']}, "
            f"selection={cfg['selection']}, update_freq={cfg['update_freq']})")


def _report_summary(rep: Report) -> str:
    tokens = rep.tokens()
    t = f"T = {tokens} tokens" if tokens is not None else "T differs per weight (see to_dict())"
    if rep.backend == "eager":
        return f"example: {t}; not compiled (backend=eager)"
    train = rep.frames - rep.frames_refresh
    breaks = sum(rep.graph_breaks.values())
    refresh = ("refresh steps run eagerly" if rep.config.get("refresh") == "eager"
               else f"refresh step {rep.frames_refresh}")
    return (f"example: {t}; {rep.frames} frame(s) compiled ({refresh}, "
            f"training step {train}); {breaks} graph break(s)")


def _footnotes(reasons: dict) -> list:
    if not reasons:
        return []
    return ["", "not rewritten:"] + [f"  [{i}] {reason}" for reason, i in reasons.items()]


def _block_lines(weights: list) -> list:
    """Fused weights: the blocks each selects rows from (or why it selects over the whole weight)."""
    fused = [w for w in weights if w.blocks]
    if not fused:
        return []
    return ["", "fused weights (rows selected per block):"] + [f"  {w.name}: {w.blocks}" for w in fused]


def _unprojected_lines(items: list, shown: int = 3) -> list:
    if not items:
        return []
    by_reason = collections.defaultdict(list)
    for u in items:
        by_reason[u.reason].append(u)
    lines = ["", f"not projected ({len(items)} parameters, trained densely):"]
    for reason, group in by_reason.items():
        names = [f"{u.name} ({' x '.join(map(str, u.shape)) or 'scalar'})" for u in group[:shown]]
        more = f", ... ({len(group) - shown} more)" if len(group) > shown else ""
        lines.append(f"  {reason}: {', '.join(names)}{more}")
    return lines


def _break_lines(breaks: dict) -> list:
    if not breaks:
        return []
    return ["", "graph breaks:"] + [f"  {count}x {reason}" for reason, count in breaks.items()]


