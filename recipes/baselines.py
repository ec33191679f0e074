"""The packages behind ``grassfx train``'s GaLore and APOLLO baselines, imported on demand, and
APOLLO's parameter groups (no command line here: :mod:`.options` checks settings with these,
:mod:`.optimizers` builds the runs' optimizers with them; see its docstring for the settings)."""

from __future__ import annotations

import logging
import warnings

__all__ = ["import_galore", "import_apollo", "apollo_param_groups"]


def _import(package: str, name: str, flag: str, install: str):
    """``package.name``, or a RuntimeError that names the flag and how to install it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = __import__(package, fromlist=[name])
            return getattr(module, name)
    except ImportError as exc:
        raise RuntimeError(f"--optimizer {flag} needs the {install.split('==')[0]} package (which imports "
                           f"bitsandbytes): pip install {install} bitsandbytes  (import failed: {exc})") from exc


def import_galore():
    """Import ``GaLoreAdamW`` or raise an error that says how to install it."""
    return _import("galore_torch", "GaLoreAdamW", "galore", "galore-torch==1.0")


def import_apollo():
    """Import ``APOLLOAdamW`` or raise an error that says how to install it."""
    return _import("apollo_torch", "APOLLOAdamW", "apollo", "apollo-torch==1.0.3")


def apollo_param_groups(matrices: list, rest: list, rank: int, update_freq: int, scale: float,
                        mini: bool) -> list[dict]:
    """``APOLLOAdamW``'s groups: ``rest`` plain, ``matrices`` projected at ``rank`` (random
    projection, channel-wise scaling, or tensor-wise for ``mini``), refreshed every
    ``update_freq`` steps, their step multiplied by ``scale`` (the package's ``scale`` is its
    square: it multiplies the update by the square root of its own)."""
    return [{"params": rest},
            {"params": matrices, "rank": rank, "proj": "random", "proj_type": "std",
             "scale_type": "tensor" if mini else "channel", "update_proj_gap": update_freq, "scale": scale ** 2}]
