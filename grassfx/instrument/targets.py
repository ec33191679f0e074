"""Finding the weights Grass projects.

A *target* is a 2-D parameter whose gradient comes from a matmul-like use:

* ``nn.Linear.weight`` (layout ``(out, in)``),
* Hugging Face ``Conv1D.weight`` (GPT-2; layout ``(in, out)``: ``y = x @ W + b``),
* a 2-D parameter of any other module whose ``forward`` multiplies by it: the weight (or
  a view or piece of it, e.g. ``w = self.qkv.view(...)``) is an operand of
  ``linear``/``matmul``/``mm``/``bmm``/``einsum`` or ``@``, directly or inside a Python
  function it is passed to (``nn.MultiheadAttention.in_proj_weight`` reaches ``linear``
  through ``F.multi_head_attention_forward``); see :mod:`.usage`.

Never targeted automatically: embeddings (their backward is a scatter) and any weight
tied to one (for example a tied LM head), the output embedding of a model that names one
(Hugging Face ``get_output_embeddings()``, an untied LM head: its rows are vocabulary
entries, and selecting r of them leaves every other token's logit untrained between
refreshes -- the GaLore and Grass pretraining setups project attention and MLP weights
only), a Hugging Face model's task head (its weights outside ``base_model``: a
classifier's few label rows), parameters with fewer or more than 2 dims (biases, norms, convolution kernels),
except 3-D MoE expert stacks (one matrix per expert: :mod:`.expert_targets`),
and frozen weights (``requires_grad=False`` before ``grassfx.compile``: they stay frozen,
even when ``targets=`` names them). Pass ``targets=`` to project an output head anyway. ``targets=`` / ``exclude=`` take name globs
(matched against the parameter's and its module's qualified names) or predicates
``f(name, param) -> bool``; ``targets=`` chooses among all 2-D parameters (``None``:
automatic discovery; an empty list is an error, not "nothing" or "automatic"). A glob
that matches a *module* name (``"*_proj"``) selects that module's 2-D weights and leaves
its biases and norms dense; a glob or predicate that names a parameter that is not 2-D
(``"*.bias"``) is an error, and so is a glob of either argument that matches no
parameter or module name (a typo is never ignored).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from grassfx.errors import ConfigError, UnsupportedModelError

from .expert_targets import EXPERTS, is_expert_stack
from .usage import used_by_matmul

__all__ = ["TargetSpec", "Decision", "find_targets", "plan_targets", "targets_of", "NameFilter"]

NameFilter = Union[str, Callable[[str, torch.Tensor], bool], Sequence[Union[str, Callable]]]


@dataclass(frozen=True)
class TargetSpec:
    """One projected weight: where it lives and how it is laid out."""

    name: str  # qualified parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    module_name: str
    attr: str
    shape: tuple
    kind: str  # "linear" | "conv1d" | "matmul" | "explicit" | "experts" (3-D, one matrix per expert)


@dataclass(frozen=True)
class Decision:
    """What target discovery decided for one parameter name."""

    name: str
    shape: tuple
    target: Optional[TargetSpec]  # the projected weight this name reads (None: trained densely)
    reason: str  # why it is trained densely ("" when projected), e.g. "1-D (bias/norm)"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _embedding_param_ids(model: nn.Module) -> set:
    ids = set()
    for mod in model.modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            ids.add(id(mod.weight))
    return ids


def _output_head_ids(model: nn.Module) -> set:
    """The weight of the model's output embedding (an LM head), if the model names one."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return set()
    try:
        head = getter()
    except (NotImplementedError, AttributeError, TypeError):
        return set()
    weight = getattr(head, "weight", None)
    return {id(weight)} if isinstance(weight, torch.Tensor) else set()


def _task_head_ids(model: nn.Module) -> set:
    """Matrix weights of a Hugging Face model's task head: what lies outside its base model.

    ``BertForSequenceClassification.classifier``, ``LlamaForSequenceClassification.score``,
    a question-answering head: a few rows (one per label) freshly initialised on top of a
    pretrained base. Projecting them saves a few KiB and trains a label's row only while it
    is selected; they train densely, like LM heads. Models that do not name a base model
    (``base_model`` is the model itself, or absent) have no head by this rule.
    """
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return set()
    inside = {id(p) for p in base.parameters()}
    return {id(p) for p in model.parameters() if p.dim() == 2 and id(p) not in inside}


