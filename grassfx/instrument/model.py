"""``GrassModel``: the user's module with every target weight anchored.

``GrassModel`` wraps the user's module without editing it and composes the pieces of
this package: a :class:`~grassfx.instrument.site.Site` per target weight, anchors
installed by class swap (:mod:`~grassfx.instrument.swap`), the refresh state machine
and step counter (:mod:`~grassfx.instrument.refresh`), misuse checks
(:mod:`~grassfx.instrument.guard`) and the registry the optimizer reads
(:mod:`~grassfx.instrument.registry`). Data parallelism is attached by
:mod:`grassfx.distributed`, compilation by :mod:`grassfx.compiler`; neither is imported
here until it is needed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
import weakref

import torch
from torch import nn

from grassfx import _compat
from grassfx.config import GrassConfig
from grassfx.core.decay import settle
from grassfx.errors import GrassError

from . import guard, registry, surgery, swap
from .anchors import Anchor, FullAnchor, RefreshAnchor, RefusingAnchor
from .blocks import plan_layouts
from .experts import ExpertSite, make_expert_anchor, make_site
from .refresh import RefreshSchedule
from .site import Site

__all__ = ["GrassModel", "unwrap"]


class GrassModel(nn.Module):
    """A model whose target weights train by Grass. Made by :func:`grassfx.compile`."""

    def __init__(self, module: nn.Module, specs: list, config: GrassConfig, decisions: list = ()):
        super().__init__()
        self.module = module
        self.grass_config = config
        layouts = plan_layouts(module, specs, config)  # fused weights (q|k|v, gate|up) select per block
        self.sites = nn.ModuleList(make_site(spec, i, module.get_parameter(spec.name), config, layouts[i])
                                   for i, spec in enumerate(specs))
        self.register_buffer("grass_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("grass_refreshed_at", torch.full((), -1, dtype=torch.int64))
        self.target_decisions = list(decisions)  # grassfx.instrument.targets.Decision per parameter name
        self._frozen_flags = {}
        for spec in specs:
            w = module.get_parameter(spec.name)
            self._frozen_flags[spec.name] = w.requires_grad
            w.requires_grad_(False)
        # whoever saves the user's module (state_dict, save_pretrained) saves settled weights
        self._settle_hook = module.register_state_dict_pre_hook(_settle_owed_decay)
        self._load_hooks = _hook_loads(module, specs)  # loaded weights owe no decay
        self._slot = swap.AnchorSlot()
        swap.install(module, {id(module.get_parameter(s.name)): s.name for s in specs}, self._slot)
        self._unwrapped = False
        self._schedule = RefreshSchedule(self)
        self._link()
        guard.install_optimizer_check()
        self._runner = self._run
        self.compile_report = None  # a grassfx.compiler.CompileReport for compiled backends
        self._compiler = None  # what made the runner (compile_with); called again for a copy
        self._dp = None  # grassfx.distributed.DataParallel once a process group is seen
        self._dp_checked = False

    # -- access -------------------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "sites") or name.startswith("_"):
                raise
            return getattr(self.module, name)

    def weight_of(self, site: Site) -> torch.Tensor:
        """The projected weight itself (the Parameter, never an anchored view)."""
        return site.weight

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"{name!r} is not a projected weight; projected: {[s.name for s in self.sites]}")

    def _link(self) -> None:
        """Point the sites at their weights and schedule, and publish them (after init or a copy)."""
        for site in self.sites:
            site.link(self.module.get_submodule(site.module_name), self._schedule)
        surgery.bind(self)  # user freezes of projected weights are recorded (surgery.py)
        registry.register(self.sites, self.named_parameters())

    _NOT_COPIED = ("_runner", "compile_report", "_dp", "_dp_checked", "_schedule", "_settle_hook", "_load_hooks")

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        memo[id(self._schedule)] = None  # the copy gets its own schedule below
        for key, value in self.__dict__.items():
            if key not in self._NOT_COPIED:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._relink_copy(set(self._schedule.pending), self._schedule.pending_ok)
        return new

    def __getstate__(self):
        """Pickling (``torch.save(model)``): what ``__deepcopy__`` copies, and the pending refresh."""
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_COPIED + ("_bound_weights",)}
        state["_grassfx_pending"] = (set(self._schedule.pending), self._schedule.pending_ok)
        return state

    def __setstate__(self, state):
        state = dict(state)
        pending, pending_ok = state.pop("_grassfx_pending")
        self.__dict__.update(state)
        self._relink_copy(pending, pending_ok)

    def _relink_copy(self, pending: set, pending_ok: bool) -> None:
        """A deep copy or an unpickled model: own schedule, sites relinked, compiled runner again."""
        self._schedule = RefreshSchedule(self)
        self._schedule.pending = pending
        self._schedule.pending_ok = pending_ok
        self._link()
        self._runner, self.compile_report = self._run, None
        self._dp, self._dp_checked = None, False
        self._settle_hook = None  # the copied module carries a copy of the hook
        self._load_hooks = []  # and copies of these
        if "_compiler" not in self.__dict__ and self.grass_config.backend != "eager":
            warnings.warn(f"this grassfx model was pickled by an older grassfx and keeps no compiler: it runs "
                          f"eagerly (correct, slower) instead of with backend={self.grass_config.backend!r}; "
                          "grassfx.compile(grassfx.unwrap(model), ...) compiles it again", stacklevel=3)
        self.compile_with(self.__dict__.get("_compiler"))

    def compile_with(self, compiler) -> None:
        """Run this model through ``compiler(run, config, collectives) -> (runner, report)``
        (``grassfx.compile`` passes :func:`grassfx.compiler.compile_runner`): forwards call the
        runner, ``compile_report`` is the report. Kept, and called again for a deep copy or an
        unpickled model (their compiled code is not copied). None, or the eager backend: no-op."""
        self._compiler = compiler
        if compiler is None or self.grass_config.backend == "eager":
            return
        ref = weakref.ref(self)

        def collectives():
            model = ref()
            return model.graph_collectives() if model is not None else None

        self._runner, self.compile_report = compiler(self._run, self.grass_config, collectives)

    @property
    def step(self) -> int:
        return int(self.grass_step)

    def schedule_snapshot(self) -> dict:
        """A copy of the refresh schedule's bookkeeping (pending refreshes, forward generations),
        for :meth:`restore_schedule`: ``grassfx.explain`` runs a probe on the model itself and
        puts everything back."""
        return self._schedule.snapshot()

    def restore_schedule(self, snapshot: dict) -> None:
        """Put back the bookkeeping :meth:`schedule_snapshot` copied."""
        self._schedule.restore(snapshot)

    # -- forward ------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        if self._unwrapped:
            raise GrassError("this grassfx model was unwrapped; use the module grassfx.unwrap returned")
        guard.check_handles_untouched(self.sites)
        surgery.check(self)
        if not torch.is_grad_enabled():
            # an evaluation forward between a forward and its backward: that backward's
            # activation checkpointing still recomputes with the earlier forward's anchors
            with self._slot.kept():
                return self._runner(None, args, kwargs)
        self._slot.clear()
        dp = self.data_parallel()
        refresh = self._schedule.begin_if_due()
        if dp is not None and refresh is not None:
            dp.expect_refresh([s for s, plan in zip(self.sites, refresh) if plan is not None])
        if refresh is None and self._redo_refresh_eagerly():
            return self._run(None, args, kwargs, eager=True)  # as the checkpointed refresh step ran
        if refresh is not None and self.grass_config.refresh == "eager":
            return self._run(refresh, args, kwargs, eager=True)  # compiled or not, a refresh runs eagerly
        out = self._runner(refresh, args, kwargs)
        if self._runner != self._run:
            # after a compiled forward, a read of a projected weight outside the graph (a penalty
            # ``lam * model.module.fc.weight.pow(2).sum()``, the recomputation of a checkpointed
            # region Dynamo ran eagerly) still routes its gradient to the handle, as after an
            # eager forward: one eager anchor per weight (per checkpoint call when recomputed),
            # served while the weight is unchanged (the optimizer's step ends it). At a compiled
            # refresh step the rows are picked inside the graph, so such a gradient cannot join
            # them: it raises
            make = _make_anchor if refresh is None else _refresh_graph_anchor
            self._slot.begin(make, self._entries(refresh), upfront=False, eager=True, changed=_changed_anchor)
        return out

    # an outer torch.compile(model) graph-breaks here instead of tracing grassfx's Python
    # state (anchors, refresh probes, the step counter) into its graph; the runner inside
    # still compiles with grassfx's backend
    _forward = _compat.opaque_to_dynamo(_forward)

    class _ForwardDescriptor:
        """``model.forward``: a :class:`_Forward`; on the class, the plain function."""

        def __get__(self, model, owner=None):
            return owner._forward if model is None else _Forward(model)

    forward = _ForwardDescriptor()

    def data_parallel(self):
        """The gradient reducer when training data-parallel, else None."""
        if not self._dp_checked:
            from grassfx.distributed import attach

            self._dp = attach(self)
            self._dp_checked = True
        if self._dp is not None:
            self._dp.first_forward()
        return self._dp

    @contextlib.contextmanager
    def no_sync(self):
        """Skip gradient averaging (for all but the last micro-batch of an accumulation);
        with FSDP2, also its reduce-scatter (``set_requires_gradient_sync(False)`` on every
        ``fully_shard`` module, set back to True on exit)."""
        from grassfx.fsdp import fsdp2_modules

        sharded = fsdp2_modules(self.module)
        for module in sharded:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            with self._dp.no_sync() if self._dp is not None else contextlib.nullcontext():
                yield
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True, recurse=False)

    def graph_collectives(self):
        """``(group name, world size)`` when compiled graphs should average gradients, else None."""
        dp = self._dp
        if dp is None or not dp.enabled:
            return None
        return dp.group.group_name, dp.size

    def _run(self, refresh, args, kwargs, eager=None):
        """The traced region: run the module; each target weight is anchored where it is read.

        ``eager``: whether this call runs uncompiled (``None``: as the backend says)."""
        entries = self._entries(refresh)
        # compiled backends: Dynamo may run this function itself eagerly (a graph break in
        # the module makes it skip the frame) while it compiles the module's frames, so
        # the backend decides, not torch.compiler.is_compiling()
        if eager is None:
            eager = self.grass_config.backend == "eager"
        self._slot.begin(_make_anchor, entries, upfront=eager or refresh is not None, eager=eager,
                         changed=_changed_anchor if eager else None)
        try:
            return self.module(*args, **kwargs)
        finally:
            # kept until the next forward: a checkpointed region that Dynamo runs eagerly (a
            # graph break inside it) recomputes in the backward, reading the weights again;
            # a compiled refresh forward's anchors are graph outputs (kept, they hold memory)
            if not torch.is_grad_enabled() or (refresh is not None and not eager):
                self._slot.clear()

    def _entries(self, refresh) -> dict:
        """What each weight's anchor needs in one forward: ``{name: (site, plan, group, size)}``."""
        group, size = self._dp.group_and_size() if self._dp is not None else ("", 1)
        return {site.name: (site, None if refresh is None else refresh[i], group, size)
                for i, site in enumerate(self.sites)}

    def cancel_refresh(self) -> None:
        """Discard a refresh whose forward ran but whose backward will not run."""
        self._schedule.cancel()

    def _redo_refresh_eagerly(self) -> bool:
        """Whether this forward redoes, from a checkpoint, a refresh step that ran eagerly.

        A checkpoint between ``backward()`` and ``step()`` of a refresh step holds the new
        rows; the resumed run redoes that step as a normal step. The interrupted run ran it
        eagerly (``refresh="eager"``), so the redo runs eagerly too: a compiled graph's
        gradients differ from eager ones in the last bits (Inductor's own reductions), and
        the resumed run would not continue bit for bit. Not under data parallelism with
        graphs that average the compressed gradients (an eager step there would skip them).
        """
        if not self.__dict__.get("_redo_eager") or not torch.is_grad_enabled():
            return False
        self._redo_eager = False
        eager_refresh = self.grass_config.refresh == "eager" and self.grass_config.backend != "eager"
        return eager_refresh and (self._dp is None or not self._dp.enabled)

    @property
    def _pending(self) -> set:
        return self._schedule.pending

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        prev = {i: state_dict.pop(f"sites.{i}.{self._PREV_IDX}", None) for i in range(len(self.sites))}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._link()  # assign=True may have put new handle tensors in place
        self._schedule.cancel()
        for i, site in enumerate(self.sites):
            site.prev_idx, site.refreshed = None, False
            if prev[i] is not None:
                site.prev_idx, site.refreshed = prev[i].to(site.idx.device).clone(), True
        # saved between backward() and step() of a refresh step: the redone step runs as that one did
        self._redo_eager = any(p is not None for p in prev.values())
        guard.snapshot_handle_versions(self.sites)
        return result

    # -- leaving grassfx ----------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """The state with owed weight decay applied first: saved weights are the weights as they are.

        Unselected rows owe decoupled weight decay until the next refresh
        (:mod:`grassfx.optim.decay`); saving applies it in place (as ``unwrap`` does), so
        the saving run and a run resumed from what it saved go on identically. Take it
        after ``backward()`` or ``step()``, not between a forward and its backward.
        """
        self.materialize_weight_decay()
        return super().state_dict(*args, **kwargs)

    _PREV_IDX = "refresh_prev_idx"  # per site, only while a committed refresh awaits the optimizer

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # a checkpoint between backward() and step() at a refresh step: the optimizer still
        # has to see the refresh (moments reset or remapped from the rows of before)
        for i, site in enumerate(self.sites):
            if site.refreshed and site.prev_idx is not None:
                destination[f"{prefix}sites.{i}.{self._PREV_IDX}"] = site.prev_idx.clone()

    @torch.no_grad()
    def materialize_weight_decay(self) -> None:
        """Apply the weight decay still owed by unselected rows (see grassfx.optim.decay)."""
        for site in self.sites:
            _settle_site(site)


def _make_anchor(entry) -> torch.Tensor:
    """The anchored weight of one site for one forward; ``entry = (site, refresh plan or None, group, size)``."""
    site, plan, group, size = entry
    w = site.weight
    if not site.trainable:  # frozen by the user: no gradient reaches the handle
        return w
    if site.full:
        return FullAnchor.apply(w, site.handle)
    if isinstance(site, ExpertSite):
        return make_expert_anchor(site, plan, group, size)
    if plan is not None:
        probe, noise, age = plan
        return RefreshAnchor.apply(
            w, site.handle, probe, noise, age, site.dim, site.rank, site.explore, site.method, group, size,
            site.block_labels, site.blocks,
        )
    return Anchor.apply(w, site.handle, site.idx, site.rho, site.dim, site.name)


def _refusing(entry, message: str) -> torch.Tensor:
    site = entry[0]
    if not site.trainable:
        return site.weight
    return RefusingAnchor.apply(site.weight, site.handle, message.format(name=site.name))


def _refresh_graph_anchor(entry) -> torch.Tensor:
    """A read outside a refresh step compiled as its own graph."""
    return _refusing(entry, (
        "a gradient reached {name!r} through a read outside the model's forward (e.g. a penalty on "
        "the weight) at a refresh step compiled as its own graph (grassfx.compile(..., "
        "refresh='compiled')); it cannot join the rows that graph picks. Use refresh='eager' (the "
        "default), or compute the term inside the model's forward"))


def _changed_anchor(entry) -> torch.Tensor:
    """A read after the weight changed in place (the optimizer stepped), before the next forward."""
    return _refusing(entry, (
        "a gradient reached {name!r} through a read made after the weight changed (the optimizer's "
        "step) and before the model's next forward, e.g. a penalty computed before calling the "
        "model: the next forward may pick new rows, so it has no rows to go to. Compute the term "
        "after the model's forward"))


class _Forward:
    """``GrassModel.forward`` bound to a model, showing the wrapped module's signature.

    Code that inspects ``model.forward`` (the Hugging Face Trainer drops the batch columns
    it does not name, and checks for ``**kwargs``) sees the user's module's parameters.
    """

    __slots__ = ("_model",)

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._model._forward(*args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(self._model.module.forward)

    @property
    def __self__(self):
        return self._model

    @property
    def __func__(self):
        return GrassModel._forward


@torch.no_grad()
def _settle_site(site) -> None:
    """Pay a site's owed decay: rows outside the selection the debt accrued under."""
    # after a refresh the optimizer has not handled yet, the debt is that of the old rows
    site = site.matrix()  # an expert stack: the same rules on its (E*m, n) view
    settle(site, site.prev_idx if site.refreshed and site.prev_idx is not None else site.idx)


