"""``grassfx.explain``: what did grassfx do to a model, and what does it save?

:func:`explain` compiles one training step of a *copy* of a grassfx model on example
inputs and reports, per projected weight, whether the dense weight-gradient GEMM was
removed (and why not), with FLOPs and bytes dense vs grassfx, the parameters that are
not projected (the decisions target discovery recorded at compile time), graph breaks
and compiled frames. The user's model is left untouched. The copy records node
snapshots, so ``grassfx.diff(report)`` shows the graphs behind the table.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
from typing import Optional

import torch
from torch import nn

from grassfx import _compat, fsdp
from grassfx.compiler.records import Recorder
from grassfx.errors import ConfigError
from grassfx.instrument import GrassModel
from grassfx.instrument.blocks import describe_selection
from grassfx.instrument.expert_targets import expert_reason
from grassfx.instrument.experts import ExpertSite
from grassfx.instrument.guard import snapshot_handle_versions

from .common import projected_shapes, require_grass_model, trace_artifact
from .report import Report, T, Unprojected, WeightRow

__all__ = ["explain"]

_SPARSIFY = "sparsify_wgrad"
_MOMENTS = 2  # AdamW keeps two moments per trained element


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
    require_grass_model(model, "explain")
    probe = _Probe(model, example_args, example_kwargs)
    in_place = _InPlace(model) if any(site.sharded for site in model.sites) else None
    try:
        with _preserved_rng(model):
            probe.run(in_place)
        report = _build_report(model, probe)
    finally:
        if in_place is not None:
            in_place.restore()
    trace_artifact("grassfx_explain", report)
    return report


class _InPlace:
    """A model whose probe runs on itself: FSDP2 modules cannot be deep-copied.

    Holds everything the probe's two steps change (gradients, every buffer: grassfx's and
    the model's, such as normalization statistics; the sites' refresh bookkeeping, the
    schedule, the reducer's counters) and puts it back. Weights do
    not change (no optimizer step). The probe must compile the model's graphs for the first
    time (Dynamo would reuse graphs compiled before and run no pass), so a compiled FSDP2
    model is explained before its first training step.
    """

    def __init__(self, model: GrassModel):
        if model.grass_config.backend != "eager" and model.compile_report is not None \
                and model.compile_report.frames:
            raise ConfigError(
                "explain on an FSDP2-sharded model runs the model itself (FSDP2 modules cannot be "
                "deep-copied) and must compile its graphs for the first time: call grassfx.explain "
                "before the model's first training step")
        self.model = model
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.buffers = {name: b.clone() for name, b in model.named_buffers()}  # grassfx's, and the model's
        self.sites = [(site, site.prev_idx, site.refreshed) for site in model.sites]
        self.schedule = model.schedule_snapshot()
        self.records = model.compile_report.records if model.compile_report is not None else None
        self.sent = dict(model._dp.bytes_sent) if model._dp is not None else None

    def restore(self) -> None:
        model = self.model
        with torch.no_grad():
            for name, value in self.buffers.items():
                model.get_buffer(name).copy_(value)
        for p, grad in self.grads:
            p.grad = grad
        for site, prev_idx, refreshed in self.sites:
            site.prev_idx, site.refreshed = prev_idx, refreshed
        model.restore_schedule(self.schedule)
        if model.compile_report is not None:
            model.compile_report.records = self.records
        if model._dp is not None:  # the reducer's counters: as before (zero if the probe made it)
            for key in model._dp.bytes_sent:
                model._dp.bytes_sent[key] = (self.sent or {}).get(key, 0)
        for module in fsdp.fsdp2_modules(model.module):  # the probe's forward without backward
            module.reshard()                                  # left some weights gathered
        snapshot_handle_versions(model.sites)


@contextlib.contextmanager
def _preserved_rng(model: nn.Module):
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


# ---------------------------------------------------------------------------------------
# running the copy
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

    def run(self, in_place: "_InPlace | None" = None) -> None:
        work = self._copy() if in_place is None else self._in_place()
        self.tokens = _count_tokens(work, self.args, self.kwargs)
        if work.grass_config.backend == "eager":
            return
        work.compile_report.records = Recorder()  # the copy records what each pass did
        before = collections.Counter(_compat.graph_break_counts())
        with _compat.compile_caches_off():
            work.grass_step.zero_()
            work.grass_refreshed_at.fill_(-1)  # step 1: a refresh step (when any site needs one)
            self._step(work)
            self.frames_refresh = work.compile_report.frames
            work.grass_step.add_(1)
            work.grass_refreshed_at.copy_(work.grass_step)  # step 2: a normal step, even if update_freq=1
            self._step(work)
        after = collections.Counter(_compat.graph_break_counts())
        self.graph_breaks = dict(after - before)
        self.frames = work.compile_report.frames
        self.stats = work.compile_report

    def _copy(self) -> GrassModel:
        work = copy.deepcopy(self.model)
        work.cancel_refresh()  # a refresh the user left half-done is not ours to finish
        snapshot_handle_versions(work.sites)
        _drop_grads(work)
        self.work = work
        return work

    def _in_place(self) -> GrassModel:
        work = self.model
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


def _count_tokens(work: GrassModel, args: tuple, kwargs: dict) -> dict:
    """T per site: the token count of its weight-gradient GEMM, summed over uses.

    One eager forward without gradients on the copy. Each matmul whose operand is a
    projected weight (or a piece of it) is seen where it runs, inside its module or not
    (``nn.MultiheadAttention`` reads ``out_proj.weight`` in a functional helper): T is
    the other operand's size over the contracted dimension, scaled by the share of the
    weight the operand is. A weight no matmul was seen to read falls back to its
    module's input (all dims but the last, summed over calls).
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
    # FSDP2 shards have no storage of the gathered weight the GEMMs read: module inputs count
    watcher = _MatmulTokens({_storage_key(s.weight): s for s in work.sites if not s.sharded})
    try:
        with torch.no_grad(), watcher:
            work._run(None, args, kwargs)
    finally:
        for h in handles:
            h.remove()
        work._slot.clear()  # as if no eager forward had run
    tokens = {}
    for site in work.sites:
        counted = watcher.tokens.get(site.name)
        tokens[site.name] = (round(counted) if counted else None) or seen[site.module_name] or None
    return tokens


