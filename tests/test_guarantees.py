"""docs/guarantees.md names the tests that hold each promise: every one of them must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _named_tests() -> list:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    return re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)


def test_every_guarantee_names_tests_that_exist():
    named = _named_tests()
    assert len(named) >= 20  # the list is the point: an empty match would check nothing
    missing = []
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name not in defined:
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_every_bullet_of_the_guarantees_is_backed_by_a_test():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    sections = text.split("\n## ")[1:]
    for section in sections:
        if section.startswith("What the invariant costs"):
            continue
        for bullet in re.split(r"\n- ", "\n" + section.split("\n", 1)[1])[1:]:
            assert "`tests/" in bullet, f"a guarantee without a test: {bullet[:80]!r}"
