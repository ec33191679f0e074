"""Instrumenting a model for Grass (eager, once, before any compilation).

* :mod:`.targets`: which weights are projected, with a decision and reason for every parameter;
* :mod:`.expert_targets` / :mod:`.experts`: MoE expert stacks (3-D, one matrix per expert):
  discovery, ``ExpertSite`` (rows of each expert), the marker op ``grassfx::expertsel``;
* :mod:`.anchors`: the marker op ``grassfx::rowsel`` and the anchors (autograd Functions);
* :mod:`.swap`: anchors installed by class swap, so ``module.weight`` reads them;
* :mod:`.site`: the Grass state of one weight (handle, ``idx``, ``rho``, owed decay);
* :mod:`.refresh`: the refresh state machine and the step counter;
* :mod:`.guard`: misuse detection (a foreign optimizer stepping the handles);
* :mod:`.registry`: what the model publishes about its tensors for the optimizer;
* :mod:`.model`: ``GrassModel``, composing the above, and ``unwrap``.
"""

from __future__ import annotations

from .model import GrassModel, unwrap
from .site import Site
from .targets import Decision, TargetSpec, find_targets, plan_targets

__all__ = ["GrassModel", "unwrap", "Site", "Decision", "TargetSpec", "find_targets", "plan_targets"]