def _storage_key(tensor: torch.Tensor):
    return (tensor.device, tensor.untyped_storage().data_ptr())


class _MatmulTokens(_compat.dispatch_mode_base()):
    """Sums, per projected weight, the token count of the GEMMs (ATen ``mm``/``addmm``/``bmm``) that read it."""

    _OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}

    def __init__(self, sites_by_storage: dict):
        super().__init__()
        self.sites = sites_by_storage
        self.tokens = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self._OPERANDS.get(func.overloadpacket.__name__)
        if operands is not None:
            self._count(args[operands[0]], args[operands[1]])
        return func(*args, **(kwargs or {}))

    def _count(self, left: torch.Tensor, right: torch.Tensor) -> None:
        for weight, other, contracted in ((right, left, -2), (left, right, -1)):
            site = self.sites.get(_storage_key(weight))
            if site is None:
                continue
            # other @ W contracts W's rows (dim -2); W @ other its columns (dim -1)
            k = int(weight.shape[contracted])
            # one matrix of the operand (a batched GEMM broadcasts the weight) may be a piece of the weight
            share = int(weight.shape[-1]) * int(weight.shape[-2]) / site.weight.numel()
            self.tokens[site.name] += other.numel() / max(k, 1) * share
            return


# ---------------------------------------------------------------------------------------
# building the report
# ---------------------------------------------------------------------------------------
def _build_report(model: GrassModel, probe: _Probe) -> Report:
    cfg = model.grass_config
    stats = probe.stats
    changes, skips, disabled = _pass_outcomes(stats)
    rows = []
    for site in model.sites:
        status = _site_status(site, cfg.backend, changes, skips, disabled)
        rows.append(_weight_row(model, site, status, probe.tokens.get(site.name)))
    notes = [f"{row.name}: {row.detail.split('; ')[0]}, {row.rank} rows of each expert's {row.shape[1]}"
             for row in rows if row.dim == "rows/expert"]
    if cfg.backend != "eager" and probe.frames == 0:
        notes.append("no frame was compiled: Dynamo skipped the model (see TORCH_LOGS=recompiles)")
    return Report(
        model=type(model.module).__name__,
        backend=cfg.backend,
        config={"rank": cfg.rank, "selection": cfg.selection, "update_freq": cfg.update_freq,
                "proj_dim": cfg.proj_dim, "refresh": cfg.refresh},
        weights=rows,
        unprojected=_unprojected(model),
        frames=probe.frames,
        frames_refresh=probe.frames_refresh,
        graph_breaks=probe.graph_breaks,
        notes=notes,
        stats=stats,
        projected_shapes=projected_shapes(model),
    )


def _pass_outcomes(stats) -> tuple:
    """``({weight: [Change]}, {weight: [Skip]}, disabled)`` of the sparsify pass, all graphs."""
    changes, skips, disabled = collections.defaultdict(list), collections.defaultdict(list), False
    for graph in (stats.graphs if stats is not None else []):
        for result in graph.results:
            if result.pass_name != _SPARSIFY:
                continue
            disabled |= bool(result.disabled)
            for change in result.changes:
                changes[change.weight].append(change)
            for skip in result.skipped:
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
    if isinstance(site, ExpertSite):
        return _expert_row(model, site, status, tokens)
    rewritten, reason, detail = status
    weight = site.weight
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
        blocks=describe_selection(site.layout, site.blocks, site.block_note),
    )


def _expert_row(model: GrassModel, site: ExpertSite, status: tuple, tokens: Optional[int]) -> WeightRow:
    """An expert stack (E, m, n): each of the T * k token-expert pairs (k experts per token,
    from the module's config when it names one) multiplies one (m, n) matrix."""
    rewritten, reason, detail = status
    weight = site.weight
    experts, m, n = (int(s) for s in weight.shape)
    r, elt = site.rank, weight.element_size()
    module = model.module.get_submodule(site.module_name)
    per_token = int(getattr(getattr(module, "config", None), "num_experts_per_tok", 1) or 1)
    why = expert_reason(module, site.attr, weight) or "expert stack named by targets="
    dense = 2 * T * per_token * m * n
    return WeightRow(
        name=site.name, shape=(experts, m, n), rank=r, dim="rows/expert", rewritten=rewritten, reason=reason,
        detail=f"{why}; {detail}" if detail else why, tokens=tokens,
        flops_dense=dense, flops_grassfx=2 * T * per_token * r * n if rewritten else dense,
        grad_bytes_dense=experts * m * n * elt, grad_bytes_grassfx=experts * r * n * elt,
        state_bytes_dense=_MOMENTS * experts * m * n * elt, state_bytes_grassfx=_MOMENTS * experts * r * n * elt,
    )


def _unprojected(model: GrassModel) -> list:
    """Every parameter name of the user's module trained densely, with the reason discovery gave."""
    return [Unprojected(d.name, d.shape, d.reason) for d in model.target_decisions if d.reason]
