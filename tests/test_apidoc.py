"""The API reference cannot drift: docs/api.md is generated, and every argument is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import grassfx
from grassfx import _apidoc

ROOT = Path(__file__).resolve().parents[1]


def _public_optimizers():
    return [getattr(grassfx.optim, name) for name in grassfx.optim.__all__
            if inspect.isclass(getattr(grassfx.optim, name))
            and issubclass(getattr(grassfx.optim, name), grassfx.optim.GrassOptimizer)
            and getattr(grassfx.optim, name) is not grassfx.optim.GrassOptimizer]


def _arguments(func) -> set[str]:
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name for p in inspect.signature(func).parameters.values() if p.name != "self" and p.kind not in skip}


def test_api_md_is_current():
    expected = _apidoc.render()
    actual = (ROOT / "docs" / "api.md").read_text()
    assert actual == expected, "docs/api.md is stale: run `python -m grassfx._apidoc > docs/api.md`"


def test_every_public_optimizer_is_in_the_reference():
    listed = {path for _, path in _apidoc.PUBLIC}
    for cls in _public_optimizers():
        assert f"grassfx.optim.{cls.__name__}" in listed


@pytest.mark.parametrize("name", ["compile", "AdamW", "Muon", "SGD", "Adafactor"])
def test_every_argument_is_in_the_docstring(name):
    obj = grassfx.compile if name == "compile" else getattr(grassfx.optim, name)
    func = obj if name == "compile" else obj.__init__
    missing = _arguments(func) - _apidoc.documented_args(obj)
    assert not missing, f"{name}: arguments not named in the docstring's Args section: {sorted(missing)}"


def test_the_argument_check_sees_a_missing_argument():
    def f(a, b, *, c=1):
        """Summary.

        Args:
            a, b: two things.
        """

    assert _apidoc.documented_args(f) == {"a", "b"}
    assert _arguments(f) - _apidoc.documented_args(f) == {"c"}
    assert len(_public_optimizers()) >= 4
