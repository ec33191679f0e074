"""Misuse detection: one invariant, checked at every optimizer step with flags, not scans.

*Every projected weight that takes part in a forward delivers its gradient to its handle,
and the handle is stepped by a grassfx optimizer that also holds the weight.* Gradient
handles are zero parameters that only carry ``.grad``; the projected weights are frozen.
Whatever breaks that chain trains the wrong weights with no error of its own, so each link
is checked where it is cheap:

* **who steps** -- a process-wide optimizer step pre-hook (``torch.optim``'s global hook,
  installed with the first grassfx model) looks at the parameters of *every* optimizer
  about to step, once per optimizer and change of its parameter list or of the registry:
  an optimizer that is not grassfx-aware (``torch.optim.AdamW`` in any implementation --
  for-loop, foreach, fused -- the Hugging Face Trainer's default, a third-party one)
  holding a handle or a projected weight, or a grassfx optimizer holding a projected
  weight without its handle (built before ``grassfx.compile``), raises
  :class:`grassfx.OptimizerMisuseError` before anything is written;
* **what arrives** -- a grassfx optimizer's ``step()`` checks, per model that ran a
  forward with gradients on since the last step, that some handle received a gradient
  whenever the model's other parameters did (:func:`check_gradients_delivered`):
  otherwise the anchors were bypassed (an outer transform tracing grassfx's Python, a
  recomputation that lost them) and :class:`grassfx.LostGradientError` is raised before
  anything is written;
* **what was written** -- the next forward checks that no handle was written in place
  with nonzeros (:func:`check_handles_untouched`): an optimizer that bypasses
  ``Optimizer.step`` (so no hook saw it) stepped the handles.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from grassfx import _compat
from grassfx.errors import LostGradientError, OptimizerMisuseError

from . import registry

__all__ = [
    "check_handles_untouched",
    "snapshot_handle_versions",
    "install_optimizer_check",
    "check_optimizer",
    "check_gradients_delivered",
]

_USE = ("Use grassfx.optim.AdamW / SGD / Adafactor / Muon over model.parameters() of the model "
        "grassfx.compile returned (Hugging Face Trainer: optimizers=(grassfx.optim.AdamW("
        "model.parameters(), lr=...), None))")


def check_handles_untouched(sites) -> None:
    """Raise :class:`grassfx.OptimizerMisuseError` if a handle was stepped by a foreign optimizer."""
    for site in sites:
        version = _compat.version(site.handle)
        if version == site.handle_version:
            continue
        # written in place since the last check: harmless if it still holds zeros
        # (e.g. DDP's initial broadcast, a device move); a foreign optimizer step leaves nonzeros
        if not bool(site.handle.detach().any()):
            site.handle_version = version
            continue
        raise OptimizerMisuseError(
            f"the gradient handle of {site.name!r} was modified in place: an optimizer that "
            "is not grassfx-aware (e.g. torch.optim.AdamW) is stepping this model's "
            f"parameters, which would train none of the projected weights. {_USE}"
        )


def snapshot_handle_versions(sites) -> None:
    """Accept the handles as they are now (after loading a state dict)."""
    for site in sites:
        site.handle_version = _compat.version(site.handle)


# -- who steps -------------------------------------------------------------------------------
_HOOK = []  # the global step pre-hook's handle, once installed
_CHECKED = weakref.WeakKeyDictionary()  # optimizer -> (registry generation, parameter count) last checked


def install_optimizer_check() -> None:
    """Check every optimizer's parameters before its step (once per process; idempotent)."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_before_step))


def _before_step(optimizer, args, kwargs):
    if torch.compiler.is_compiling():
        return None  # a traced step: the eager steps around it are checked
    key = (registry.generation(), sum(len(g["params"]) for g in optimizer.param_groups))
    if _CHECKED.get(optimizer) != key:
        check_optimizer(optimizer)
        _CHECKED[optimizer] = key
    return None


def _describe(optimizer) -> str:
    cls = type(optimizer)
    flags = [f"{k}=True" for k in ("fused", "foreach") if optimizer.defaults.get(k)]
    return f"{cls.__module__}.{cls.__qualname__}({', '.join(flags)})"


def check_optimizer(optimizer, error: type = OptimizerMisuseError) -> None:
    """Raise :class:`grassfx.OptimizerMisuseError` if ``optimizer`` would step a grassfx model wrongly
    (``error`` instead for a projected weight given without its handle: a grassfx optimizer's
    constructor raises :class:`grassfx.ConfigError`, a bad argument)."""
    aware = getattr(optimizer, "grassfx_aware", False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    given = {id(p) for p in params}
    for p in params:
        site = registry.target_of(p)
        if site is not None and id(site.handle) not in given:
            raise error(
                f"{_describe(optimizer)} holds {site.name!r}, a weight grassfx.compile has frozen "
                "(its gradient goes to a small handle), but not its handle, so it would never "
                "train it: it was built before grassfx.compile (or from the inner module's "
                "parameters). Build the optimizer after grassfx.compile, from model.parameters() "
                "of the model it returned" + ("" if aware else f". {_USE}")
            )
        site = site or registry.site_of(p)
        if site is not None and not aware:
            raise OptimizerMisuseError(
                f"{_describe(optimizer)} is stepping the gradient handle of {site.name!r}: an "
                "optimizer that is not grassfx-aware steps the (r x n) handle, not the weight, "
                f"and would train none of the projected weights. {_USE}"
            )


# -- what arrives ----------------------------------------------------------------------------
def check_gradients_delivered(schedule) -> None:
    """Raise :class:`grassfx.LostGradientError` if ``schedule``'s model's other parameters received
    gradients and none of its handles did (flags only: one ``grad is None`` in the common case)."""
    for site in schedule.sites:  # the common case ends at the first trainable site
        if site.trainable and site.handle.grad is not None:
            return
    sites = [s for s in schedule.sites if s.trainable]  # a weight the user froze gets no gradient
    if not sites:
        return
    model = schedule.model
    if not any(p.grad is not None for p in model.module.parameters()):
        return  # no backward ran: a step without gradients changes nothing, as in torch.optim
    ran = (f"ran {schedule.forwards} forward(s) with gradients on since the last step"
           if schedule.forwards else "ran no forward since the last step (was its inner module called directly?)")
    raise LostGradientError(
        f"the model {ran}; its other parameters received gradients, but none of its {len(sites)} "
        f"projected weights did (e.g. {sites[0].name!r}), so no weight was changed. Something "
        "bypassed grassfx's anchors: calling model.module(...) instead of the grassfx model, an "
        "outer transform tracing grassfx's forward, or a recomputation that ran without them. "
        "Call the model grassfx.compile returned; compare with grassfx.compile(..., backend='eager')"
    )
