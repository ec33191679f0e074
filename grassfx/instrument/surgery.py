"""Changes a user makes to a compiled model: freezing projected weights, replacing parts.

**Freezing.** grassfx sets every projected weight's ``requires_grad`` to False itself (its
gradient reaches the site's handle through the anchor), so a user's
``layer.requires_grad_(False)`` or ``p.requires_grad = False`` would change nothing and
the weight would keep training through its handle. Each projected weight's Parameter
therefore has its class swapped, per instance (as modules are in :mod:`.swap`), to
:class:`ProjectedWeight`, whose ``requires_grad`` setter and ``requires_grad_`` record the
user's intent; reading ``requires_grad`` still gives False (autograd, DDP, FSDP and
counters of trainable parameters see a frozen tensor). Each forward copies the intent
into ``site.trainable``. An untrainable site makes no anchor: the module reads the
Parameter itself, so the handle receives no gradient and the optimizer passes it by, as
``torch.optim`` passes a frozen parameter whose gradient is None (moments and per-row
step counts kept; no weight decay); refreshes skip it. Unfrozen, it trains on with its
rows and moments of before. ``grassfx.unwrap`` gives the Parameter its class back and the
user's latest ``requires_grad``.

**Replacement.** A projected module replaced after compile (``model.module[4] =
nn.Linear(...)``) or a projected weight replaced on its module (``module.weight =
nn.Parameter(...)``) would leave its site routing a weight no forward reads, and the new
one untrained or trained densely by nobody. Each forward checks every site (a submodule
lookup and an identity test) and raises :class:`grassfx.ModelChangedError`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from grassfx import _compat
from grassfx.errors import ModelChangedError

__all__ = ["ProjectedWeight", "bind", "check", "release", "trainable"]

_INTENT = "_grassfx_trainable"  # the user's requires_grad, in the Parameter's __dict__


class ProjectedWeight(nn.Parameter):
    """A projected weight: ``requires_grad`` reads False; setting it records the user's intent."""

    @property
    def requires_grad(self):
        return super().requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        self.__dict__[_INTENT] = bool(value)

    def requires_grad_(self, requires_grad: bool = True):
        self.__dict__[_INTENT] = bool(requires_grad)
        return self

    def __deepcopy__(self, memo):
        # a plain Parameter carrying the intent: a copied GrassModel swaps it again when it
        # relinks (bind), and a module copied on its own is an ordinary frozen module
        new = nn.Parameter(self.data.clone(memory_format=torch.preserve_format), requires_grad=False)
        if _INTENT in self.__dict__:
            new.__dict__[_INTENT] = self.__dict__[_INTENT]
        memo[id(self)] = new
        return new


def trainable(param) -> bool:
    """The user's latest ``requires_grad`` for a projected weight (True unless they froze it)."""
    return bool(getattr(param, "__dict__", {}).get(_INTENT, True))


def bind(model) -> None:
    """Give every projected weight of ``model`` its recording class; remember which weight each site routes."""
    bound = []
    for site in model.sites:
        weight = site.weight
        if type(weight) is nn.Parameter:  # an FSDP2 shard (a DTensor) keeps its class: not covered
            _compat.set_parameter_class(weight, ProjectedWeight)
        site.trainable = trainable(weight)  # an instance attribute from the start: one guard for Dynamo
        path = tuple(site.module_name.split(".")) if site.module_name else ()
        bound.append((weakref.ref(weight), path))
    model.__dict__["_bound_weights"] = bound


def release(param, default: bool) -> None:
    """``param`` leaves grassfx: its class back to ``nn.Parameter``, ``requires_grad`` as the user last set it."""
    wanted = bool(param.__dict__.pop(_INTENT, default)) if hasattr(param, "__dict__") else default
    if type(param) is ProjectedWeight:
        _compat.set_parameter_class(param, nn.Parameter)
    param.requires_grad_(wanted)


def check(model) -> None:
    """Raise if a projected module or weight was replaced; copy each weight's trainability into its site."""
    bound = model.__dict__.get("_bound_weights")
    if bound is None:
        return
    root = _compat.child_modules(model)["module"]
    for site, (ref, path) in zip(model.sites, bound):
        owner = site._owner() if site._owner is not None else None
        current = root
        for part in path:  # get_submodule's walk, by plain dict lookups (this runs every forward)
            current = _compat.child_modules(current).get(part) if current is not None else None
        if current is None or current is not owner or "_grassfx_slot" not in current.__dict__:
            raise ModelChangedError(
                f"module {site.module_name!r}, which holds the projected weight {site.name!r}, was "
                "replaced after grassfx.compile: grassfx would keep routing the old weight and the "
                "new module would not train as intended. Replace modules before grassfx.compile, "
                "or compile again: model = grassfx.compile(grassfx.unwrap(model), ...) with a new optimizer"
            )
        param = _compat.module_parameters(current).get(site.attr)
        if not site.sharded and param is not ref():
            raise ModelChangedError(
                f"the projected weight {site.name!r} was replaced on its module after grassfx.compile "
                "(a new Parameter assigned): grassfx routes the gradient of the weight it compiled. "
                "Copy new values in place instead (with torch.no_grad(): weight.copy_(new)), or "
                "compile again: model = grassfx.compile(grassfx.unwrap(model), ...) with a new optimizer"
            )
        wanted = trainable(param)
        if wanted != site.trainable:  # nn.Module.__setattr__ only on a change
            site.trainable = wanted


def bound_weights(model) -> list:
    """Per site, the weight it was compiled (or last loaded) with, or None if that is gone."""
    bound = model.__dict__.get("_bound_weights") or [None] * len(model.sites)
    return [None if entry is None else entry[0]() for entry in bound]


def routed(model) -> list:
    """The sites whose module still holds the weight they route (all of them, unless parts were replaced)."""
    sites = []
    for site, weight in zip(model.sites, bound_weights(model)):
        owner = site._owner() if site._owner is not None else None
        if owner is not None and (site.sharded or _compat.module_parameters(owner).get(site.attr) is weight):
            sites.append(site)
    return sites
