"""The dense Muon baseline of ``grassfx train --optimizer muon``: ``torch.optim.Muon`` (its
iteration in float32) on the attention/MLP matrices, ``torch.optim.AdamW`` on everything
else, stepped as one optimizer.

This is the standard split of Muon (Jordan et al., 2024; the ``torch.optim.Muon``
docstring: "an optimizer for 2D parameters of neural network hidden layers. Other
parameters, such as bias, and embedding, should be optimized by a standard method such as
AdamW"): the hidden matrices are the weights GaLore and grassfx project
(:func:`grassfx.recipes.train.lowrank_weights`); embeddings, norms and the LM head train
with AdamW. Each hidden matrix keeps one (m x n) momentum buffer, against grassfx's
(r x n) one for the rows it selects, so the comparison with ``grass`` is what row
selection costs.

Settings, with the meaning grassfx's own Muon gives them, so that the two arms share a grid:

* ``lr`` is AdamW's rate (embeddings, norms, head); the matrices step at ``lr * scale``.
* ``adjust_lr_fn="match_rms_adamw"``: torch scales each matrix's step by
  ``0.2 sqrt(max(m, n))``, which gives the orthogonalized update an entry RMS of about
  ``0.2 * lr * scale`` (Liu et al., 2025, "Muon is scalable for LLM training"). It is the
  factor ``grassfx.optim.Muon`` applies to its (r x n) update, so one ``lr``/``scale``
  point means the same step size in both. torch's default ("original",
  ``sqrt(max(1, m / n))``) would leave square matrices at the bare ``lr * scale`` and put
  the two arms' grids 3-5x apart.
* ``weight_decay`` is ``--weight-decay`` (0 by default, as every other run), not
  ``torch.optim.Muon``'s default of 0.1.
* momentum 0.95 with Nesterov, 5 Newton-Schulz steps: torch's defaults, the same as
  ``grassfx.optim.Muon``'s.
* The Newton-Schulz iteration runs in float32 (:class:`Float32Muon`): torch's step casts
  the momentum to bfloat16 and iterates there, and on CPUs without bfloat16 matrix
  instructions (this project's reference machine) a bfloat16 matmul is about 60x slower
  than a float32 one (256 x 256: 79 ms against 1.3 ms, one thread, other jobs running), which put one step of
  the tiny preset at about 25 s. In float32 it is the iteration ``grassfx.optim.Muon`` runs
  on its (r x n) momentum (:func:`grassfx.optim.muon.orthogonalize`: the same quintic
  coefficients, Frobenius normalization and orientation), so row selection is the only
  difference left between the two arms.
"""

from __future__ import annotations

import math

import torch

from grassfx.optim.muon import NS_COEFFICIENTS, orthogonalize

__all__ = ["Float32Muon", "MuonAdamW", "ADJUST_LR_FN"]

ADJUST_LR_FN = "match_rms_adamw"


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """The step size ``torch.optim.Muon`` gives a matrix of ``shape`` (its docstring): "original"
    (or None) ``lr sqrt(max(1, m / n))``, "match_rms_adamw" ``0.2 lr sqrt(max(m, n))``."""
    m, n = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(m, n))
    return lr * math.sqrt(max(1.0, m / n))


class Float32Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (its groups, checks, state and update rule) with the Newton-Schulz
    iteration in float32 (:func:`grassfx.optim.muon.orthogonalize`) instead of bfloat16.

    Per matrix ``W`` with gradient ``G`` and momentum buffer ``B`` (torch's docstring)::

        B = momentum B + (1 - momentum) G          (B.lerp_(G, 1 - momentum))
        U = (1 - momentum) G + momentum B          (nesterov; else U = B)
        W = (1 - lr wd) W - adjusted_lr(lr, adjust_lr_fn, W.shape) NS5(U)

    Example:
        >>> w = torch.nn.Parameter(torch.randn(8, 4))
        >>> opt = Float32Muon([w], lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        >>> w.grad = torch.randn(8, 4); opt.step()
        >>> list(opt.state[w])
        ['momentum_buffer']
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        if any(tuple(g["ns_coefficients"]) != NS_COEFFICIENTS for g in self.param_groups):
            raise ValueError(f"Float32Muon iterates with torch's default ns_coefficients {NS_COEFFICIENTS} only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            momentum, lr = group["momentum"], float(group["lr"])
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = orthogonalize(update, steps=group["ns_steps"], eps=group["eps"])  # (m, n), float32
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(ortho.to(p.dtype), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """:class:`Float32Muon` on ``matrices`` and ``torch.optim.AdamW`` on ``rest``, as one optimizer.

    Its ``param_groups`` are the two optimizers' own group dicts (the Muon group first), so
    an lr scheduler sets both; its ``state`` is one dict both share (the parameters are
    disjoint), so ``state_dict()``/``load_state_dict()`` and the state-bytes count cover both.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> opt = MuonAdamW([m[1].weight], [m[0].weight, m[1].bias], lr=1e-2, scale=0.5)
        >>> m(torch.tensor([1, 2])).sum().backward(); opt.step()
        >>> [g["lr"] for g in opt.param_groups]
        [0.005, 0.01]
    """

    def __init__(self, matrices, rest, lr: float, scale: float, weight_decay: float = 0.0,
                 adjust_lr_fn: str = ADJUST_LR_FN, fused: bool | None = None):
        matrices, rest = list(matrices), list(rest)
        self.muon = Float32Muon(matrices, lr=lr * scale, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                       fused=fused) if rest else None
        super().__init__(matrices + rest, {})
        self._link()

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [self.muon] + ([self.adamw] if self.adamw is not None else [])

    def _link(self) -> None:
        """Make this optimizer's groups the inner optimizers' and its state theirs (one dict)."""
        self.param_groups = [g for opt in self._inner() for g in opt.param_groups]
        for opt in self._inner():
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner():
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        groups = self.param_groups
        super().load_state_dict(state_dict)  # builds new group dicts: copy them into the linked ones
        for linked, loaded in zip(groups, self.param_groups):
            linked.update(loaded)
        self._link()
