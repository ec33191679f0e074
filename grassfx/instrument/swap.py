"""Anchors installed by class swap: ``module.weight`` reads this forward's anchored view.

Each module that owns a target weight gets a generated subclass (its class is swapped per
instance, as ``torch.nn.utils.parametrize`` does) whose ``weight`` property returns the
anchored view for the current forward; the parameter itself stays registered, so the
module's code and ``state_dict`` keys are untouched. One anchor per weight per forward:
a weight read twice (shared layers, tied modules) is one node.

Compiled normal steps make anchors *lazily*, one per read of the weight: under
``torch.compile`` each anchor is then traced into the same frame as the matmul that
reads the weight, so a graph break anywhere in the model (a logging call, data-dependent
control flow) leaves every rewrite in place, and no anchor escapes its frame (the
compressed gradients of two reads add up to the compressed gradient of their sum).
Eager forwards and refresh forwards make one anchor per weight (a refresh selects from
the weight's whole gradient; activation checkpointing recomputes with the same anchors):
eagerly at the weight's first read, so autograd, which runs the most recently made node
first, reduces each dense gradient as soon as it exists and frees it before the next is
formed; compiled refresh graphs make them before the module runs. A refresh step forms
dense gradients anyway, so a graph break there costs nothing.

In eager mode the anchors stay readable after the forward, so activation checkpointing
recomputes with them; an anchor is served only while the weight is unmodified since that
forward (version counter), otherwise the Parameter itself.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from grassfx import _compat
from grassfx.fsdp import is_dtensor

__all__ = ["AnchorSlot", "install", "uninstall", "original_class"]


class AnchorSlot:
    """Shared between a GrassModel and its swapped modules: this forward's anchors."""

    def __init__(self):
        self.make = None  # make(entry) -> anchored tensor, while a forward is live
        self.entries = None  # {weight name: what ``make`` needs for that weight}
        self.anchors = None  # {weight name: anchored tensor} made so far (None: not cached)
        self.versions = None  # eager only: {weight name: weight version when its anchor was made}
        self.changed = None  # changed(entry) -> tensor: a read with gradients of a weight changed in place
        self.recomputed = None  # eager only: {id(node): (node, {weight name: anchor})} made while
        # the backward of that autograd node (a reentrant checkpoint) recomputes its region

    def begin(self, make, entries: dict, upfront: bool, eager: bool, changed=None) -> None:
        """A forward starts: a weight's anchor is ``make(entries[name])``.

        ``upfront``: one anchor per weight for the whole forward (eager, and refresh
        forwards: a refresh must see the weight's whole gradient; activation checkpointing
        recomputes with the same anchors), made at the weight's first read when ``eager``
        (so its backward runs as soon as the weight's gradient exists), else now.
        Otherwise every read makes its own anchor where it happens, so no anchor outlives
        the compiled frame that made it.
        """
        self.make, self.entries, self.changed = make, entries, changed
        self.anchors = self.recomputed = None
        if upfront:
            self.anchors = {} if eager else {name: make(entry) for name, entry in entries.items()}
        # the weight each anchor is made from, and its version: FSDP2 registers the gathered
        # weight only while its module runs, so an eager anchor notes the one it was made from
        self.versions = {name: (id(entry[0].weight), _compat.version(entry[0].weight))
                         for name, entry in entries.items()} if eager else None
        self.recomputed = {} if eager else None

    def _changed(self, name: str, param):
        """A read of a weight changed in place since this forward began (the optimizer stepped
        it): its gradient cannot go to this forward's rows. Read without gradients, the
        Parameter; with gradients, ``changed(entry)`` (an anchor whose backward refuses a
        gradient: a penalty computed before the next forward would otherwise be lost)."""
        if self.changed is None or not torch.is_grad_enabled():
            return param
        return self.changed(self.entries[name])

    def clear(self) -> None:
        self.make = self.entries = self.anchors = self.versions = self.recomputed = self.changed = None

    @contextlib.contextmanager
    def kept(self):
        """Restore this forward's state after a forward nested between it and its backward
        (an evaluation forward without gradients), for the backward's recomputation."""
        state = dict(vars(self))
        try:
            yield
        finally:
            vars(self).update(state)

    def read(self, name: str, param):
        """The anchored view of ``param`` (named ``name``) for this forward."""
        if is_dtensor(param):
            return param  # FSDP2's sharded weight, read by FSDP2 itself between unshards
        if self.anchors is None:
            if self.versions is not None and self.versions[name] != (id(param), _compat.version(param)):
                return self._changed(name, param)
            return self.make(self.entries[name])
        anchor = self.anchors.get(name)
        if self.versions is not None:
            made_from, version = self.versions[name]
            if anchor is None and made_from != id(param):  # FSDP2's gathered weight, first read
                self.versions[name] = made_from, version = id(param), _compat.version(param)
            if made_from != id(param):
                return param
            if version != _compat.version(param):
                return self._changed(name, param)
        if anchor is None:
            if not torch.is_grad_enabled():
                return param  # nothing to route: a later read with gradients makes the anchor
            node = _compat.backward_node()
            if node is not None:
                # a reentrant checkpoint recomputes its region (whose forward read the weight
                # without gradients) and runs a backward of its own through the anchor: one
                # anchor per checkpoint call (two forwards before one backward recompute twice)
                anchors = self.recomputed.setdefault(id(node), (node, {}))[1]
                if name not in anchors:
                    with _plain_saves():
                        anchors[name] = self.make(self.entries[name])
                return anchors[name]
            # made at the first read, not before the module runs: autograd runs the node
            # that was made last first, so the anchor's backward (the refresh's row norms,
            # the eager rowsel) runs right after the backward of the op that read the
            # weight, and each dense gradient is freed before the next one is formed
            with _plain_saves():
                anchor = self.anchors[name] = self.make(self.entries[name])
        return anchor

    def __deepcopy__(self, memo):
        return AnchorSlot()  # a copy starts between forwards

    def __reduce__(self):
        return AnchorSlot, ()  # pickled: starts between forwards too


