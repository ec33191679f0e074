"""Debugging tools: what did grassfx do to a model, and to which graph node?

* :func:`explain` compiles one training step of a *copy* of a grassfx model on example
  inputs and reports, per projected weight, whether the dense weight-gradient GEMM was
  removed (and why not), with FLOPs and bytes dense vs grassfx, the parameters that are
  not projected, graph breaks and compiled frames. The user's model is left untouched.
* :func:`diff` shows what each pass did to each compiled graph: a unified diff of the
  graph code with every created or erased node attributed to its pass and weight, op
  counts before/after, a side-by-side HTML page and a DOT drawing of the changed region.

Both read what :mod:`grassfx.backend` records for every compiled graph
(``model.compile_stats.graphs``: a :class:`~grassfx.backend.GraphRecord` per graph, a
:class:`~grassfx.backend.Stage` per pass with the code and op summary before and after,
and the pass's :class:`~grassfx.passes.PassResult`).
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copy
import difflib
import html
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
from torch import nn

from .errors import ConfigError, GrassError
from .model import GrassModel

__all__ = ["explain", "diff", "Report", "WeightRow", "Unprojected", "Diff", "GraphDiff", "StageDiff", "T"]

#: The token count of one step: rows of the activations a weight multiplies.
T = sympy.Symbol("T", positive=True, integer=True)

_SPARSIFY = "sparsify_wgrad"
_MOMENTS = 2  # AdamW keeps two moments per trained element


# ---------------------------------------------------------------------------------------
# explain: the report
# ---------------------------------------------------------------------------------------
@dataclass
class WeightRow:
    """One projected weight in a :class:`Report`.

    FLOPs count the weight-gradient GEMM only (``2*T*m*n`` dense; ``2*T*r*n`` when rows
    are selected, ``2*T*m*r`` for columns). Bytes are the stored gradient and the AdamW
    state (two moments), dense vs grassfx.
    """

    name: str
    shape: tuple  # (m, n)
    rank: int  # r: rows (or columns) kept
    dim: str  # "rows" | "cols"
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

    ``stats`` holds the compiled copy's graph records, so ``grassfx.diff(report)`` shows
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
    stats: Any = field(default=None, repr=False)  # grassfx.backend.CompileStats of the copy
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


def explain(model: nn.Module, *example_args, **example_kwargs) -> Report:
    """Compile one training step of ``model`` on example inputs and report what grassfx did.

    A deep copy of ``model`` runs two forward+backward steps: a refresh step (whose
    backward picks the rows) and a normal training step (whose backward graph the
    ``sparsify_wgrad`` pass rewrites). Inductor's FX graph cache and the AOTAutograd cache
    are off for that compile, so the passes really run. The user's model (weights,
    selected rows, ``grass_step``, gradients) and the global RNG state are unchanged;
    the copy needs as much memory as the model.

    Args:
        model: a model returned by :func:`grassfx.compile`.
        *example_args: positional inputs of one training step.
        **example_kwargs: keyword inputs (e.g. ``input_ids=..., labels=...``). The loss is
            the output's ``.loss`` when it has one, else the sum of its first tensor.

    Returns:
        A :class:`Report`; ``str(report)`` is a readable table.

    Raises:
        ConfigError: ``model`` is not a grassfx model.

    Example:
        >>> import torch, grassfx
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> model = grassfx.compile(net, rank=8, backend="aot_eager")
        >>> report = grassfx.explain(model, torch.randn(32, 16))
        >>> [(w.name, w.dim, w.rewritten) for w in report.weights]
        [('0.weight', 'rows', True), ('2.weight', 'cols', True)]
        >>> report.weights[0].flops()  # dense vs grassfx weight-gradient FLOPs at T = 32
        (65536, 8192)
    """
    _require_grass_model(model, "explain")
    probe = _Probe(model, example_args, example_kwargs)
    with _preserved_rng(model):
        probe.run()
    report = _build_report(model, probe)
    _trace_artifact("grassfx_explain", report)
    return report


def _trace_artifact(name: str, obj) -> None:
    """Put ``str(obj)`` into a ``TORCH_TRACE`` log (tlparse shows it); free when tracing is off."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=lambda: str(obj))


