"""Target discovery: what the forward does with a weight decides, and globs mean what users mean."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grassfx
from grassfx.instrument.targets import find_targets, plan_targets
from grassfx.instrument.usage import used_by_matmul


def _split_matmul(x, weight):
    """A functional helper: the weight reaches a matmul through a split and a transpose."""
    first, _ = weight.chunk(2)
    return x[..., : first.shape[1]] @ first.T


class Functional(nn.Module):
    """Weights used by matmuls directly, through a helper, or not at all."""

    def __init__(self):
        super().__init__()
        self.direct = nn.Parameter(torch.randn(6, 6))
        self.helper = nn.Parameter(torch.randn(12, 6))
        self.scale = nn.Parameter(torch.randn(6, 6))  # elementwise only, on a line that also multiplies

    def forward(this, x):  # any name for ``self``
        w = this.direct.t()
        return x @ w + _split_matmul(x, weight=this.helper).sum() + this.scale * x


def test_usage_follows_locals_and_functions():
    m = Functional()
    assert used_by_matmul(m, "direct")
    assert used_by_matmul(m, "helper")
    assert not used_by_matmul(m, "scale")  # on a matmul line, but not an operand of it


def test_multihead_attention_in_proj_is_found():
    mha = nn.MultiheadAttention(16, 2)
    names = [t.name for t in find_targets(mha)]
    assert names == ["in_proj_weight", "out_proj.weight"]
    separate = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)  # q/k/v projections not packed
    assert {t.name for t in find_targets(separate)} == {"q_proj_weight", "k_proj_weight", "v_proj_weight",
                                                         "out_proj.weight"}


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=True)
        self.o_proj = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 4, bias=True)

    def forward(self, x):
        return self.lm_head(self.norm(self.o_proj(self.q_proj(x))))


def test_module_glob_selects_the_modules_matrix_weights_not_its_bias():
    m = Proj()
    decisions = {d.name: d for d in plan_targets(m, targets=["*_proj", "lm_head"])}
    projected = sorted(n for n, d in decisions.items() if d.target is not None)
    assert projected == ["lm_head.weight", "o_proj.weight", "q_proj.weight"]
    assert decisions["q_proj.bias"].reason == "1-D (bias/norm)"
    # naming a bias itself is still an error: it cannot be projected
    with pytest.raises(grassfx.ConfigError, match="q_proj.bias"):
        plan_targets(m, targets=["q_proj.bias"])
    with pytest.raises(grassfx.ConfigError, match="only 2-D"):
        plan_targets(m, targets=lambda name, p: name.endswith("bias"))
