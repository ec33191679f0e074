"""``grassfx.compile``: the one-line entry point."""

from __future__ import annotations

import torch
from torch import nn

from . import fsdp
from .config import GrassConfig
from .errors import ConfigError, UnsupportedModelError
from .instrument import GrassModel, registry
from .instrument.targets import plan_targets, targets_of

__all__ = ["compile"]


def compile(  # noqa: A001 - the promised public name
    model: nn.Module,
    rank=256,
    *,
    selection: str = "top_r",
    update_freq: int = 200,
    scale: float = 1.0,
    proj_dim: str = "auto",
    targets=None,
    exclude=None,
    seed: int = 0,
    backend: str = "inductor",
    mode=None,
    moments: str = "reset",
    explore: float = 0.0,
    dynamic=None,
    options: dict | None = None,
    data_parallel=None,
    record: bool = False,
    refresh: str = "eager",
    blocks=None,
) -> GrassModel:
    """Make ``model`` train by Grass: only r rows of each weight gradient are computed.

    Args:
        model: any ``nn.Module`` (Hugging Face models included); it is not edited.
        rank: rows kept per weight (int >= 1; ``rank >= rows`` keeps all) or a fraction
            of the rows (float in (0, 1]).
        selection: ``"top_r"``, ``"multinorm"``, ``"multinorm_nr"`` or ``"uniform"``.
        update_freq: optimizer steps between refreshes of the selected rows.
        scale: the update scale alpha applied by grassfx.optim.
        proj_dim: ``"rows"`` (dim 0 of the weight), ``"cols"`` (dim 1), ``"auto"``
            (the larger dim, which keeps the optimizer state smallest: r x min(m, n)) or
            ``"smaller"`` (the smaller dim, as GaLore projects: r of min(m, n) rows or
            columns train per window, state r x max(m, n)).
        targets / exclude: name globs or predicates ``f(name, param)`` choosing weights
            (``targets=None``: automatic; ``targets=[]`` is an error). Frozen weights
            (``requires_grad=False``) are never projected.
        seed: seeds the stochastic selectors (same seed -> same rows in every process).
        backend: ``"inductor"`` (compiled, rewritten), ``"aot_eager"`` (rewritten graphs
            without Inductor) or ``"eager"`` (no compilation; dense fallback).
        mode: passed to ``torch.compile`` (``None``, ``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``).
        moments: ``"reset"`` (zero optimizer moments at a refresh) or ``"keep_overlap"``
            (keep the moments, and the per-row step counts, of rows selected before and
            after; new rows start fresh).
        explore: share of each rank (a float in [0, 1)) given, at every refresh, to the
            rows that went unselected longest (``top_r`` and ``multinorm_nr``), so every
            row trains now and then; 0 selects by the selector alone.
        dynamic: passed to ``torch.compile`` (``None``, ``True`` or ``False``).
        options: extra Inductor options passed to ``torch.compile``.
        data_parallel: ``None`` (default): average gradients across ranks whenever
            ``torch.distributed`` is initialised with more than one process, sending only
            compressed gradients for projected weights (see ``grassfx.distributed``);
            ``False``: never communicate.
        record: keep node snapshots of every compiled graph before and after each pass
            (for ``grassfx.diff(model)``); off by default (compile time and memory).
            ``GRASSFX_DEBUG>=1`` turns it on too.
        refresh: how a compiled model runs its refresh steps (one every ``update_freq``
            steps, where the dense gradients pick the rows): ``"eager"`` (default: no
            second graph to compile, so compiling costs about what ``torch.compile``
            costs; each weight's dense gradient is reduced to row norms and freed as soon
            as it is produced) or ``"compiled"`` (a refresh graph of its own, compiled
            with ``backend``). Both pick the same rows.
        blocks: fused weights (q|k|v, gate|up) select rows per logical block, each block
            getting its share of the rank. ``None`` (default): detect the layouts of
            Hugging Face and ``nn.MultiheadAttention`` fused weights (docs/layouts.md);
            ``False``: never split; a dict ``{name glob: [sizes] or None}`` sets the block
            sizes along the selected dim of the weights a glob matches (``None``: no
            blocks), others are detected. A glob that matches no projected weight, or
            sizes that do not sum to the selected dim, raise :class:`ConfigError`.

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
    config = GrassConfig(
        rank=rank,
        selection=selection,
        update_freq=update_freq,
        scale=scale,
        proj_dim=proj_dim,
        seed=seed,
        backend=backend,
        mode=mode,
        moments=moments,
        explore=explore,
        dynamic=dynamic,
        compile_options=dict(options or {}),
        data_parallel=data_parallel,
        record=record,
        refresh=refresh,
        blocks=blocks,
    )
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