def _require_grass_model(model, what: str) -> None:
    if not isinstance(model, GrassModel):
        raise ConfigError(
            f"grassfx.{what}() takes a model returned by grassfx.compile, got {type(model).__name__}; "
            f"call model = grassfx.compile(model, rank=...) first, then grassfx.{what}(model, ...)"
        )


@contextlib.contextmanager
def _preserved_rng(model: nn.Module):
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


# ---------------------------------------------------------------------------------------
# explain: running the copy
# ---------------------------------------------------------------------------------------
class _Probe:
    """A deep copy of a grassfx model that compiles and runs two training steps."""

    def __init__(self, model: GrassModel, args: tuple, kwargs: dict):
        self.model = model
        self.args, self.kwargs = args, kwargs
        self.work = None
        self.tokens = {}  # site name -> T (None: unknown)
        self.frames = self.frames_refresh = 0
        self.graph_breaks = {}
        self.stats = None

    def run(self) -> None:
        work = self._copy()
        self.tokens = _count_tokens(work, self.args, self.kwargs)
        if work.grass_config.backend == "eager":
            return
        before = collections.Counter(_dynamo_counter("graph_break"))
        with _fresh_compile():
            work.grass_step.zero_()
            work.grass_refreshed_at.fill_(-1)  # step 1: a refresh step (when any site needs one)
            self._step(work)
            self.frames_refresh = work.compile_stats.frames
            work.grass_step.add_(1)
            work.grass_refreshed_at.copy_(work.grass_step)  # step 2: a normal step, even if update_freq=1
            self._step(work)
        after = collections.Counter(_dynamo_counter("graph_break"))
        self.graph_breaks = dict(after - before)
        self.frames = work.compile_stats.frames
        self.stats = work.compile_stats

    def _copy(self) -> GrassModel:
        work = copy.deepcopy(self.model)
        work.cancel_refresh()  # a refresh the user left half-done is not ours to finish
        work._snapshot_handle_versions()
        _drop_grads(work)
        self.work = work
        return work

    def _step(self, work: GrassModel) -> None:
        out = work(*self.args, **self.kwargs)
        _loss_of(out).backward()
        _drop_grads(work)


def _drop_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _loss_of(out) -> torch.Tensor:
    """A scalar to differentiate: ``out.loss`` if set, else the sum of the first tensor."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    tensor = _first_tensor(out)
    if tensor is None or not tensor.requires_grad:
        raise ConfigError(
            f"explain could not find a differentiable output in {type(out).__name__}: the model "
            "must return a tensor, a tuple/dict of tensors, or an object with .loss (pass labels)"
        )
    return tensor.float().sum()


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def _fresh_compile():
    """Inductor's FX graph cache and the AOTAutograd cache off: the passes really run."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False), \
            functorch_config.patch(enable_autograd_cache=False, enable_remote_autograd_cache=False):
        yield


def _dynamo_counter(name: str) -> dict:
    from torch._dynamo.utils import counters

    return counters[name]


def _count_tokens(work: GrassModel, args: tuple, kwargs: dict) -> dict:
    """T per site: all dims but the last of its module's input, summed over calls.

    One eager forward without gradients on the copy, with pre-hooks on the modules that
    own projected weights (hooks would change what Dynamo traces, so not in the compile).
    """
    owners = collections.defaultdict(list)
    for site in work.sites:
        owners[site.module_name].append(site.name)
    seen = collections.Counter()

    def hook_for(module_name):
        def hook(module, hook_args, hook_kwargs):
            x = _first_tensor(list(hook_args) + list(hook_kwargs.values()))
            if x is not None and x.dim() >= 1:
                seen[module_name] += math.prod(x.shape[:-1])

        return hook

    handles = [work.module.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True)
               for name in owners]
    try:
        with torch.no_grad():
            work._run(None, args, kwargs)
    finally:
        for h in handles:
            h.remove()
        work._slot.anchors = work._slot.versions = None  # as if no eager forward had run
    return {site.name: (seen[site.module_name] or None) for site in work.sites}