def _settle_owed_decay(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook on the user's module: settle the sites of its projected weights."""
    for param in module.parameters():
        site = registry.target_of(param)
        if site is not None:
            _settle_site(site)


def _loaded_weights_owe_nothing(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook on a module owning projected weights: a weight being loaded
    replaces every row, so its site owes no decay (the debt was the old weights')."""
    for name, param in module.named_parameters(recurse=False):
        site = registry.target_of(param)
        if site is not None and prefix + name in state_dict:
            site.decay_pending.fill_(1.0)


def _hook_loads(module: nn.Module, specs) -> list:
    """:func:`_loaded_weights_owe_nothing` on every module owning a target (the handles)."""
    owners = dict.fromkeys(spec.module_name for spec in specs)
    return [module.get_submodule(name).register_load_state_dict_pre_hook(_loaded_weights_owe_nothing)
            for name in owners]


def unwrap(model: nn.Module) -> nn.Module:
    """The original module with its trained weights and none of grassfx's state.

    Owed weight decay is applied and each weight's ``requires_grad`` is restored. The
    returned module's ``state_dict()`` has exactly its original keys and its modules their
    original classes. The grassfx model must not be used afterwards.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> inner = unwrap(grassfx.compile(net, rank=2, backend="eager"))
        >>> inner is net
        True
    """
    if not isinstance(model, GrassModel):
        raise GrassError(f"unwrap() takes a model returned by grassfx.compile, got {type(model).__name__}")
    for site in surgery.routed(model):  # a replaced weight is the user's: left alone
        _settle_site(site)
    if model._settle_hook is not None:
        model._settle_hook.remove()
    for hook in getattr(model, "_load_hooks", ()):
        hook.remove()
    model._slot.clear()
    model._unwrapped = True
    registry.forget_weights(surgery.routed(model))
    swap.uninstall(model.module)
    for site, weight in zip(model.sites, surgery.bound_weights(model)):
        if weight is not None:  # requires_grad as the user last set it
            surgery.release(weight, model._frozen_flags.get(site.name, True))
    return model.module
