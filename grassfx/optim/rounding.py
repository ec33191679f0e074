"""How a low-precision weight receives its update: pure bf16 training, no fp32 master copy.

A bf16 weight holds 8 significant bits: an update smaller than half the spacing of the
numbers around the weight (``|w| * 2^-9``) rounds back to the weight itself, so with
round-to-nearest a small learning rate stops training altogether. ``AdamW`` takes an
``update_rounding`` mode for bf16 and fp16 weights (float32 and float64 weights are
written exactly as before whatever the mode):

* ``"nearest"`` (default): ``w += u`` in the weight's dtype, rounded to nearest: what
  ``torch.optim.AdamW`` does, bit for bit with the same dtypes;
* ``"stochastic"``: the new value is computed in float32 and rounded up or down at random,
  with the probability of each neighbour proportional to its nearness, so the expected
  weight after any number of steps is the float32 sum (:func:`stochastic_round`);
* ``"kahan"``: compensated summation: what rounding dropped is kept in a buffer of the
  weight's dtype in the optimizer state (``state["kahan_comp"]``, the parameter's shape; the
  selected rows only for a projected weight) and added back at the next step
  (:func:`kahan_round`), which tracks the float32 sum to within the buffer's own rounding.

Random bits come from the global generator of the weight's device (``torch.randint``), so
``torch.manual_seed`` makes runs reproducible; they advance that generator, so code after
``step()`` that draws from it (dropout) draws other numbers than with ``"nearest"``.
Compiled (``AdamW(compiled=True)``) the bits come from Inductor's generator, itself seeded
from the global one: reproducible under ``torch.manual_seed``, but not the same bits as an
eager step.

Everything here traces and compiles: no data-dependent Python branching.
"""

from __future__ import annotations

import torch

from grassfx.core.decay import decay_rows
from grassfx.errors import ConfigError

__all__ = ["index_add_along", "UPDATE_ROUNDINGS", "STATE_DTYPES", "check_update_rounding", "check_state_dtype", "rounding_of",
           "stochastic_round", "nearest_value", "kahan_round", "round_update", "add_to_rows", "first_copies"]

UPDATE_ROUNDINGS = ("nearest", "stochastic", "kahan")
#: optimizer-state dtypes: None keeps each parameter's own dtype
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)

# float32 bits below each low-precision mantissa: truncating them leaves a value the dtype
# holds exactly (fp16: in its normal range, |x| >= 2^-14)
_DROPPED_BITS = {torch.bfloat16: 16, torch.float16: 13}


def check_update_rounding(value) -> str:
    """Raise :class:`grassfx.ConfigError` unless ``value`` is one of :data:`UPDATE_ROUNDINGS`."""
    if not isinstance(value, str) or value not in UPDATE_ROUNDINGS:
        raise ConfigError(f"update_rounding={value!r}: allowed values: {', '.join(UPDATE_ROUNDINGS)}")
    return value


def check_state_dtype(value):
    """Raise :class:`grassfx.ConfigError` unless ``value`` is one of :data:`STATE_DTYPES`."""
    if value is not None and not isinstance(value, torch.dtype):
        raise ConfigError(f"state_dtype={value!r}: expected None (each parameter's dtype) or a torch.dtype: "
                          "torch.float32, torch.bfloat16 or torch.float16")
    if value not in STATE_DTYPES:
        raise ConfigError(f"state_dtype={value}: allowed values: None (each parameter's dtype), "
                          "torch.float32, torch.bfloat16, torch.float16")
    return value


def rounding_of(param: torch.Tensor, mode: str) -> str:
    """The mode that applies to ``param``: ``mode`` for bf16/fp16 weights, else ``"nearest"``."""
    return mode if param.dtype in _DROPPED_BITS else "nearest"


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _value(bits: torch.Tensor, dropped: int) -> torch.Tensor:
    """The float32 whose bits are ``bits`` with the ``dropped`` lowest cleared: a value the
    low-precision dtype holds exactly."""
    return (bits & -(1 << dropped)).view(torch.float32)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) in ``dtype`` (bf16 or fp16), rounded up or down at random, unbiased.

    Adds uniform random bits to the float32 bits below ``dtype``'s mantissa and truncates
    them: ``x`` rounds away from zero with probability (distance to the lower neighbour) /
    (spacing), so ``E[result] = x``. Works on the bit pattern's magnitude, so both signs
    are handled alike; finite inputs only (the optimizer checks gradients first).
    """
    dropped = _DROPPED_BITS[dtype]
    noise = torch.randint(0, 1 << dropped, x.shape, dtype=torch.int32, device=x.device)
    return _value(_bits(x) + noise, dropped).to(dtype)


def nearest_value(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest ``dtype`` value (ties to even), kept in float32.

    Done on the bits, not as ``x.to(dtype).float()``: a compiler may drop that pair of
    casts as an identity, and Kahan's compensation would then always be zero.
    """
    dropped = _DROPPED_BITS[dtype]
    bits = _bits(x)
    odd = (bits >> dropped) & 1  # ties go to the even neighbour
    return _value(bits + ((1 << (dropped - 1)) - 1) + odd, dropped)