# ---------------------------------------------------------------------------------------
# explain: building the report
# ---------------------------------------------------------------------------------------
def _build_report(model: GrassModel, probe: _Probe) -> Report:
    cfg = model.grass_config
    stats = probe.stats
    changes, skips, disabled = _pass_outcomes(stats)
    rows = []
    for site in model.sites:
        status = _site_status(site, cfg.backend, changes, skips, disabled)
        rows.append(_weight_row(model, site, status, probe.tokens.get(site.name)))
    notes = []
    if cfg.backend != "eager" and probe.frames == 0:
        notes.append("no frame was compiled: Dynamo skipped the model (see TORCH_LOGS=recompiles)")
    return Report(
        model=type(model.module).__name__,
        backend=cfg.backend,
        config={"rank": cfg.rank, "selection": cfg.selection, "update_freq": cfg.update_freq,
                "proj_dim": cfg.proj_dim},
        weights=rows,
        unprojected=_unprojected(model),
        frames=probe.frames,
        frames_refresh=probe.frames_refresh,
        graph_breaks=probe.graph_breaks,
        notes=notes,
        stats=stats,
        projected_shapes=_projected_shapes(model),
    )


def _pass_outcomes(stats) -> tuple:
    """``({weight: [Change]}, {weight: [Skip]}, disabled)`` of the sparsify pass, all graphs."""
    changes, skips, disabled = collections.defaultdict(list), collections.defaultdict(list), False
    for record in (stats.graphs if stats is not None else []):
        for stage in record.stages:
            if stage.pass_name != _SPARSIFY:
                continue
            disabled |= bool(stage.result.disabled)
            for change in stage.result.changes:
                changes[change.weight].append(change)
            for skip in stage.result.skipped:
                skips[skip.weight].append(skip)
    return changes, skips, disabled


def _site_status(site, backend: str, changes: dict, skips: dict, disabled: bool) -> tuple:
    """``(rewritten, reason, detail)`` for one site."""
    if site.full:
        return False, "rank >= rows: every row kept, nothing to rewrite", ""
    if backend == "eager":
        return False, "not compiled (backend=eager): dense fallback", ""
    if skips.get(site.name):
        return False, f"{skips[site.name][0].reason}: dense fallback", ""
    fallback = [c for c in changes.get(site.name, []) if c.action != "rewrote"]
    if fallback:
        return False, f"{fallback[0].detail or fallback[0].action}: dense fallback", ""
    if changes.get(site.name):
        return True, None, changes[site.name][0].detail
    if disabled:
        return False, f"{_SPARSIFY} disabled (GRASSFX_DISABLE): dense fallback", ""
    return False, "no weight-gradient marker in any compiled backward graph", ""


def _weight_row(model: GrassModel, site, status: tuple, tokens: Optional[int]) -> WeightRow:
    rewritten, reason, detail = status
    weight = model.weight_of(site)
    m, n = (int(s) for s in weight.shape)
    r = site.rank
    elt = weight.element_size()
    dense = 2 * T * m * n
    kept = r * n if site.dim == 0 else m * r
    return WeightRow(
        name=site.name,
        shape=(m, n),
        rank=r,
        dim="rows" if site.dim == 0 else "cols",
        rewritten=rewritten,
        reason=reason,
        detail=detail,
        tokens=tokens,
        flops_dense=dense,
        flops_grassfx=2 * T * kept if rewritten else dense,
        grad_bytes_dense=m * n * elt,
        grad_bytes_grassfx=kept * elt,
        state_bytes_dense=_MOMENTS * m * n * elt,
        state_bytes_grassfx=_MOMENTS * kept * elt,
    )


