"""The optimizers of ``grassfx train``'s runs that need its command line (kept apart from
:mod:`.muon`, which :mod:`.options` checks settings with)."""

from __future__ import annotations

import torch

from .muon import MuonAdamW
from .options import setting

__all__ = ["make_muon"]


def make_muon(model: torch.nn.Module, matrices: list, args, fused: bool = False) -> MuonAdamW:
    """:class:`MuonAdamW` for ``grassfx train``'s muon run: Muon on ``matrices`` (the attention/MLP
    weights) at ``--lr`` x ``--scale``, AdamW on every other parameter of ``model`` at ``--lr``."""
    chosen = {id(p) for p in matrices}
    return MuonAdamW(matrices, [p for p in model.parameters() if id(p) not in chosen], lr=setting(args, "lr", "muon"),
                     scale=setting(args, "scale", "muon"), weight_decay=args.weight_decay, fused=fused or None)
