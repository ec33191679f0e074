"""``python -m grassfx.train``: the pretraining job (it lives in :mod:`grassfx.recipes.train`)."""

from __future__ import annotations

from grassfx.recipes.train import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