def _projected_shapes(model: GrassModel) -> list:
    return sorted({tuple(int(s) for s in model.weight_of(site).shape) for site in model.sites if not site.full})


def _unprojected(model: GrassModel) -> list:
    """Every parameter of the user's module that is not a projected weight, with a reason."""
    from .targets import _auto_kind, _embedding_param_ids, _output_head_ids

    root = model.module
    site_ids = {id(model.weight_of(site)) for site in model.sites}
    embeddings = _embedding_param_ids(root)
    heads = _output_head_ids(root)
    first_name = {}
    out = []
    for name, param in root.named_parameters(remove_duplicate=False):
        if id(param) in site_ids:
            continue
        module_name, _, attr = name.rpartition(".")
        module = root.get_submodule(module_name)
        if id(param) in first_name:
            reason = _tied_reason(param, embeddings, first_name[id(param)])
        else:
            first_name[id(param)] = name
            reason = _unprojected_reason(module, attr, param, embeddings, _auto_kind, heads)
        out.append(Unprojected(name, tuple(int(s) for s in param.shape), reason))
    return out


def _tied_reason(param, embeddings: set, first: str) -> str:
    if id(param) in embeddings:
        return f"tied to an embedding ({first})"
    return f"shared with {first}"


def _unprojected_reason(module, attr, param, embeddings: set, auto_kind, heads: set) -> str:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if id(param) in embeddings:
        return "tied to an embedding"
    if id(param) in heads:
        return "output embedding (LM head)"
    if param.dim() == 1:
        return "1-D (bias/norm)"
    if param.dim() != 2:
        return f"{param.dim()}-D (not a matrix)"
    base = getattr(type(module), "_grassfx_original_class", type(module))
    if auto_kind(module, attr, param, embeddings) is not None or (base.__name__ == "Conv1D" and attr == "weight"):
        return "excluded by filter"
    return "not used by a matmul"


# ---------------------------------------------------------------------------------------
# explain: text
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
            w.name, f"{w.shape[0]} x {w.shape[1]}", w.rank, w.dim,
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
    lines += _footnotes(reasons) + _unprojected_lines(rep.unprojected) + _break_lines(rep.graph_breaks)
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
    return (f"example: {t}; {rep.frames} frame(s) compiled (refresh step {rep.frames_refresh}, "
            f"training step {train}); {breaks} graph break(s)")


def _footnotes(reasons: dict) -> list:
    if not reasons:
        return []
    return ["", "not rewritten:"] + [f"  [{i}] {reason}" for reason, i in reasons.items()]


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


# ---------------------------------------------------------------------------------------
# diff: the data
# ---------------------------------------------------------------------------------------
@dataclass
class StageDiff:
    """One pass applied to one graph: its code before/after and who made what."""

    graph_id: str
    pass_name: str
    before: list  # code lines (liveness ``x = None`` tails dropped)
    after: list
    created: dict  # node name -> weight (made by this pass)
    erased: dict  # node name -> weight
    disabled: bool = False

    @property
    def modified(self) -> bool:
        return self.before != self.after

    def unified(self) -> list:
        """Unified diff lines; created/erased node lines end with their pass and weight."""
        lines = difflib.unified_diff(self.before, self.after, f"{self.graph_id} before {self.pass_name}",
                                     f"{self.graph_id} after {self.pass_name}", lineterm="", n=2)
        return [self._annotate(line) for line in lines]

    def _annotate(self, line: str) -> str:
        if line[:1] not in "+-" or line[:3] in ("+++", "---"):
            return line
        name = _assigned_name(line[1:])
        made = self.created if line[0] == "+" else self.erased
        if name in made:
            verb = "created" if line[0] == "+" else "erased"
            return f"{line}  # <- {self.pass_name} {verb} ({made[name]})"
        return line


