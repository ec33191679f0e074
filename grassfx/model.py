"""The instrumented model: anchors, handles, selections and refreshes.

``GrassModel`` wraps the user's module without editing it. Each target weight ``W``
(m x n) is frozen, and gets a :class:`Site` holding

* ``handle`` — a zero parameter of the compressed gradient's shape ((r, n) for row
  selection, (m, r) for columns); its ``.grad`` receives ``C = rho * G[idx]``,
* ``idx`` / ``rho`` — buffers: the selected rows and their scales,
* ``decay_pending`` — decoupled weight decay owed by rows outside ``idx`` (see optim).

Each module that owns a target weight gets a generated subclass (its class is swapped
per instance, as ``torch.nn.utils.parametrize`` does) whose ``weight`` property returns
the anchored view made for the current forward; the parameter itself stays in
``_parameters``, so the module's code and ``state_dict`` keys are untouched. One anchor
per weight per forward: a weight read twice (shared layers, tied modules) is one node.
In eager mode the anchors stay readable after the forward, so activation checkpointing
recomputes with them; in compiled code they are cleared before the traced region ends. Every ``update_freq`` optimizer steps, the first forward with gradients on
is a *refresh*: its backward picks new rows from the dense gradient's row norms and the
compressed gradient of that same step already uses them.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from . import select as _select
from .config import GrassConfig
from .errors import GrassError, OptimizerMisuseError
from .ops import Anchor, RefreshAnchor
from .targets import TargetSpec

__all__ = ["Site", "GrassModel", "FullAnchor"]


class AnchorSlot:
    """Shared between a GrassModel and its swapped modules: this forward's anchors."""

    def __init__(self):
        self.anchors = None  # {weight name: anchored tensor} while a forward is live
        self.versions = None  # eager only: {weight name: weight._version at the forward}

    def __deepcopy__(self, memo):
        return AnchorSlot()  # a copy starts between forwards


_SUBCLASSES: dict = {}


def _anchored_read(attr: str):
    def read(module):
        params = module.__dict__["_parameters"]
        slot = module.__dict__["_grassfx_slot"]
        if slot.anchors is None:
            return params[attr]
        name = module.__dict__["_grassfx_names"][attr]
        if slot.versions is not None and slot.versions[name] != params[attr]._version:
            return params[attr]  # the weight changed since that forward: its anchor is stale
        return slot.anchors[name]

    return read


def _swapped_class(cls: type, attrs: tuple) -> type:
    """A subclass of ``cls`` whose ``attrs`` read the current anchors (cached per class)."""
    key = (cls, attrs)
    if key not in _SUBCLASSES:
        props = {a: property(_anchored_read(a)) for a in attrs}
        props["_grassfx_original_class"] = cls
        _SUBCLASSES[key] = type(f"Grass{cls.__name__}", (cls,), props)
    return _SUBCLASSES[key]


def _install(module: nn.Module, attr: str, name: str, slot: AnchorSlot) -> None:
    names = dict(module.__dict__.get("_grassfx_names", {}))
    names[attr] = name
    base = getattr(type(module), "_grassfx_original_class", type(module))
    module.__dict__["_grassfx_names"] = names
    module.__dict__["_grassfx_slot"] = slot
    module.__class__ = _swapped_class(base, tuple(sorted(names)))


def _uninstall(module: nn.Module) -> None:
    base = getattr(type(module), "_grassfx_original_class", None)
    if base is not None:
        module.__class__ = base
    module.__dict__.pop("_grassfx_names", None)
    module.__dict__.pop("_grassfx_slot", None)


class FullAnchor(torch.autograd.Function):
    """``rank >= rows``: every row is kept, the handle receives the dense gradient."""

    @staticmethod
    def forward(ctx, weight, handle):
        ctx.handle_dtype = handle.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.handle_dtype)


