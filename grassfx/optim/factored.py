"""Factored second moments for the matrices trained in full (embeddings, an untied LM head).

grassfx projects the attention and MLP weights, so what is left of AdamW's memory is the
state of the parameters it trains in full. In a LLaMA with an untied head that is the
embedding and the head: two (vocab x hidden) matrices, each with two moments of its size.
At 444M parameters (vocabulary 32000, hidden 2048) they hold 1.0 of grassfx's 1.2 GiB of
fp32 optimizer state (``benchmarks/RESULTS.md``, section 4).

``AdamW(full_state=...)`` (and ``Muon``, which trains these parameters with AdamW) chooses
what such a matrix keeps:

* ``"adam"`` (default): both moments in full, torch's fused AdamW kernel;
* ``"factored"``: the first moment in full, the second factored as in Adafactor (Shazeer &
  Stern, 2018, section 3): per-row and per-column means of ``g**2`` (float32 vectors of m
  and n entries), with ``v_ij ~ R_i C_j / mean(R)``; half of AdamW's state;
* ``"factored_nomomentum"``: the factored second moment only (no first moment: the step
  is ``g / sqrt(v)``): about no state at all.

Everything else is AdamW's: the same ``lr``, ``betas`` (``beta2`` for both factors), ``eps``
added to ``sqrt(v / bc2)``, bias correction by the shared step count and decoupled weight
decay. When every ``g_ij**2`` is a product ``a_i b_j`` (a rank-one matrix of squares),
the factored moment is AdamW's exactly. Only 2-D parameters that grassfx does not project
are factored; vectors (norms, biases) and tensors of other ranks keep both moments.

The update runs eagerly, a block of rows at a time, so no temporary of the whole matrix
is made: the row and column sums of ``g**2`` come from ``vector_norm`` along one dim, and
the denominator exists for one block of rows at once (:data:`BLOCK_ELEMENTS` entries).
"""

from __future__ import annotations

import torch

from grassfx.errors import ConfigError

from .rounding import round_update

__all__ = ["FULL_STATES", "BLOCK_ELEMENTS", "check_full_state", "factored_state", "factored_step"]

FULL_STATES = ("adam", "factored", "factored_nomomentum")
#: entries of the denominator alive at once (float32: 4 MiB)
BLOCK_ELEMENTS = 1 << 20


def check_full_state(value) -> str:
    """Raise :class:`grassfx.ConfigError` unless ``value`` is one of :data:`FULL_STATES`."""
    if not isinstance(value, str) or value not in FULL_STATES:
        raise ConfigError(f"full_state={value!r}: allowed values: {', '.join(FULL_STATES)}")
    return value


def factored_state(p: torch.Tensor, full_state: str, state_dtype, kahan: bool) -> dict:
    """Fresh state of a factored 2-D parameter ``p`` (m x n): ``step``, ``row_var`` (m, 1) and
    ``col_var`` (1, n) in float32, ``exp_avg`` (``"factored"``, in ``state_dtype`` or ``p``'s
    dtype) and ``kahan_comp`` (``kahan``)."""
    state = {"step": 0,
             "row_var": torch.zeros(p.shape[0], 1, dtype=torch.float32, device=p.device),
             "col_var": torch.zeros(1, p.shape[1], dtype=torch.float32, device=p.device)}
    if full_state == "factored":
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype or p.dtype, memory_format=torch.preserve_format)
    if kahan:
        state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _mean_squares(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """``mean(grad**2, dim, keepdim=True)`` in float32 without a copy of ``grad``."""
    out = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=torch.float32)
    return out.square_().div_(grad.shape[dim])


@torch.no_grad()
def factored_step(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, mode: str = "nearest") -> None:
    """One step of AdamW with a factored second moment on the 2-D parameter ``p`` (in place).

    ``state`` from :func:`factored_state` (it holds ``exp_avg`` when the first moment is
    kept). ``mode``: how the new value is rounded into a bf16/fp16 ``p``
    (:func:`grassfx.optim.rounding.round_update`; ``"nearest"``: ``p``'s own arithmetic).
    """
    state["step"] += 1
    t = state["step"]
    rows, cols = state["row_var"], state["col_var"]
    rows.mul_(beta2).add_(_mean_squares(grad, 1), alpha=1 - beta2)
    cols.mul_(beta2).add_(_mean_squares(grad, 0), alpha=1 - beta2)
    bc2 = 1 - beta2**t
    # sqrt(v_ij / bc2) = row_scale_i * col_scale_j; an all-zero history gives 0 (the step is then 0 / eps)
    mean = rows.mean().clamp_min(torch.finfo(torch.float32).tiny)
    row_scale = (rows / (mean * bc2)).sqrt_()
    col_scale = cols.sqrt()
    exp_avg = state.get("exp_avg")
    if exp_avg is not None:
        exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)
        num, step = exp_avg, lr / (1 - beta1**t)
    else:
        num, step = grad, lr
    decay = 1 - lr * weight_decay
    comp = state.get("kahan_comp")
    block = max(1, BLOCK_ELEMENTS // max(1, p.shape[1]))
    for a in range(0, p.shape[0], block):
        b = min(a + block, p.shape[0])
        update = num[a:b] / (row_scale[a:b] * col_scale).add_(eps)  # float32 (k, n)
        rows_p = p[a:b]
        if mode == "nearest":
            if decay != 1.0:
                rows_p.mul_(decay)
            rows_p.add_(update.to(p.dtype), alpha=-step)
        else:
            new = rows_p.float().mul_(decay).add_(update, alpha=-step)
            rows_p.copy_(round_update(mode, new, p.dtype, None if comp is None else comp[a:b]))