def _check_globs_match(filters: list, arg: str, model: nn.Module) -> None:
    """Raise :class:`ConfigError` for a glob of ``targets=``/``exclude=`` that names nothing."""
    globs = [f for f in filters if isinstance(f, str)]
    if not globs:
        return
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            close = [n for n in names if glob.strip("*.") and glob.strip("*.") in n][:3] or names[:3]
            raise ConfigError(
                f"{arg}={glob!r} matches no parameter or module name of {type(model).__name__} "
                f"(names look like {close}); a typo would otherwise be ignored silently"
            )


def _as_filters(spec, arg: str) -> list:
    if spec is None:
        return []
    if isinstance(spec, str) or callable(spec):
        items = [spec]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = list(spec)
    else:
        items = [spec]
    for item in items:
        if not (isinstance(item, str) or callable(item)):
            raise ConfigError(
                f"{arg}= takes name globs (str) or predicates f(name, param) -> bool, "
                f"got {type(item).__name__}"
            )
    return items


def _matches(filters: list, name: str, module_name: str, param: torch.Tensor) -> bool:
    return _match_kind(filters, name, module_name, param) is not None


def _match_kind(filters: list, name: str, module_name: str, param: torch.Tensor):
    """``"name"`` when a filter names the parameter itself (a glob on its name, or a
    predicate), ``"module"`` when only a glob on its module's name matches, else None."""
    by_module = False
    for f in filters:
        if isinstance(f, str):
            if fnmatch.fnmatchcase(name, f):
                return "name"
            by_module |= fnmatch.fnmatchcase(module_name, f)
        elif f(name, param):
            return "name"
    return "module" if by_module else None


def _auto_kind(module: nn.Module, attr: str, param: torch.Tensor, embedding_ids: set):
    if param.dim() != 2 or id(param) in embedding_ids:
        return None
    if isinstance(module, nn.Linear) and attr == "weight":
        return "linear"
    if _is_conv1d(module) and attr == "weight":
        return "conv1d"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return None
    if used_by_matmul(module, attr):
        return "matmul"
    return None


def _iter_params(model: nn.Module) -> Iterable:
    seen = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{attr}" if module_name else attr
            yield name, module_name, module, attr, param


def _choose(include, drop, name, module_name, module, attr, param, embedding_ids, head_ids):
    """The TargetSpec of one parameter, or None when it is not projected."""
    if include:
        how = _match_kind(include, name, module_name, param)
        if how is None:
            return None
        if how == "module" and param.dim() not in (2, 3):
            return None  # a glob naming a module selects its matrix weights, not its bias or norm
        if param.dim() not in (2, 3):
            raise ConfigError(
                f"targets= matched {name!r} of shape {tuple(param.shape)}: only 2-D "
                "weights and 3-D expert stacks can be projected; narrow the glob or predicate"
            )
        kind = EXPERTS if param.dim() == 3 else _auto_kind(module, attr, param, embedding_ids) or "explicit"
    else:
        kind = _auto_kind(module, attr, param, embedding_ids)
        if kind is None and is_expert_stack(module, attr, param):
            kind = EXPERTS
        if kind is None or id(param) in head_ids:
            return None
    if _matches(drop, name, module_name, param) or not param.requires_grad:
        return None
    if not param.is_floating_point():
        raise ConfigError(f"target {name!r} has dtype {param.dtype}; only floating weights train")
    return TargetSpec(name, module_name, attr, tuple(param.shape), kind)