@dataclass
class GraphDiff:
    """One compiled graph: its stages and the op counts before the first pass / after the last."""

    graph_id: str
    kind: str
    stages: list  # [StageDiff]
    ops_before: list  # op summary before the first pass: [(op, shape, made_by)]
    ops_after: list  # after the last pass
    weight_shapes: list = field(default_factory=list, repr=False)

    def counts(self, which: str = "after") -> collections.Counter:
        """Op counts keyed ``"mm"`` or ``"mm (m x n)"`` (output shaped like a projected weight)."""
        ops = self.ops_before if which == "before" else self.ops_after
        return collections.Counter(_op_key(op, shape, self.weight_shapes) for op, shape, _ in ops)

    def changed_counts(self) -> list:
        """``[(key, before, after)]`` for every op key whose count changed."""
        before, after = self.counts("before"), self.counts("after")
        keys = sorted(set(before) | set(after))
        return [(k, before[k], after[k]) for k in keys if before[k] != after[k]]

    @property
    def modified(self) -> bool:
        return any(st.modified for st in self.stages)


class Diff:
    """What every pass did to every compiled graph of a model (see :func:`diff`)."""

    def __init__(self, graphs: list):
        self.graphs = graphs  # [GraphDiff]

    def __str__(self) -> str:
        changed = sum(g.modified for g in self.graphs)
        out = [f"grassfx diff: {len(self.graphs)} graph(s) compiled, {changed} changed by a pass", ""]
        for g in self.graphs:
            out += _graph_text(g)
        return "\n".join(out)

    def to_html(self, path) -> str:
        """Write one self-contained side-by-side HTML page to ``path``; return the path.

        Created nodes are green, erased nodes red, other changed lines yellow.

        Example:
            >>> grassfx.diff(model).to_html("diff.html")  # doctest: +SKIP
            'diff.html'
        """
        with open(path, "w", encoding="utf-8") as f:
            f.write(_html_page(self))
        return str(path)

    def to_dot(self) -> str:
        """A DOT digraph of the changed region: created/erased nodes and their neighbours.

        One cluster per graph and pass; created nodes green, erased red, neighbours grey.
        Render with ``dot -Tsvg`` (graphviz is not needed to produce the text).

        Example:
            >>> print(grassfx.diff(model).to_dot())  # doctest: +SKIP
            digraph grassfx_diff { ...
        """
        return _dot_text(self)

    def to_dict(self) -> dict:
        """A JSON-serialisable summary: per graph, the changed op counts and each pass's nodes."""
        return {"graphs": [{
            "graph_id": g.graph_id, "kind": g.kind,
            "op_counts": [{"op": k, "before": b, "after": a} for k, b, a in g.changed_counts()],
            "stages": [{"pass": st.pass_name, "disabled": st.disabled, "created": st.created, "erased": st.erased}
                       for st in g.stages],
        } for g in self.graphs]}


def diff(model) -> Diff:
    """Before/after of each pass on each compiled graph of a grassfx model.

    Args:
        model: a model from :func:`grassfx.compile` that ran at least one compiled
            training step, or a :class:`Report` from :func:`explain` (its compiled copy).

    Returns:
        A :class:`Diff`: ``str(d)`` is text (unified diffs with every created/erased node
        attributed to its pass and weight, and op counts such as ``mm (m x n): 7 -> 0``);
        ``d.to_html(path)`` writes a side-by-side page; ``d.to_dot()`` is a DOT graph.

    Raises:
        ConfigError: ``model`` is not a grassfx model or report.
        GrassError: nothing was compiled yet.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(16, 64), rank=8, backend="aot_eager")
        >>> model(torch.randn(4, 16)).sum().backward()   # the refresh step
        >>> model(torch.randn(4, 16)).sum().backward()   # a normal step: the rewritten graph
        >>> d = grassfx.diff(model)
        >>> [c for g in d.graphs for c in g.changed_counts() if c[0].startswith("mm")]
        [('mm', 0, 1), ('mm (m x n)', 1, 0)]
    """
    stats, shapes = _diff_source(model)
    result = Diff([_graph_diff(rec, shapes) for rec in stats.graphs])
    _trace_artifact("grassfx_diff", result)
    return result


