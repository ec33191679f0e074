"""Subspace-aware optimizers: one object trains projected and ordinary parameters.

* :mod:`.base`: ``GrassOptimizer`` (classification, finite checks, refresh handling, stepping);
  below it, and knowing no optimizer: :mod:`.checks` (settings, finite flags, saved ranks),
  :mod:`.rows` (per-row factors), :mod:`.kernel` (``adamw_step``, the one AdamW kernel, eager
  or compiled), :mod:`.sharded` (``ShardedRows``: FSDP2-sharded weights behind one object);
* :mod:`.adamw`: ``AdamW``, its step strategies chosen once;
* :mod:`.muon`: ``Muon``, orthogonalized momentum of the selected rows (AdamW for the rest);
* :mod:`.sgd`: ``SGD`` (momentum, Nesterov); :mod:`.adafactor`: ``Adafactor``;
* decoupled weight decay of projected weights and its debt: :mod:`grassfx.core.decay`;
* :mod:`.rounding`: how bf16/fp16 weights receive updates (``AdamW(update_rounding=...)``):
  pure bf16 training without a float32 master copy (``docs/precision.md``);
* :mod:`.inbackward`: updates inside backward (``update_in_backward=True``).

With every row selected, ``AdamW`` / ``SGD`` / ``Adafactor`` here equal ``torch.optim``'s.

**Refresh.** When the model picked new rows, the optimizer resets the moments (or, with
``compile(..., moments="keep_overlap")``, keeps the moments of rows selected both before
and after) before the step, and settles the weight decay the other rows owe. ``AdamW``
counts steps per selected row, so each row is bias-corrected by its own age
(``rewarmup=K`` also ramps a new row's step up over K steps).

**rho.** Adaptive optimizers (``AdamW``, ``Adafactor``) apply a selector's scale ``rho``
once (``rho_scaling="once"``: it scales the compressed gradient, and each selected row
gets one step), so every selector runs at the same learning rate; ``"twice"`` is the
paper's ``P step(Pᵀ G)``. ``SGD`` always uses the paper's form (unbiased ``P Pᵀ G``).

**Clipping.** ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` clips the
gradients that exist: ``C`` for projected weights. With ``rho = 1`` (``top_r``,
``multinorm_nr``) ‖C‖ is the norm of the selected rows (<= the dense norm); with
``multinorm`` and ``uniform`` E‖C‖² equals the dense ‖G‖² (an unbiased estimate).

**Updates inside backward.** ``update_in_backward=True`` (every optimizer here) updates
each parameter as soon as its gradient exists and frees the gradient
(:mod:`.inbackward`); gradient accumulation, data parallelism and clipping cannot work
that way (the first two are refused).

**State** holds tensors and numbers only (``torch.load(weights_only=True)`` works), and a
run saved after step N resumes bit-exactly with the model's own ``state_dict``.
"""

from __future__ import annotations

from .adafactor import Adafactor
from .adamw import AdamW, row_factors
from .base import GrassOptimizer
from .factored import embedding_groups
from .muon import Muon
from .sgd import SGD

__all__ = ["AdamW", "Muon", "SGD", "Adafactor", "GrassOptimizer", "embedding_groups", "row_factors"]
