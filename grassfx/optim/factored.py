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

The update runs eagerly, a block of rows at a time (:data:`BLOCK_ELEMENTS` entries), in
two passes: the row and column sums of ``g**2``, then the update. No temporary of the
whole matrix is made, float32 copies of a bf16 gradient included.
"""

from __future__ import annotations

import torch

from grassfx.errors import ConfigError

from .rounding import round_update

__all__ = ["FULL_STATES", "BLOCK_ELEMENTS", "check_full_state", "embedding_groups", "state_mode", "factored_state",
           "factored_step"]

FULL_STATES = ("adam", "factored", "factored_nomomentum")
#: entries of the denominator alive at once (float32: 4 MiB)
BLOCK_ELEMENTS = 1 << 20


def check_full_state(value) -> str:
    """Raise :class:`grassfx.ConfigError` unless ``value`` is one of :data:`FULL_STATES`."""
    if not isinstance(value, str) or value not in FULL_STATES:
        raise ConfigError(f"full_state={value!r}: allowed values: {', '.join(FULL_STATES)}")
    return value


def embedding_groups(params, embedding, full_state: str) -> list[dict]:
    """Parameter groups with ``embedding`` alone under ``full_state`` and every other
    parameter in a second group (which takes the optimizer's ``full_state``): e.g. the input
    embedding without its first moment, an untied head with it.

    Example:
        >>> import torch, grassfx
        >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
        >>> groups = embedding_groups(net.parameters(), net[0].weight, "factored_nomomentum")
        >>> opt = grassfx.optim.AdamW(groups, full_state="factored")
        >>> [g["full_state"] for g in opt.param_groups]
        ['factored_nomomentum', 'factored']
    """
    return [{"params": [embedding], "full_state": check_full_state(full_state)},
            {"params": [p for p in params if p is not embedding]}]


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


def _block_rows(p: torch.Tensor) -> int:
    """Rows per block: :data:`BLOCK_ELEMENTS` entries at most (one row at least)."""
    return max(1, BLOCK_ELEMENTS // max(1, p.shape[1]))


@torch.no_grad()
def factored_step(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, mode: str = "nearest") -> None:
    """One step of AdamW with a factored second moment on the 2-D parameter ``p`` (in place).

    ``state`` from :func:`factored_state` (it holds ``exp_avg`` when the first moment is
    kept). ``mode``: how the new value is rounded into a bf16/fp16 ``p``
    (:func:`grassfx.optim.rounding.round_update`; ``"nearest"``: ``p``'s own arithmetic).
    Two passes over blocks of rows (the mean squares, then the update): whatever the
    dtypes, the temporaries are a block's (float32 copies of a bf16 gradient included).
    """
    state["step"] += 1
    t = state["step"]
    rows, cols = state["row_var"], state["col_var"]
    block = _block_rows(p)
    m, n = p.shape
    row_sq = torch.empty_like(rows)
    col_sq = torch.zeros_like(cols)
    for a in range(0, m, block):
        g = grad[a:a + block].float()
        row_sq[a:a + block] = torch.linalg.vector_norm(g, dim=1, keepdim=True).square_()
        col_sq.add_(g.square().sum(dim=0, keepdim=True))  # out of place: g may be the gradient itself
    rows.mul_(beta2).add_(row_sq.div_(n), alpha=1 - beta2)
    cols.mul_(beta2).add_(col_sq.div_(m), alpha=1 - beta2)
    bc2 = 1 - beta2**t
    # sqrt(v_ij / bc2) = row_scale_i * col_scale_j; an all-zero history gives 0 (the step is then 0 / eps)
    mean = rows.mean().clamp_min(torch.finfo(torch.float32).tiny)
    row_scale = (rows / (mean * bc2)).sqrt_()
    col_scale = cols.sqrt()
    exp_avg = state.get("exp_avg")
    step = lr / (1 - beta1**t) if exp_avg is not None else lr
    decay = 1 - lr * weight_decay
    comp = state.get("kahan_comp")
    for a in range(0, m, block):
        b = min(a + block, m)
        if exp_avg is not None:
            exp_avg[a:b].lerp_(grad[a:b].to(exp_avg.dtype), 1 - beta1)
            num = exp_avg[a:b]
        else:
            num = grad[a:b]
        update = num / (row_scale[a:b] * col_scale).add_(eps)  # float32 (k, n)
        rows_p = p[a:b]
        if mode == "nearest":
            if decay != 1.0:
                rows_p.mul_(decay)
            rows_p.add_(update.to(p.dtype), alpha=-step)
        else:
            new = rows_p.float().mul_(decay).add_(update, alpha=-step)
            rows_p.copy_(round_update(mode, new, p.dtype, None if comp is None else comp[a:b]))


def state_mode(state: dict) -> str:
    """The ``full_state`` a parameter's (non-empty) state was made for."""
    if "row_var" not in state:
        return "adam"
    return "factored" if "exp_avg" in state else "factored_nomomentum"