def _diff_source(model) -> tuple:
    if isinstance(model, Report):
        if model.stats is None or not model.stats.graphs:
            raise GrassError("this report has no compiled graphs (backend='eager'): explain a model "
                             "compiled with backend='aot_eager' or 'inductor'")
        return model.stats, model.projected_shapes
    _require_grass_model(model, "diff")
    stats = model.compile_stats
    if stats is None:
        raise GrassError("grassfx.diff() needs compiled graphs, but this model was made with backend='eager'; "
                         "use grassfx.compile(..., backend='aot_eager') or 'inductor'")
    if not stats.graphs and stats.frames:
        raise GrassError("no pass ran in this process: Inductor served every graph from its FX graph cache; "
                         "call grassfx.diff(grassfx.explain(model, *example_inputs)), which compiles a copy "
                         "with the caches off")
    if not stats.graphs:
        raise GrassError("no graph was compiled yet: run one training step (forward and backward) first, "
                         "or call grassfx.diff(grassfx.explain(model, *example_inputs))")
    return stats, _projected_shapes(model)


def _graph_diff(record, shapes: list) -> GraphDiff:
    stages = []
    for stage in record.stages:
        created, erased = {}, {}
        for change in stage.result.changes:
            created.update(dict.fromkeys(change.created, change.weight))
            erased.update(dict.fromkeys(change.erased, change.weight))
        stages.append(StageDiff(record.graph_id, stage.pass_name, _code_lines(stage.before),
                                _code_lines(stage.after), created, erased, bool(stage.result.disabled)))
    first, last = record.stages[0], record.stages[-1]
    return GraphDiff(record.graph_id, record.kind, stages, list(first.ops_before), list(last.ops_after), shapes)


_LIVENESS = re.compile(r";\s+(?:\w+\s*=\s*)+None\s*$")
_ASSIGN = re.compile(r"^\s*([A-Za-z_]\w*)\s*=(?!=)")


def _code_lines(code: str) -> list:
    """Graph code lines without FX's liveness tails (``;  a = b = None``)."""
    return [_LIVENESS.sub("", line).rstrip() for line in code.strip().splitlines()]


def _assigned_name(line: str) -> Optional[str]:
    m = _ASSIGN.match(line)
    return m.group(1) if m else None


def _op_key(op: str, shape, weight_shapes: list) -> str:
    return f"{op} (m x n)" if _is_weight_shaped(shape, weight_shapes) else op


def _is_weight_shaped(shape, weight_shapes: list) -> bool:
    """True when ``shape`` (leading 1s dropped) is a projected weight's shape or its transpose."""
    if not shape:
        return False
    dims = list(shape)
    while len(dims) > 2 and dims[0] == 1:
        dims.pop(0)
    dims = tuple(dims)
    return any(dims in (ws, ws[::-1]) for ws in weight_shapes)


# ---------------------------------------------------------------------------------------
# diff: text
# ---------------------------------------------------------------------------------------
def _graph_text(g: GraphDiff) -> list:
    out = [f"=== {g.graph_id} ({g.kind}) ==="]
    for st in g.stages:
        if st.disabled:
            out.append(f"--- {st.pass_name}: disabled (GRASSFX_DISABLE)")
        elif not st.modified:
            out.append(f"--- {st.pass_name}: no change")
        else:
            out.append(f"--- {st.pass_name}: {len(st.created)} node(s) created, {len(st.erased)} erased")
            out += st.unified()
    counts = g.changed_counts()
    if counts:
        out.append("op counts:")
        width = max(len(k) for k, _, _ in counts)
        out += [f"  {k.ljust(width)}: {b} -> {a}" for k, b, a in counts]
    out.append("")
    return out


