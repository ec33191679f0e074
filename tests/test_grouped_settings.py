"""compile()'s settings grouped (grassfx.Selection, grassfx.Refresh) next to the flat keywords."""

from __future__ import annotations

import inspect

import pytest
import torch

import grassfx
from grassfx.config import OPTION_DOCS, GrassConfig


def test_a_group_equals_its_flat_keywords():
    grouped = grassfx.compile(torch.nn.Linear(64, 32), backend="eager",
                              selection=grassfx.Selection(rank=8, method="multinorm_nr", proj_dim="rows", explore=0.25,
                                                          seed=3),
                              refresh=grassfx.Refresh(update_freq=7, moments="keep_overlap", mode="compiled"))
    flat = grassfx.compile(torch.nn.Linear(64, 32), backend="eager", rank=8, selection="multinorm_nr", proj_dim="rows",
                           explore=0.25, seed=3, update_freq=7, moments="keep_overlap", refresh="compiled")
    assert grouped.grass_config == flat.grass_config


def test_a_keyword_given_twice_is_refused():
    with pytest.raises(grassfx.ConfigError, match="update_freq"):
        grassfx.compile(torch.nn.Linear(8, 8), backend="eager", update_freq=5, refresh=grassfx.Refresh(update_freq=9))
    with pytest.raises(grassfx.ConfigError, match="selection="):  # a group's values are checked as the keywords are
        grassfx.compile(torch.nn.Linear(8, 8), backend="eager", selection=grassfx.Selection(method="best"))


def test_defaults_and_docs_have_one_source():
    params = inspect.signature(grassfx.compile).parameters
    for name in ("rank", "selection", "update_freq", "proj_dim", "seed", "moments", "explore", "refresh", "blocks"):
        assert params[name].default == getattr(GrassConfig, name)
    assert GrassConfig.rank == grassfx.Selection.rank and GrassConfig.refresh == grassfx.Refresh.mode
    for name, text in OPTION_DOCS.items():
        assert f"{name}: {text.split()[0]}" in inspect.cleandoc(grassfx.compile.__doc__)
