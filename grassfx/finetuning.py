"""Measured settings applied in one call: :func:`finetune`, for fine-tuning a pretrained model.

The setting was chosen by measurement (``benchmarks/RESULTS.md``, section 6: all-MiniLM-L6-v2
on Rotten Tomatoes against full AdamW and LoRA): at an optimizer state no larger than LoRA
rank 8's, the candidates were the embedding frozen or trained with a factored, momentum-free
second moment, AdamW or Muon on the selected rows, rank 8 / 16 / 32, ``update_freq``, scale
and the learning rate, each on a validation slice. :data:`FINETUNE` is the winner: on the
test split, 3 seeds, 78.2% accuracy with 2.1 MiB of optimizer state, against full AdamW's
79.1% (173 MiB) and LoRA r 8's 76.7% (2.6 MiB).
"""

from __future__ import annotations

import inspect
import math
import numbers

from torch import nn

from .errors import ConfigError

__all__ = ["FINETUNE", "EMBEDDING_MODES", "finetune"]

#: what :func:`finetune` uses unless told otherwise
FINETUNE = {"rank": 16, "update_freq": 50, "embeddings": "factored_nomomentum"}
#: what the embedding matrices keep: a ``full_state`` of :class:`grassfx.optim.AdamW`, or
#: ``"frozen"`` (the input embedding does not train; other embeddings keep both moments)
EMBEDDING_MODES = ("factored_nomomentum", "factored", "adam", "frozen")
#: ``grassfx.compile`` keywords :func:`finetune` sets itself
_OWN = ("rank", "update_freq", "exclude")


def finetune(model: nn.Module, *, lr: float, rank=FINETUNE["rank"], update_freq: int = FINETUNE["update_freq"],
             embeddings: str = FINETUNE["embeddings"], exclude=None, **compile_options):
    """Compile a pretrained ``model`` and make its optimizer with the measured fine-tuning setting.

    Every ``nn.Linear``-like weight keeps ``rank`` rows (``grassfx.compile``), except a weight
    whose smaller side is at most ``rank`` (a new task head such as a 2-label classifier: its
    rows would cost more state than the whole weight), which trains in full. The
    ``nn.Embedding`` weights train with a factored second moment and no first moment
    (``full_state="factored_nomomentum"``: a row and a column vector each, instead of two
    moments of the embedding's size), every other parameter with AdamW. The optimizer is
    :class:`grassfx.optim.AdamW` (weight decay 0, betas (0.9, 0.999)).

    Args:
        model: the pretrained ``nn.Module``, with its new head (it is not edited, except
            that ``embeddings="frozen"`` sets the input embedding's ``requires_grad`` to False).
        lr: the learning rate of every parameter (a float > 0); the measured best for
            all-MiniLM-L6-v2 was 1e-3 with a 10% linear warm-up and linear decay.
        rank: rows kept per projected weight (``grassfx.compile``'s ``rank``).
        update_freq: optimizer steps between refreshes of the selected rows.
        embeddings: ``"factored_nomomentum"`` (default), ``"factored"``, ``"adam"`` (both
            moments in full) or ``"frozen"`` (the input embedding does not train).
        exclude: more weights to keep dense (globs or predicates, as ``grassfx.compile``).
        **compile_options: any other keyword of ``grassfx.compile`` (``backend``, ``seed``, ...).

    Returns:
        ``(model, optimizer)``: the :class:`grassfx.GrassModel` and its
        :class:`grassfx.optim.AdamW`.

    Raises:
        ConfigError: a bad ``lr`` or ``embeddings``, or a keyword ``grassfx.compile`` does not take.

    Example:
        >>> import torch, grassfx
        >>> net = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64),
        ...                           torch.nn.Linear(64, 2))
        >>> model, opt = grassfx.finetune(net, lr=1e-3, backend="eager")
        >>> [s.name for s in model.sites], [g["full_state"] for g in opt.param_groups]
        (['1.weight'], ['factored_nomomentum', 'adam'])
    """
    from . import optim
    from .api import compile as grass_compile

    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr={lr!r}: expected a float > 0 (measured: 1e-3 for all-MiniLM-L6-v2)")
    if not isinstance(embeddings, str) or embeddings not in EMBEDDING_MODES:
        raise ConfigError(f"embeddings={embeddings!r}: allowed values: {', '.join(EMBEDDING_MODES)}")
    known = set(inspect.signature(grass_compile).parameters) - {"model", *_OWN}
    unknown = sorted(set(compile_options) - known)
    if unknown:
        raise ConfigError(f"grassfx.finetune got {', '.join(unknown)}: not keywords of grassfx.compile "
                          f"(allowed besides rank, update_freq and exclude: {', '.join(sorted(known))})")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    frozen = None
    if embeddings == "frozen":
        if not hasattr(model, "get_input_embeddings"):
            raise ConfigError("embeddings='frozen' needs model.get_input_embeddings() (a Hugging Face model); "
                              "freeze the embedding yourself and pass embeddings='adam'")
        frozen = model.get_input_embeddings().weight
        was = frozen.requires_grad
        frozen.requires_grad_(False)

    def small(name, param) -> bool:  # r x max(m, n) rows would hold at least m x n entries
        return isinstance(rank, numbers.Integral) and param.dim() == 2 and min(param.shape) <= rank

    drop = [small] + ([] if exclude is None else list(exclude) if isinstance(exclude, (list, tuple)) else [exclude])
    try:
        grass_model = grass_compile(model, rank=rank, update_freq=update_freq, exclude=drop, **compile_options)
    except BaseException:
        if frozen is not None:  # a refused setting leaves the model as it came
            frozen.requires_grad_(was)
        raise
    params = [p for p in grass_model.parameters() if p.requires_grad]
    mode = "adam" if embeddings == "frozen" else embeddings
    ids = {id(t) for t in tables}
    groups = [{"params": [p for p in params if id(p) in ids], "full_state": mode},
              {"params": [p for p in params if id(p) not in ids]}]
    groups = [g for g in groups if g["params"]]
    return grass_model, optim.AdamW(groups, lr=lr, weight_decay=0.0)