def _kept(tensor):
    return tensor


def _plain_saves():
    """Save the anchor's own tensors as if it were made before the module ran.

    A first read inside an activation-checkpointed region would otherwise count the
    anchor's saved tensors (idx, rho) into the region's, and the recomputation, which
    reuses the anchor, would save fewer (``CheckpointError``). Compiled frames handle
    checkpointing in the graph; this applies to eager forwards.
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_kept, _kept)


_SUBCLASSES: dict = {}


def _anchored_read(attr: str):
    def read(module):
        param = _compat.raw_parameter(module, attr)
        slot = module.__dict__["_grassfx_slot"]
        if slot.make is None:
            return param
        return slot.read(module.__dict__["_grassfx_names"][attr], param)

    return read


def _swapped_class(cls: type, attrs: tuple) -> type:
    """A subclass of ``cls`` whose ``attrs`` read the current anchors (cached per class)."""
    key = (cls, attrs)
    if key not in _SUBCLASSES:
        props = {a: property(_anchored_read(a)) for a in attrs}
        props["_grassfx_original_class"] = cls
        props["__reduce_ex__"] = _reduce_swapped
        _SUBCLASSES[key] = type(f"Grass{cls.__name__}", (cls,), props)
    return _SUBCLASSES[key]


def _reduce_swapped(module, protocol):
    """Pickle a swapped module by its original class: the generated one has no importable name."""
    attrs = tuple(sorted(module.__dict__["_grassfx_names"]))
    return _rebuild_swapped, (original_class(module), attrs), module.__getstate__()


def _rebuild_swapped(cls: type, attrs: tuple):
    """An empty instance of ``cls``'s swapped class (unpickling fills in its state)."""
    swapped = _swapped_class(cls, attrs)
    return cls.__new__(swapped)


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before grassfx swapped it."""
    return getattr(type(module), "_grassfx_original_class", type(module))


def install(root: nn.Module, names: dict, slot: AnchorSlot) -> None:
    """Swap every module of ``root`` owning a weight in ``names`` (``{id(weight): name}``)."""
    for module in root.modules():
        for attr, p in list(_compat.module_parameters(module).items()):
            if p is not None and id(p) in names:
                _install_one(module, attr, names[id(p)], slot)


def _install_one(module: nn.Module, attr: str, name: str, slot: AnchorSlot) -> None:
    owned = dict(module.__dict__.get("_grassfx_names", {}))
    owned[attr] = name
    module.__dict__["_grassfx_names"] = owned
    module.__dict__["_grassfx_slot"] = slot
    _compat.set_class(module, _swapped_class(original_class(module), tuple(sorted(owned))))


def uninstall(root: nn.Module) -> None:
    """Give every module of ``root`` its original class back."""
    for module in root.modules():
        base = getattr(type(module), "_grassfx_original_class", None)
        if base is not None:
            _compat.set_class(module, base)
        module.__dict__.pop("_grassfx_names", None)
        module.__dict__.pop("_grassfx_slot", None)