class Site(nn.Module):
    """Grass state of one projected weight (see the module docstring)."""

    def __init__(self, spec: TargetSpec, index: int, weight: torch.Tensor, config: GrassConfig):
        super().__init__()
        self.name = spec.name
        self.module_name = spec.module_name
        self.attr = spec.attr
        self.kind = spec.kind
        self.index = index
        self.dim = config.select_dim(tuple(weight.shape))
        self.rows = int(weight.shape[self.dim])
        self.rank = config.rows_kept(self.rows)
        self.full = self.rank >= self.rows
        self.method = config.selection
        self.explore = config.explored(self.rank) if not self.full else 0
        shape = list(weight.shape)
        shape[self.dim] = self.rank
        self.handle = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        self.register_buffer("idx", torch.arange(self.rank, device=weight.device))
        self.register_buffer("rho", torch.ones(self.rank, device=weight.device))
        self.register_buffer("decay_pending", torch.ones((), dtype=torch.float64, device=weight.device))
        # the step at which each row was last selected (-1: never); coverage (explore) reads it
        self.register_buffer("last_seen", torch.full((self.rows,), -1, dtype=torch.int64, device=weight.device))
        self.prev_idx = None  # rows selected before the last refresh (set when one commits)
        self.refreshed = False  # a refresh committed and the optimizer has not seen it yet
        self.handle_version = self.handle._version

    @property
    def needs_norms(self) -> bool:
        return not self.full and self.method in _select.NEEDS_NORMS

    def extra_repr(self) -> str:
        axis = "rows" if self.dim == 0 else "cols"
        return f"{self.name!r}, {axis} {self.rank}/{self.rows}, selection={self.method}"

    def commit(self, idx: torch.Tensor, rho: torch.Tensor, step: int) -> None:
        """Install a new selection (called by a refresh at optimizer step ``step``)."""
        self.prev_idx = self.idx.clone()
        with torch.no_grad():
            self.idx.copy_(idx.to(self.idx.device))
            self.rho.copy_(rho.to(self.rho.device))
            self.last_seen.index_fill_(0, self.idx, step)
        self.refreshed = True

    def ages(self, step: int) -> torch.Tensor:
        """Steps since each row was last selected (never selected: ``step + 1``), float64 (m,)."""
        return (step - self.last_seen).to(torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "last_seen"
        if key not in state_dict:  # a checkpoint from before coverage tracking: nothing seen yet
            state_dict = dict(state_dict)
            state_dict[key] = torch.full_like(self.last_seen, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class GrassModel(nn.Module):
    """A model whose target weights train by Grass. Made by :func:`grassfx.compile`."""

    def __init__(self, module: nn.Module, specs: list, config: GrassConfig):
        super().__init__()
        self.module = module
        self.grass_config = config
        sites = []
        for i, spec in enumerate(specs):
            weight = module.get_parameter(spec.name)
            sites.append(Site(spec, i, weight, config))
        self.sites = nn.ModuleList(sites)
        self.register_buffer("grass_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("grass_refreshed_at", torch.full((), -1, dtype=torch.int64))
        self._frozen_flags = {}
        for site in self.sites:
            w = self.weight_of(site)
            self._frozen_flags[site.name] = w.requires_grad
            w.requires_grad_(False)
        self._slot = AnchorSlot()
        self._unwrapped = False
        by_id = {id(self.weight_of(site)): site for site in self.sites}
        for mod in module.modules():
            for attr, p in list(mod._parameters.items()):
                if p is not None and id(p) in by_id:
                    _install(mod, attr, by_id[id(p)].name, self._slot)
        self._link()
        self._pending = set()  # indices of sites whose refresh backward has not run yet
        self._pending_ok = True  # False once a pending refresh saw a non-finite gradient
        self._runner = self._run
        self.compile_stats = None  # filled by grassfx.backend for compiled backends
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
        return self.module.get_submodule(site.module_name)._parameters[site.attr]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"{name!r} is not a projected weight; projected: {[s.name for s in self.sites]}")

    def _link(self) -> None:
        """Point sites, handles and weights at this model (after init or a deep copy)."""
        for site in self.sites:
            object.__setattr__(site, "model", self)  # not a submodule: no cycle in modules()
            site.handle._grassfx_site = site  # lets grassfx.optim find the site of a handle
            self.weight_of(site)._grassfx_target = weakref.ref(site)  # spots a missing handle

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        skip = ("_runner", "compile_stats", "_dp", "_dp_checked")
        for key, value in self.__dict__.items():
            if key not in skip:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._link()
        new._runner, new.compile_stats = new._run, None
        new._dp, new._dp_checked = None, False
        if new.grass_config.backend != "eager":
            from .backend import install_compiled_runner

            install_compiled_runner(new)
        return new

    @property
    def step(self) -> int:
        return int(self.grass_step)

    # -- forward ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._unwrapped:
            raise GrassError("this grassfx model was unwrapped; use the module grassfx.unwrap returned")
        self._check_handles_untouched()
        self._slot.anchors = None
        refresh = None
        if torch.is_grad_enabled():
            dp = self.data_parallel()
            refresh = self._begin_refresh_if_due()
            if dp is not None and refresh is not None:
                dp.refresh_backward = True
                # the refresh backward all-reduces each such weight's dense gradient once
                dp.bytes_sent["refresh_dense"] += sum(
                    self.weight_of(s).numel() * self.weight_of(s).element_size()
                    for s, plan in zip(self.sites, refresh) if plan is not None)
        return self._runner(refresh, args, kwargs)

    def data_parallel(self):
        """The gradient reducer when training data-parallel, else None."""
        if not self._dp_checked:
            from .distributed import DataParallel, world

            group, size = world()
            if size > 1 and self.grass_config.data_parallel is not False:
                self._dp = DataParallel(self, group, size)
            self._dp_checked = True
        if self._dp is not None:
            self._dp.first_forward()
        return self._dp

    def no_sync(self):
        """Skip gradient averaging (for all but the last micro-batch of an accumulation)."""
        import contextlib

        return self._dp.no_sync() if self._dp is not None else contextlib.nullcontext()

    def _run(self, refresh, args, kwargs):
        """The traced region: anchor every target weight once, then run the module."""
        anchored = {}
        for i, site in enumerate(self.sites):
            w = self.module.get_submodule(site.module_name)._parameters[site.attr]
            if site.full:
                anchored[site.name] = FullAnchor.apply(w, site.handle)
            elif refresh is not None and refresh[i] is not None:
                probe, noise, age = refresh[i]
                group, size = self._dp_group()
                anchored[site.name] = RefreshAnchor.apply(
                    w, site.handle, probe, noise, age, site.dim, site.rank, site.explore, site.method, group, size
                )
            else:
                anchored[site.name] = Anchor.apply(w, site.handle, site.idx, site.rho, site.dim, site.name)
        self._slot.anchors = anchored
        if not torch.compiler.is_compiling():
            self._slot.versions = {s.name: self.weight_of(s)._version for s in self.sites}
        try:
            return self.module(*args, **kwargs)
        finally:
            if torch.compiler.is_compiling() or not torch.is_grad_enabled():
                self._slot.anchors = None

    def _dp_group(self):
        dp = self._dp
        if dp is None:
            return "", 1
        return dp.group.group_name, dp.size

    def _refresh_due(self) -> bool:
        step = int(self.grass_step)
        return step % self.grass_config.update_freq == 0 and int(self.grass_refreshed_at) != step

    def _begin_refresh_if_due(self):
        if self._pending:
            raise GrassError(
                "a refresh step's forward ran but its backward() has not: at a refresh step "
                f"(every update_freq={self.grass_config.update_freq} optimizer steps) call "
                "backward() on the first forward's loss before another forward with gradients "
                "on, or call model.cancel_refresh() to discard it"
            )
        if not self._refresh_due():
            return None
        step = int(self.grass_step)
        cfg = self.grass_config
        plan = [None] * len(self.sites)
        for i, site in enumerate(self.sites):
            if site.full:
                continue
            gen = _select.site_generator(cfg.seed, site.index, step)
            if site.method == "uniform":
                site.commit(*_select.draw_uniform(site.rows, site.rank, gen), step)
                continue
            noise = _select.draw_noise(site.method, site.rows, site.rank, gen).to(site.idx.device)
            age = site.ages(step) if site.explore else torch.zeros(0, dtype=torch.float64, device=site.idx.device)
            probe = torch.zeros(2, site.rank, dtype=torch.float64, device=site.idx.device, requires_grad=True)
            probe.register_post_accumulate_grad_hook(self._make_commit_hook(i))
            plan[i] = (probe, noise, age)
            self._pending.add(i)
        self._pending_ok = True
        if not self._pending:
            self.grass_refreshed_at.fill_(step)
            return None
        return plan

    def _make_commit_hook(self, i: int):
        def hook(probe: torch.Tensor) -> None:
            record = probe.grad
            probe.grad = None
            if i not in self._pending:
                return  # cancelled refresh
            self._pending.discard(i)
            site = self.sites[i]
            if not self._pending_ok:
                return
            if not bool(torch.isfinite(record).all()) or not bool((record[1] > 0).all()):
                # NaN/Inf gradient: keep the old rows and refresh again on the next forward
                # (the optimizer refuses this step's non-finite compressed gradient).
                self._pending_ok = False
                return
            site.commit(record[0].round().long().clamp_(0, site.rows - 1), record[1].float(), int(self.grass_step))
            if not self._pending and self._pending_ok:
                self.grass_refreshed_at.fill_(int(self.grass_step))

        return hook

    def cancel_refresh(self) -> None:
        """Discard a refresh whose forward ran but whose backward will not run."""
        self._pending.clear()

    # -- misuse checks ------------------------------------------------------------------
    def _check_handles_untouched(self) -> None:
        for site in self.sites:
            if site.handle._version == site.handle_version:
                continue
            # written in place since the last check: harmless if it still holds zeros
            # (e.g. DDP's initial broadcast); a foreign optimizer step leaves nonzeros
            if not bool(site.handle.detach().any()):
                site.handle_version = site.handle._version
                continue
            raise OptimizerMisuseError(
                f"the gradient handle of {site.name!r} was modified in place: an optimizer that "
                "is not grassfx-aware (e.g. torch.optim.AdamW) is stepping this model's "
                "parameters, which would train none of the projected weights. Use "
                "grassfx.optim.AdamW / SGD / Adafactor with model.parameters()"
            )

    def _snapshot_handle_versions(self) -> None:
        for site in self.sites:
            site.handle_version = site.handle._version

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if "sites" in self._modules:
            self._snapshot_handle_versions()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._pending.clear()
        for site in self.sites:
            site.prev_idx, site.refreshed = None, False
        self._snapshot_handle_versions()
        return result

    # -- leaving grassfx ----------------------------------------------------------------
    @torch.no_grad()
    def materialize_weight_decay(self) -> None:
        """Apply the weight decay still owed by unselected rows (see grassfx.optim)."""
        for site in self.sites:
            factor = float(site.decay_pending)
            if factor != 1.0:
                w = self.weight_of(site)
                keep = torch.zeros(site.rows, dtype=torch.bool, device=w.device)
                keep[site.idx] = True
                scale = torch.where(keep, 1.0, factor).to(w.dtype)
                w.mul_(scale.unsqueeze(1 - site.dim))
                site.decay_pending.fill_(1.0)


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
    model.materialize_weight_decay()
    model._slot.anchors = None
    model._unwrapped = True
    for mod in model.module.modules():
        _uninstall(mod)
    for site in model.sites:
        w = model.weight_of(site)
        w.requires_grad_(model._frozen_flags.get(site.name, True))
        if hasattr(w, "_grassfx_target"):
            del w._grassfx_target
    return model.module
