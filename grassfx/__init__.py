"""grassfx: Grass (GRAdient Structured Sparsification, arXiv 2406.17660) as a compiler pass.

Example:
    >>> import torch, grassfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> model = grassfx.compile(net, rank=8, backend="eager")
    >>> opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
    >>> model(torch.randn(5, 16)).sum().backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from . import optim
from .api import compile
from .config import Refresh, Selection
from .errors import (
    ConfigError,
    GrassError,
    LostGradientError,
    ModelChangedError,
    NonFiniteGradientError,
    OptimizerMisuseError,
    PassError,
    UnsupportedModelError,
)
from .finetuning import finetune
from .instrument import GrassModel, unwrap

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "compile",
    "finetune",
    "Selection",
    "Refresh",
    "unwrap",
    "optim",
    "GrassModel",
    "GrassError",
    "ConfigError",
    "UnsupportedModelError",
    "PassError",
    "OptimizerMisuseError",
    "NonFiniteGradientError",
    "LostGradientError",
    "ModelChangedError",
]


def __getattr__(name):
    # The debugging tools import the compiler lazily: no import-time work.
    if name in ("explain", "diff"):
        from . import debug

        return getattr(debug, name)
    raise AttributeError(f"module 'grassfx' has no attribute {name!r}")