def _reason(module, attr, param, embedding_ids: set, head_ids: set) -> str:
    """Why a parameter (seen for the first time) is trained densely."""
    if not param.requires_grad:
        return "frozen (requires_grad=False)"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if id(param) in embedding_ids:
        return "tied to an embedding"
    if id(param) in head_ids:
        return "output embedding (LM head)"
    if param.dim() == 1:
        return "1-D (bias/norm)"
    if is_expert_stack(module, attr, param):
        return "excluded by filter"
    if param.dim() != 2:
        return f"{param.dim()}-D (not a matrix)"
    if _auto_kind(module, attr, param, embedding_ids) is not None:
        return "excluded by filter"
    return "not used by a matmul"


def plan_targets(model: nn.Module, targets: NameFilter = None, exclude: NameFilter = None) -> list:
    """A :class:`Decision` for every parameter name of ``model`` (tied names included).

    Example:
        >>> m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8))
        >>> [(d.name, d.reason or "projected") for d in plan_targets(m)][:3]
        [('0.weight', 'embedding'), ('1.weight', 'projected'), ('1.bias', '1-D (bias/norm)')]
    """
    include = _as_filters(targets, "targets")
    if targets is not None and not include:
        raise ConfigError(
            "targets=[] selects no weight: pass targets=None for automatic discovery, or "
            "name the weights to project (globs or predicates)"
        )
    drop = _as_filters(exclude, "exclude")
    _check_globs_match(include, "targets", model)
    _check_globs_match(drop, "exclude", model)
    embedding_ids = _embedding_param_ids(model)
    head_ids = _output_head_ids(model)
    task_head_ids = _task_head_ids(model) - head_ids
    chosen = {}
    for name, module_name, module, attr, param in _iter_params(model):
        spec = _choose(include, drop, name, module_name, module, attr, param, embedding_ids,
                       head_ids | task_head_ids)
        if spec is not None:
            chosen[id(param)] = spec
    decisions, first = [], {}
    tied_asked = []  # names targets= matched that are second names of a weight not projected
    for name, param in model.named_parameters(remove_duplicate=False):
        shape = tuple(int(s) for s in param.shape)
        spec = chosen.get(id(param))
        if spec is not None:
            decisions.append(Decision(name, shape, spec, ""))
        elif id(param) in first:
            owner = first[id(param)]
            module_name = name.rpartition(".")[0]
            if include and _matches(include, name, module_name, param):
                tied_asked.append(f"{name!r} is tied to {owner!r}")
            reason = f"tied to an embedding ({owner})" if id(param) in embedding_ids else f"shared with {owner}"
            decisions.append(Decision(name, shape, None, reason))
        else:
            first[id(param)] = name
            module_name, _, attr = name.rpartition(".")
            reason = _reason(model.get_submodule(module_name), attr, param, embedding_ids, head_ids)
            if id(param) in task_head_ids and reason == "excluded by filter":
                reason = "task head (outside the base model)"
            decisions.append(Decision(name, shape, None, reason))
    if tied_asked and not any(d.target is not None for d in decisions):
        raise UnsupportedModelError(
            f"targets= names only tied weights: {'; '.join(tied_asked)}. A weight is projected "
            "under its first name, and weights tied to an embedding never are: name the "
            "first name, or untie the weights (e.g. tie_word_embeddings=False)"
        )
    return decisions


def find_targets(model: nn.Module, targets: NameFilter = None, exclude: NameFilter = None) -> list:
    """List the weights to project, in module order.

    Example:
        >>> m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8))
        >>> [t.name for t in find_targets(m)]
        ['1.weight']
    """
    return targets_of(plan_targets(model, targets, exclude), model)


def targets_of(decisions: list, model: nn.Module) -> list:
    """The TargetSpecs among ``decisions``; raises when there is none."""
    found = [d.target for d in decisions if d.target is not None and d.target.name == d.name]
    if not found:
        frozen = [d.name for d in decisions if d.reason.startswith("frozen")]
        note = f"; frozen weights (requires_grad=False) are never projected: {frozen[:4]}" if frozen else ""
        raise UnsupportedModelError(
            f"no target weights found in {type(model).__name__}: grassfx projects 2-D weights "
            "used by a matmul (nn.Linear, Conv1D, F.linear/matmul/einsum on self.<weight>); "
            f"pass targets='glob' or a predicate to choose weights explicitly{note}"
        )
    return found