# ---------------------------------------------------------------------------------------
# diff: HTML
# ---------------------------------------------------------------------------------------
_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
table.code { border-collapse: collapse; width: 100%; table-layout: fixed; font-family: monospace; font-size: 12px; }
table.code td { padding: 0 4px; vertical-align: top; white-space: pre-wrap; word-break: break-all; }
td.no { width: 3em; color: #888; text-align: right; }
tr.skip td { color: #888; background: #f4f4f4; text-align: center; }
.created { background: #d4f7d4; } .erased { background: #f9d0d0; } .changed { background: #fff3bf; }
table.ops { border-collapse: collapse; margin: 0.5em 0 1em; } table.ops td, table.ops th { border: 1px solid #ccc; padding: 2px 8px; }
span.tag { color: #555; font-style: italic; }
"""

_CONTEXT = 3  # unchanged lines shown around each change


def _html_page(d: Diff) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>grassfx diff</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             "<h1>grassfx diff</h1>",
             '<p><span class="created">created by a pass</span> <span class="erased">erased by a pass</span> '
             '<span class="changed">changed (uses a rewritten value)</span></p>']
    for g in d.graphs:
        parts += _html_graph(g)
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _html_graph(g: GraphDiff) -> list:
    esc = html.escape
    out = [f"<h2>{esc(g.graph_id)} ({esc(g.kind)})</h2>"]
    counts = g.changed_counts()
    if counts:
        out.append('<table class="ops"><tr><th>op</th><th>before</th><th>after</th></tr>')
        out += [f"<tr><td>{esc(k)}</td><td>{b}</td><td>{a}</td></tr>" for k, b, a in counts]
        out.append("</table>")
    for st in g.stages:
        if st.disabled or not st.modified:
            out.append(f"<h3>{esc(st.pass_name)}: {'disabled (GRASSFX_DISABLE)' if st.disabled else 'no change'}</h3>")
            continue
        out.append(f"<h3>{esc(st.pass_name)}: {len(st.created)} node(s) created, {len(st.erased)} erased</h3>")
        out.append('<table class="code">')
        out += _html_rows(st)
        out.append("</table>")
    return out


def _html_rows(st: StageDiff) -> list:
    rows = []
    matcher = difflib.SequenceMatcher(None, st.before, st.after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            rows += _html_equal(st, i1, i2, j1)
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            left = _html_cell(st, "before", i1 + k) if i1 + k < i2 else ("", "", "")
            right = _html_cell(st, "after", j1 + k) if j1 + k < j2 else ("", "", "")
            rows.append(_html_tr(left, right))
    return rows


def _html_equal(st: StageDiff, i1: int, i2: int, j1: int) -> list:
    n = i2 - i1
    keep = [k for k in range(n) if k < _CONTEXT or k >= n - _CONTEXT]
    if i1 == 0:
        keep = [k for k in keep if k >= n - _CONTEXT]
    if i2 == len(st.before):
        keep = [k for k in keep if k < _CONTEXT]
    rows, last = [], -1
    for k in keep:
        if k != last + 1:
            rows.append(f'<tr class="skip"><td colspan="4">{k - last - 1} unchanged line(s)</td></tr>')
        rows.append(_html_tr(_html_cell(st, "before", i1 + k, plain=True), _html_cell(st, "after", j1 + k, plain=True)))
        last = k
    if last != n - 1 and n:
        rows.append(f'<tr class="skip"><td colspan="4">{n - last - 1} unchanged line(s)</td></tr>')
    return rows


def _html_cell(st: StageDiff, side: str, i: int, plain: bool = False) -> tuple:
    line = (st.before if side == "before" else st.after)[i]
    name = _assigned_name(line)
    made = st.erased if side == "before" else st.created
    text = html.escape(line)
    if plain:
        return str(i + 1), text, ""
    if name in made:
        verb = "erased" if side == "before" else "created"
        tag = html.escape(f"  # {st.pass_name} {verb} ({made[name]})")
        return str(i + 1), f'{text}<span class="tag">{tag}</span>', verb
    return str(i + 1), text, "changed"


def _html_tr(left: tuple, right: tuple) -> str:
    cells = []
    for no, text, cls in (left, right):
        attr = f' class="{cls}"' if cls and text else ""
        cells.append(f'<td class="no">{no}</td><td{attr}>{text}</td>')
    return f"<tr>{''.join(cells)}</tr>"


# ---------------------------------------------------------------------------------------
# diff: DOT
# ---------------------------------------------------------------------------------------
def _parse_graph_code(lines: list) -> dict:
    """``{name: (op, [input names])}`` from FX graph code (inputs have op ``"input"``)."""
    tree = ast.parse("\n".join(lines))
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fn is None:
        return {}
    nodes = {a.arg: ("input", []) for a in fn.args.args if a.arg != "self"}
    for stmt in fn.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            if not (isinstance(stmt.value, ast.Constant) and stmt.value.value is None):
                nodes[stmt.targets[0].id] = (_op_label(stmt.value), _uses(stmt.value, nodes))
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            nodes["output"] = ("output", _uses(stmt.value, nodes))
    return nodes


def _uses(expr: ast.AST, known: dict) -> list:
    seen = []
    for sub in ast.walk(expr):
        if isinstance(sub, ast.Name) and sub.id in known and sub.id not in seen:
            seen.append(sub.id)
    return seen


def _op_label(expr: ast.AST) -> str:
    if isinstance(expr, ast.Call):
        label = ast.unparse(expr.func)
        return re.sub(r"^torch\.ops\.", "", label)
    if isinstance(expr, ast.Subscript):
        return "getitem"
    return type(expr).__name__.lower()


def _changed_region(st: StageDiff):
    """A networkx DiGraph of created/erased nodes and their direct neighbours."""
    import networkx as nx

    g = nx.DiGraph()
    for side, lines, marked in (("before", st.before, st.erased), ("after", st.after, st.created)):
        nodes = _parse_graph_code(lines)
        users = collections.defaultdict(list)
        for name, (_, inputs) in nodes.items():
            for src in inputs:
                users[src].append(name)
        for name in marked:
            if name not in nodes:
                continue
            status = "erased" if side == "before" else "created"
            _add_node(g, name, nodes[name][0], status, marked[name])
            for src in nodes[name][1]:
                _add_node(g, src, nodes[src][0], None, None)
                g.add_edge(src, name)
            for dst in users[name]:
                _add_node(g, dst, nodes[dst][0], None, None)
                g.add_edge(name, dst)
    return g


def _add_node(g, name: str, op: str, status, weight) -> None:
    if name in g and (status is None or g.nodes[name].get("status")):
        return
    g.add_node(name, op=op, status=status, weight=weight)


_DOT_FILL = {"created": "#c8f0c8", "erased": "#f5c2c2", None: "#eeeeee"}


def _dot_id(*parts: str) -> str:
    return json.dumps("/".join(parts))  # a quoted DOT ID with escapes


def _dot_text(d: Diff) -> str:
    lines = ["digraph grassfx_diff {", "  rankdir=TB;", '  node [shape=box, style=filled, fontname="monospace"];']
    k = 0
    for gd in d.graphs:
        for st in gd.stages:
            if not (st.created or st.erased):
                continue
            region = _changed_region(st)
            prefix = f"{gd.graph_id}/{st.pass_name}"
            lines.append(f"  subgraph cluster_{k} {{")
            lines.append(f"    label={json.dumps(prefix)};")
            for name, attrs in region.nodes(data=True):
                label = f"{name}\\n{attrs['op']}" + (f"\\n{attrs['status']}: {attrs['weight']}" if attrs["status"] else "")
                label = label.replace('"', "'")
                lines.append(f'    {_dot_id(prefix, name)} [label="{label}", fillcolor="{_DOT_FILL[attrs["status"]]}"];')
            for src, dst in region.edges():
                lines.append(f"    {_dot_id(prefix, src)} -> {_dot_id(prefix, dst)};")
            lines.append("  }")
            k += 1
    lines.append("}")
    return "\n".join(lines) + "\n"
