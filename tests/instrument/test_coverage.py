"""Coverage (``explore``): rows the norms never pick still train; ages survive checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grassfx

from conftest import make_linear


def test_explore_visits_rows_the_norms_never_pick():
    """top_r alone keeps picking the loud rows; explore gives every row a turn."""
    def visits(explore):
        torch.manual_seed(0)
        lin = nn.Linear(8, 16, bias=False)
        model = grassfx.compile(lin, rank=4, update_freq=1, explore=explore, proj_dim="rows", backend="eager")
        opt = grassfx.optim.SGD(model.parameters(), lr=0.0)
        loud = torch.tensor([100.0] * 4 + [1.0] * 12)  # rows 0-3 always have the largest gradients
        seen = set()
        for _ in range(8):
            (model(torch.randn(4, 8)) * loud).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            seen |= set(model.sites[0].idx.tolist())
        return seen

    assert visits(0.0) == {0, 1, 2, 3}
    assert visits(0.5) == set(range(16))  # 2 stale rows per refresh: all 12 quiet rows in 6 refreshes


def test_explore_is_checked():
    with pytest.raises(grassfx.ConfigError, match="explore"):
        grassfx.compile(make_linear(), rank=4, selection="uniform", explore=0.25, backend="eager")
    with pytest.raises(grassfx.ConfigError, match="explore"):
        grassfx.compile(make_linear(), rank=4, explore=1.0, backend="eager")


def test_checkpoint_without_last_seen_still_loads():
    model = grassfx.compile(make_linear(), rank=4, backend="eager")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("last_seen")}
    model.load_state_dict(state)
    assert (model.sites[0].last_seen == -1).all()
