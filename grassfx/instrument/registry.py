"""What a grassfx model publishes about its tensors, for code that only sees parameters.

An optimizer built from ``model.parameters()`` holds tensors, not the model. The model
registers here, when it is made (and again after a deep copy), the site of every gradient
handle, the site of every frozen projected weight and the name of every parameter; the
optimizer looks them up. Entries are weak: they vanish with their tensors and sites.

Example:
    >>> import torch, grassfx
    >>> model = grassfx.compile(torch.nn.Linear(8, 8), rank=2, backend="eager")
    >>> site_of(model.sites[0].handle) is model.sites[0]
    True
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["register", "forget_weights", "site_of", "target_of", "name_of", "generation"]

_HANDLES = WeakIdKeyDictionary()  # handle -> weakref(Site)
_WEIGHTS = WeakIdKeyDictionary()  # frozen projected weight -> weakref(Site)
_NAMES = WeakIdKeyDictionary()  # parameter -> qualified name in its grassfx model
_GENERATION = [0]  # bumped by every change: checks cached against it stay valid until it moves


def generation() -> int:
    """A number that changes whenever a model publishes or forgets its tensors."""
    return _GENERATION[0]


def register(sites, named_parameters) -> None:
    """Publish ``sites`` (each linked to its weight) and the names of the model's parameters."""
    _GENERATION[0] += 1
    for name, p in named_parameters:
        _NAMES[p] = name
    for site in sites:
        _HANDLES[site.handle] = weakref.ref(site)
        _WEIGHTS[site.weight] = weakref.ref(site)
        _NAMES[site.handle] = f"{site.name} (compressed gradient)"


def forget_weights(sites) -> None:
    """The weights of ``sites`` are plain parameters again (after ``grassfx.unwrap``)."""
    _GENERATION[0] += 1
    for site in sites:
        _WEIGHTS.pop(site.weight, None)


def _lookup(table, tensor: torch.Tensor):
    ref = table.get(tensor)
    return ref() if ref is not None else None


def site_of(tensor: torch.Tensor):
    """The Site whose gradient handle ``tensor`` is, or None."""
    return _lookup(_HANDLES, tensor)


def target_of(tensor: torch.Tensor):
    """The Site of the frozen projected weight ``tensor``, or None."""
    return _lookup(_WEIGHTS, tensor)


def name_of(tensor: torch.Tensor):
    """The parameter's name in its grassfx model, or None."""
    return _NAMES.get(tensor)