def kahan_round(x: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """``x + comp`` (float32 target plus what earlier roundings dropped) in ``comp``'s dtype,
    rounded to nearest; ``comp`` (in place) keeps what this rounding dropped."""
    target = x + comp.float()
    new = nearest_value(target, comp.dtype)
    comp.copy_(target - new)
    return new.to(comp.dtype)


def round_update(mode: str, x: torch.Tensor, dtype: torch.dtype, comp) -> torch.Tensor:
    """The float32 new value ``x`` of a weight of ``dtype``, rounded as ``mode`` says."""
    if mode == "kahan":
        return kahan_round(x, comp)
    if mode == "stochastic":
        return stochastic_round(x, dtype)
    return x.to(dtype)


def index_add_along(weight: torch.Tensor, dim: int, idx: torch.Tensor, update: torch.Tensor, alpha=1) -> None:
    """``weight.index_add_(dim, idx, update, alpha=alpha)``, without the CPU's float32 copy of ``weight``.

    On CPU, ``index_add_`` of a bf16/fp16 tensor along a dim other than 0 runs as a
    scatter-add into a float32 buffer of the whole of ``weight`` (45 MiB for a 5760 x 2048
    weight). There, while fewer than half of the rows along ``dim`` are selected, the
    selected rows alone are read into float32, ``alpha * update`` is added (every copy of a
    row listed twice in ``idx`` into its first copy) and the rows are written back rounded
    once: float32 temporaries of two selections' size, and for ``alpha`` 1 the scatter-add's
    result bit for bit. Everywhere else ``index_add_`` is used.
    """
    dim = dim % weight.dim()
    r = idx.numel()
    if dim != 0 and 2 * r < weight.shape[dim] and weight.device.type == "cpu" and \
            weight.dtype in (torch.bfloat16, torch.float16):
        idx = idx.long()
        update = update.float() if isinstance(alpha, (int, float)) and alpha == 1 else update.float() * alpha
        firsts = first_copies(idx, weight.shape[dim])  # each copy's first position in idx
        rows = weight.index_select(dim, idx).float()
        rows.index_add_(dim, firsts, update)  # a repeated row's copies summed into its first copy
        weight.index_copy_(dim, idx, rows.to(weight.dtype).index_select(dim, firsts))
    else:
        weight.index_add_(dim, idx, update, alpha=alpha)


def add_to_rows(weight, dim: int, idx, update, mode: str, comp, firsts, decay=None) -> None:
    """Decay the selected rows ``idx`` of ``weight`` once each (``decay``: a factor, or None)
    and add ``update`` (r, n) to them, rounded as ``mode`` says (``comp``: its Kahan buffer;
    ``firsts``: :func:`first_copies` where a row may be drawn twice, else None). Nearest
    rounding is ``index_add_`` in the weight's dtype (a row drawn twice gets each copy's share)."""
    if mode == "nearest":
        if decay is not None:
            decay_rows(weight, idx, dim, decay)
        index_add_along(weight, dim, idx, update.to(weight.dtype))  # (r, n) into (m, n)
        return
    update = update.float()
    if firsts is not None:  # a row drawn twice: every copy carries the row's whole update
        update = torch.zeros_like(update).index_add_(dim, firsts, update).index_select(dim, firsts)
    rows = weight.index_select(dim, idx).float()  # (r, n), decayed once each, then updated in float32
    if decay is not None:
        rows = rows * decay
    weight.index_copy_(dim, idx, round_update(mode, rows + update, weight.dtype, comp))


def first_copies(idx: torch.Tensor, rows: int) -> torch.Tensor:
    """For each entry of ``idx`` (r,), the position of the first entry naming the same row.

    A selector with replacement may draw a row twice; a rounded update is written by
    ``index_copy_``, so every copy must carry the row's whole update (the sum over copies).
    """
    r = idx.numel()
    first = torch.full((rows,), r, dtype=torch.long, device=idx.device)
    first.scatter_reduce_(0, idx, torch.arange(r, device=idx.device), reduce="amin")
    return first[idx]
