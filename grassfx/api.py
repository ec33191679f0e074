"""``grassfx.compile``: the one-line entry point."""

from __future__ import annotations

import torch
from torch import nn

from . import fsdp
from .config import GrassConfig, grouped, option_docs
from .errors import ConfigError, UnsupportedModelError
from .instrument import GrassModel, registry
from .instrument.targets import plan_targets, targets_of

__all__ = ["compile"]


def compile(  # noqa: A001 - the promised public name
    model: nn.Module,
    rank=GrassConfig.rank,
    *,
    selection=GrassConfig.selection,
    update_freq: int = GrassConfig.update_freq,
    scale: float = GrassConfig.scale,
    proj_dim: str = GrassConfig.proj_dim,
    targets=None,
    exclude=None,
    seed: int = GrassConfig.seed,
    backend: str = GrassConfig.backend,
    mode=GrassConfig.mode,
    moments: str = GrassConfig.moments,
    explore: float = GrassConfig.explore,
    dynamic=GrassConfig.dynamic,
    options: dict | None = None,
    data_parallel=GrassConfig.data_parallel,
    record: bool = GrassConfig.record,
    refresh=GrassConfig.refresh,
    blocks=GrassConfig.blocks,
) -> GrassModel:
    """Make ``model`` train by Grass: only r rows of each weight gradient are computed.

    Args:
        model: any ``nn.Module`` (Hugging Face models included); it is not edited.
{options}

    Returns:
        A :class:`grassfx.GrassModel`, called like ``model``.

    Example:
        >>> import torch, grassfx
        >>> m = grassfx.compile(torch.nn.Linear(64, 64), rank=8, backend="eager")
        >>> [tuple(s.handle.shape) for s in m.sites]
        [(8, 64)]
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, GrassModel):
        raise ConfigError("model is already a grassfx model; call grassfx.unwrap(model) first")
    _check_not_instrumented(model)
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"options={options!r}: expected a dict of Inductor options")
    settings = grouped(selection, refresh, dict(rank=rank, update_freq=update_freq, proj_dim=proj_dim, seed=seed,
                                                moments=moments, explore=explore, blocks=blocks))
    config = GrassConfig(**settings, scale=scale, backend=backend, mode=mode, dynamic=dynamic,
                         compile_options=dict(options or {}), data_parallel=data_parallel, record=record)
    fsdp.refuse_fsdp1(model)
    _check_materialized(model)
    decisions = plan_targets(model, targets=targets, exclude=exclude)
    if fsdp.check_model(model, [t.name for t in targets_of(decisions, model)]) and data_parallel is False \
            and torch.distributed.get_world_size() > 1:
        raise ConfigError("data_parallel=False with an FSDP2 model on several ranks: FSDP2's ranks train one "
                          "model together, so grassfx must average the compressed gradients and selections "
                          "across them; leave data_parallel at None")
    grass_model = GrassModel(model, targets_of(decisions, model), config, decisions)
    if config.backend != "eager":
        from .compiler import compile_runner

        grass_model.compile_with(compile_runner)
    return grass_model


def _check_not_instrumented(model: nn.Module) -> None:
    """Refuse a module whose weights another grassfx model already projects."""
    for name, param in model.named_parameters():
        site = registry.target_of(param)
        if site is not None:
            raise ConfigError(
                f"{name!r} is already projected by another grassfx model (as {site.name!r}); "
                "compiling it again would silently disconnect that model. Use the model "
                "grassfx.compile returned, call grassfx.unwrap() on it first, or compile "
                "copy.deepcopy(module)"
            )


def _check_materialized(model: nn.Module) -> None:
    """Refuse parameters on the meta device: grassfx's buffers would hold garbage after ``to_empty``."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{len(meta)} parameter(s) of {type(model).__name__} are on the meta device (e.g. "
            f"{meta[0]!r}): materialize the model first (model.to_empty(device=...) and "
            "initialise or load its weights), then call grassfx.compile"
        )


if compile.__doc__:  # the one text of each keyword (config.py); None under python -OO
    compile.__doc__ = compile.__doc__.replace("{options}", option_docs(8))
