"""The baseline optimizers of ``grassfx train``'s runs, built from its command line (kept apart
from :mod:`.muon`, which :mod:`.options` checks settings with).

* ``galore``: ``GaLoreAdamW`` (package ``galore-torch``), SVD projection of the hidden matrices' gradients.
* ``apollo`` / ``apollo-mini``: ``APOLLOAdamW`` (package ``apollo-torch``; Zhu et al., 2024,
  "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270). Adam moments of a
  *random* projection of each hidden matrix's gradient set one scaling factor per channel
  (APOLLO, rank ``--rank``) or per tensor (APOLLO-Mini, rank 1); the full gradient, scaled,
  is the update. The package's README settings: ``proj="random"``, ``proj_type="std"``,
  ``scale_type="channel"`` / ``"tensor"``, the Norm-Growth Limiter on, and for APOLLO-Mini on
  small models ``scale_front=True``. ``--scale`` keeps its meaning in every run here (a
  multiplier of the matrices' step): the package multiplies the update by the square root of
  its own ``scale``, so that is ``--scale`` squared (its README's APOLLO-Mini default, 128, is
  ``--scale`` 11.3).
* ``muon``: :class:`.muon.MuonAdamW`.

Every one trains the hidden matrices (:func:`lowrank_weights`) its own way and everything else
(embeddings, norms, head) with AdamW at ``--lr``.
"""

from __future__ import annotations

import argparse

import torch

from .baselines import apollo_param_groups, import_apollo, import_galore
from .muon import MuonAdamW
from .options import apollo_settings, projection_rank, setting

__all__ = ["lowrank_weights", "import_galore", "import_apollo", "make_galore", "make_apollo", "make_muon",
           "check_imports"]

EPS = 1e-8  # every run's Adam epsilon (APOLLO's own default is 1e-6)


def lowrank_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The 2-D weights of the attention and MLP linear layers (what GaLore and Grass project)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.ndim == 2 and (".self_attn." in n or ".mlp." in n)]


def _split(model: torch.nn.Module) -> tuple[list, list]:
    """(hidden matrices, every other parameter) of ``model``."""
    lowrank = {id(p) for _, p in lowrank_weights(model)}
    return ([p for p in model.parameters() if id(p) in lowrank],
            [p for p in model.parameters() if id(p) not in lowrank])


def make_galore(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """GaLoreAdamW with the attention/MLP weights in a projected group, the rest in a plain one."""
    galore_adamw = import_galore()
    matrices, rest = _split(model)
    groups = [
        {"params": rest},
        {"params": matrices, "rank": projection_rank("galore", args), "update_proj_gap": setting(args, "update_freq", "galore"),
         "scale": setting(args, "scale", "galore"), "proj_type": "std"},
    ]
    return galore_adamw(groups, lr=setting(args, "lr", "galore"), betas=(0.9, 0.999), eps=EPS,
                        weight_decay=args.weight_decay, no_deprecation_warning=True)


def make_apollo(model: torch.nn.Module, args: argparse.Namespace, mini: bool = False) -> torch.optim.Optimizer:
    """APOLLOAdamW on the attention/MLP weights (channel-wise scaling, or tensor-wise at rank 1 for
    ``mini``), plain AdamW inside the same optimizer for everything else."""
    name = "apollo-mini" if mini else "apollo"
    groups = apollo_param_groups(*_split(model), **apollo_settings(args, name))
    return import_apollo()(groups, lr=setting(args, "lr", name), betas=(0.9, 0.999), eps=EPS,
                           weight_decay=args.weight_decay, scale_front=mini)


def make_muon(model: torch.nn.Module, matrices: list, args, fused: bool = False) -> MuonAdamW:
    """:class:`MuonAdamW` for ``grassfx train``'s muon run: Muon on ``matrices`` (the attention/MLP
    weights) at ``--lr`` x ``--scale``, AdamW on every other parameter of ``model`` at ``--lr``."""
    chosen = {id(p) for p in matrices}
    return MuonAdamW(matrices, [p for p in model.parameters() if id(p) not in chosen], lr=setting(args, "lr", "muon"),
                     scale=setting(args, "scale", "muon"), weight_decay=args.weight_decay, fused=fused or None)


def check_imports(specs) -> None:
    """Fail early, with the install command, when a galore or apollo run cannot import its package."""
    needed = {s.optimizer for s in specs}
    try:
        if "galore" in needed:
            import_galore()
        if needed & {"apollo", "apollo-mini"}:
            import_apollo()
    except RuntimeError as exc:
        raise SystemExit(f"grassfx train: error: {exc}") from None
