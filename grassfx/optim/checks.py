"""The checks every grassfx optimizer shares: settings, finite gradients, saved ranks.

Below :mod:`.base` (which re-exports them): nothing here knows an optimizer object.
"""

from __future__ import annotations

import itertools
import math

import torch

from grassfx.errors import ConfigError
from grassfx.instrument import registry

__all__ = ["check_number", "check_adam_settings", "check_rho_scaling", "check_nonfinite", "finite_flags",
           "check_saved_ranks", "RHO_SCALINGS", "NONFINITE"]

NONFINITE = ("raise", "skip")
RHO_SCALINGS = ("once", "twice")


def check_number(name, value, low=None, high=None, low_open=False):
    """Raise :class:`grassfx.ConfigError` unless ``value`` is a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}={value!r}: must be {'>' if low_open else '>='} {low}")
    if high is not None and value >= high:
        raise ConfigError(f"{name}={value!r}: must be < {high}")


def check_adam_settings(lr, betas, eps, weight_decay, rewarmup) -> int:
    """Check the settings AdamW-style optimizers share (ConfigError naming the bad one);
    returns ``rewarmup``."""
    check_number("lr", lr, low=0.0)
    if isinstance(rewarmup, bool) or not isinstance(rewarmup, int) or rewarmup < 0:
        raise ConfigError(f"rewarmup={rewarmup!r}: expected an int >= 0 (steps; 0 turns it off)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ConfigError(f"betas={betas!r}: expected a pair (beta1, beta2)")
    check_number("betas[0]", betas[0], low=0.0, high=1.0)
    check_number("betas[1]", betas[1], low=0.0, high=1.0)
    check_number("eps", eps, low=0.0)
    check_number("weight_decay", weight_decay, low=0.0)
    return rewarmup


def check_rho_scaling(rho_scaling) -> str:
    """Raise :class:`grassfx.ConfigError` unless ``rho_scaling`` is one of :data:`RHO_SCALINGS`."""
    if rho_scaling not in RHO_SCALINGS:
        raise ConfigError(f"rho_scaling={rho_scaling!r}: allowed values: {', '.join(RHO_SCALINGS)}")
    return rho_scaling


def check_nonfinite(nonfinite) -> str:
    """Raise :class:`grassfx.ConfigError` unless ``nonfinite`` is one of :data:`NONFINITE`."""
    if nonfinite not in NONFINITE:
        raise ConfigError(f"nonfinite={nonfinite!r}: allowed values: raise, skip")
    return nonfinite


def finite_flags(tensors: list) -> list[bool]:
    """Whether each tensor holds only finite numbers, with one reduction per tensor and one sync.

    ``isfinite().all()`` reads a tensor several times and allocates a bool copy of it; a
    float32 (float64) sum is finite when every entry is and NaN/Inf otherwise, unless finite
    entries overflow it, so a non-finite sum is confirmed entry by entry. bf16 and fp16
    tensors are checked by their smallest and largest entries (``aminmax``, in their own
    dtype: no overflow, no float32 copy, NaN propagates; ``vector_norm(t, inf)``, which also
    reads a tensor once, ran 11x slower on CPU: 24.6 vs 2.2 ms for a bf16 8192 x 2048
    gradient, ``benchmarks/finite_check.py``). Empty tensors are finite.
    """
    if not tensors:
        return []
    owners, by_dtype = [], {}  # per summary value: (dtype, place in its group, tensor); one stack per dtype
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        if t.dtype in (torch.bfloat16, torch.float16):
            # in their own dtype: sum(dtype=float32) would first copy the tensor to float32
            # (250 MiB for a 32000 x 2048 gradient)
            values = torch.aminmax(t)
        else:
            values = (t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32),)
        for v in values:
            group = by_dtype.setdefault(v.dtype, [])
            owners.append((v.dtype, len(group), i))
            group.append(v)
    ok = [True] * len(tensors)
    if by_dtype:
        device = next(iter(by_dtype.values()))[0].device
        finite = {dtype: torch.isfinite(torch.stack([v.to(device) for v in values]))
                  for dtype, values in by_dtype.items()}
        flags = torch.cat(list(finite.values())).tolist()  # the one sync
        offsets = dict(zip(finite, itertools.accumulate([0] + [len(v) for v in by_dtype.values()])))
        for dtype, position, i in owners:
            ok[i] = ok[i] and flags[offsets[dtype] + position]
        for i, t in enumerate(tensors):  # a non-finite float32/float64 sum may be an overflow
            if not ok[i] and t.dtype not in (torch.bfloat16, torch.float16):
                ok[i] = bool(torch.isfinite(t).all())
    return ok


def check_saved_ranks(state_dict, param_groups) -> None:
    """Refuse a checkpoint whose state of a projected weight was made at another rank (or
    another selected dim): it would load, and fail at the next step with a shape mismatch.

    Every state tensor of a handle with the handle's number of dims must match it along each
    dim (or be 1 there: Adafactor's factored variances); a 1-D one (``row_step``) has one
    entry per selected row.
    """
    saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    mine = itertools.chain.from_iterable(g["params"] for g in param_groups)
    for key, handle in zip(saved, mine):
        site = registry.site_of(handle)
        if site is None or site.sharded:
            continue
        rows = site.matrix().rank if not site.full else None
        axis = handle.dim() - 2 + site.dim  # the selected dim of the handle
        for name, value in state_dict["state"].get(key, {}).items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if value.dim() == handle.dim():
                ok = all(a in (b, 1) for a, b in zip(value.shape, handle.shape))
                saved_rank = value.shape[axis]
            else:
                ok = value.dim() == 1 and value.numel() == rows
                experts = handle.shape[0] if handle.dim() == 3 else 1  # an expert stack's (E, r, n)
                saved_rank = value.numel() // experts if value.dim() == 1 else "?"
            if not ok:
                raise ConfigError(
                    f"the optimizer state of {site.name!r} was saved at rank {saved_rank} (state {name!r} of shape "
                    f"{tuple(value.shape)}); this optimizer's model selects {site.rank} of {site.rows} "
                    f"{'rows' if site.dim == 0 else 'columns'} (gradient handle {tuple(handle.shape)}). Compile the "
                    f"model with the checkpoint's rank (and proj_dim) to resume, or start from a fresh optimizer"
                )
