"""A model pickled before grassfx kept its compiler loads, runs eagerly and says so."""

from __future__ import annotations

import warnings

import pytest
import torch

import grassfx

from conftest import make_mlp


def test_a_model_pickled_without_its_compiler_warns_and_runs_eagerly():
    model = grassfx.compile(make_mlp(), rank=4, backend="aot_eager")
    state = model.__getstate__()
    assert state.pop("_compiler") is not None  # what grassfx keeps now
    old = type(model).__new__(type(model))
    with pytest.warns(UserWarning, match="pickled by an older grassfx"):
        old.__setstate__(state)
    assert old._runner == old._run and old.compile_report is None
    x = torch.randn(5, 12)
    torch.testing.assert_close(old(x), model(x))

    again = type(model).__new__(type(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.__setstate__(model.__getstate__())  # kept its compiler: no warning
    assert again.compile_report is not None
