"""Block layouts of fused weights: which logical block (q, k, v, gate, up) each row is.

A fused weight stacks several matrices along one dim: q|k|v in one projection, gate|up
in one MLP input. Their gradients differ in scale (v's rows often dominate), so ``top_r``
over the whole weight can leave a block untrained for good. With a layout, selection
runs per block: each block gets its share of the rank (:func:`grassfx.select.split_rank`)
and the selector is applied within it (:mod:`grassfx.select`).

A :class:`BlockLayout` lists the blocks in one period of the rows (``segments``: (block,
rows) pairs) and how often the period repeats: ``q|k|v`` is one period; GPT-NeoX's
per-head ``q_h k_h v_h`` is ``heads`` periods. Detected layouts (names + the model's
Hugging Face ``config``, sizes checked against the weight):

=====================================  ==========================================  ==========
weight                                 rows along the fused dim                     fused dim
=====================================  ==========================================  ==========
``c_attn`` (GPT-2 ``Conv1D``)          q | k | v; cross-attention k | v (equal)     1 (out)
``qkv_proj`` (Phi-3)                   q (heads*hd) | k (kv*hd) | v (kv*hd)         0
``gate_up_proj`` (Phi-3)               gate | up (equal)                            0
``query_key_value`` (GPT-NeoX, Bloom)  per head: q_h | k_h | v_h                    0
``query_key_value`` (Falcon)           per kv group: q x (heads/kv) | k | v;        0
                                       multi-query: q | k (hd) | v (hd)
``in_proj_weight`` (MultiheadAttn)     q | k | v (equal)                            0
=====================================  ==========================================  ==========

When the selected dim is not the fused one, every selected row spans all blocks and no
split is needed. A name that looks fused but whose sizes do not add up gets no layout,
and the reason is kept for ``grassfx.explain``. ``blocks=`` overrides detection.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from grassfx.errors import ConfigError

from .targets import _is_conv1d  # Hugging Face's Conv1D (GPT-2), recognised by name

__all__ = ["BlockLayout", "LayoutChoice", "plan_layouts", "detect_layout", "describe_selection"]


@dataclass(frozen=True)
class BlockLayout:
    """Blocks along the selected dim: ``segments`` (block, rows) of one period, ``repeat`` periods."""

    names: tuple  # block names, e.g. ("q", "k", "v")
    segments: tuple  # ((block, rows), ...) in row order, one period
    repeat: int = 1
    source: str = ""  # what it was detected from, e.g. "GPT-2 c_attn"

    @property
    def rows(self) -> int:
        return self.repeat * sum(n for _, n in self.segments)

    @property
    def sizes(self) -> tuple:
        """Rows per block over all periods."""
        per = [0] * len(self.names)
        for block, n in self.segments:
            per[block] += n * self.repeat
        return tuple(per)

    def labels(self, device=None) -> torch.Tensor:
        """Each row's block, int64 (rows,)."""
        ids = torch.tensor([b for b, _ in self.segments], dtype=torch.int64)
        lengths = torch.tensor([n for _, n in self.segments], dtype=torch.int64)
        return torch.repeat_interleave(ids, lengths).repeat(self.repeat).to(device)

    def describe(self) -> str:
        """E.g. ``"q 64 | k 32 | v 32 rows"`` or ``"per head (x4): q 16 | k 16 | v 16 rows"``."""
        total = " | ".join(f"{name} {size}" for name, size in zip(self.names, self.sizes))
        if self.repeat == 1:
            return f"{total} rows"
        period = " ".join(f"{self.names[b]} {n}" for b, n in self.segments)
        return f"{total} rows, interleaved {self.repeat} x [{period}]"


@dataclass(frozen=True)
class LayoutChoice:
    """The layout of one projected weight (None: select over the whole dim) and why."""

    layout: BlockLayout | None
    note: str = ""  # for explain: where the layout came from, or why there is none


def _contiguous(names, sizes, source) -> BlockLayout:
    return BlockLayout(tuple(names), tuple(enumerate(sizes)), 1, source)


def _hf_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = getattr(config, "get_text_config", None)
    try:
        return text() if callable(text) else config
    except (TypeError, ValueError):
        return config


def _heads(config):
    """``(heads, kv heads, head_dim)`` from a Hugging Face config, or None."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        if not isinstance(hidden, int) or hidden % heads:
            return None
        head_dim = hidden // heads
    return heads, int(kv), head_dim


def _qkv_proj(config, fused, other):
    """Phi-3 style ``qkv_proj``: contiguous q | k | v, k and v of kv-heads each."""
    if getattr(config, "model_type", None) == "codegen":
        return None, "CodeGen's qkv_proj interleaves model-parallel shards: no blocks (pass blocks=)"
    heads = _heads(config) if config is not None else None
    if heads is None:
        if fused == 3 * other:  # no config: equal thirds only when it is the plain 3 x hidden
            return _contiguous("qkv", (other,) * 3, "qkv_proj: 3 equal blocks"), ""
        return None, "qkv_proj without a model config giving the head counts: no blocks (pass blocks=)"
    n, kv, hd = heads
    sizes = (n * hd, kv * hd, kv * hd)
    if sum(sizes) != fused:
        return None, f"qkv_proj: {n} heads + 2 x {kv} kv heads x {hd} = {sum(sizes)} != {fused} rows: no blocks"
    return _contiguous("qkv", sizes, f"qkv_proj ({n} q / {kv} kv heads)"), ""


def _gate_up(config, fused, other):
    inter = getattr(config, "intermediate_size", None) if config is not None else None
    if fused % 2 or (isinstance(inter, int) and 2 * inter != fused):
        return None, f"gate_up_proj: {fused} rows is not 2 x intermediate_size ({inter}): no blocks"
    return _contiguous(("gate", "up"), (fused // 2,) * 2, "gate_up_proj"), ""


def _query_key_value(config, fused, other):
    model_type = getattr(config, "model_type", None) if config is not None else None
    heads = _heads(config) if config is not None else None
    if heads is None:
        return None, "query_key_value without a model config giving the head counts: no blocks (pass blocks=)"
    n, kv, hd = heads
    if model_type in ("gpt_neox", "bloom") or (model_type == "falcon" and not config.new_decoder_architecture
                                               and not config.multi_query):
        layout = BlockLayout(tuple("qkv"), ((0, hd), (1, hd), (2, hd)), n, f"{model_type} per-head q|k|v")
    elif model_type == "falcon" and config.new_decoder_architecture:
        kv = getattr(config, "num_kv_heads", None) or n
        if n % kv:
            return None, f"query_key_value: {n} heads do not group into {kv} kv heads: no blocks"
        layout = BlockLayout(tuple("qkv"), ((0, (n // kv) * hd), (1, hd), (2, hd)), kv, "falcon grouped q|k|v")
    elif model_type == "falcon":  # multi-query: all q heads, then one k and one v head
        layout = _contiguous("qkv", (n * hd, hd, hd), "falcon multi-query q|k|v")
    else:
        return None, f"query_key_value of model_type {model_type!r}: layout unknown, no blocks (pass blocks=)"
    if layout.rows != fused:
        return None, f"query_key_value: {model_type} layout gives {layout.rows} != {fused} rows: no blocks"
    return layout, ""


def _mha_in_proj(module, fused, other):
    if fused != 3 * other or not getattr(module, "_qkv_same_embed_dim", False):
        return None, f"in_proj_weight: {fused} rows is not 3 x embed_dim ({other}): no blocks"
    return _contiguous("qkv", (other,) * 3, "MultiheadAttention in_proj"), ""


def _c_attn(fused, other):
    """GPT-2 ``c_attn``: q | k | v (self-attention) or k | v (cross-attention), equal blocks."""
    if fused == 3 * other:
        return _contiguous("qkv", (other,) * 3, "GPT-2 c_attn"), ""
    if fused == 2 * other:
        return _contiguous("kv", (other,) * 2, "GPT-2 cross-attention c_attn"), ""
    return None, f"c_attn: {fused} outputs is neither 3 nor 2 x {other}: no blocks"


def detect_layout(module: nn.Module, leaf: str, attr: str, shape: tuple, dim: int, config=None) -> LayoutChoice:
    """The layout of ``module.<attr>`` (``shape``) when selecting along ``dim``.

    ``leaf`` is the module's own name in its parent (``"qkv_proj"``); ``config`` the
    model's Hugging Face config (head counts), if any.

    Example:
        >>> detect_layout(nn.Linear(8, 24), "qkv_proj", "weight", (24, 8), 0).layout.sizes
        (8, 8, 8)
        >>> detect_layout(nn.Linear(8, 24), "up_proj", "weight", (24, 8), 0).layout is None
        True
    """
    if isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
        fused_dim, rule = 0, lambda f, o: _mha_in_proj(module, f, o)
    elif _is_conv1d(module) and attr == "weight" and leaf == "c_attn":
        fused_dim, rule = 1, _c_attn
    elif isinstance(module, nn.Linear) and attr == "weight" and leaf in _BY_NAME:
        fused_dim, kind = 0, _BY_NAME[leaf]
        def rule(f, o):
            return kind(config, f, o)
    else:
        return LayoutChoice(None)
    layout, why = rule(shape[fused_dim], shape[1 - fused_dim])
    if layout is None:
        return LayoutChoice(None, why)
    if dim != fused_dim:
        axis = "columns" if dim == 1 else "rows"
        return LayoutChoice(None, f"fused {'|'.join(layout.names)} along dim {fused_dim}, {axis} selected: "
                                  "each spans every block, no split needed")
    return LayoutChoice(layout, f"detected: {layout.source}")


_BY_NAME = {"qkv_proj": _qkv_proj, "gate_up_proj": _gate_up, "query_key_value": _query_key_value}


def _matches(glob: str, spec) -> bool:
    return fnmatch.fnmatchcase(spec.name, glob) or fnmatch.fnmatchcase(spec.module_name, glob)


def _override(glob: str, sizes, spec, dim: int) -> LayoutChoice:
    if sizes is None or sizes is False or len(sizes) == 0:
        return LayoutChoice(None, f"blocks[{glob!r}]: no blocks")
    rows = spec.shape[dim]
    if sum(sizes) != rows:
        raise ConfigError(
            f"blocks[{glob!r}]={list(sizes)} sums to {sum(sizes)}, but {spec.name!r} {tuple(spec.shape)} "
            f"has {rows} along its selected dim {dim}: give sizes that sum to {rows} (or pass proj_dim= "
            "to select the other dim)"
        )
    names = tuple(f"b{i}" for i in range(len(sizes)))
    return LayoutChoice(_contiguous(names, tuple(int(s) for s in sizes), f"blocks[{glob!r}]"),
                        f"blocks[{glob!r}]")


def plan_layouts(model: nn.Module, specs: list, config) -> list:
    """A :class:`LayoutChoice` per target spec, from ``config.blocks`` and detection.

    Raises:
        ConfigError: a ``blocks=`` glob matches no projected weight, or its sizes do not
            sum to the selected dim.
    """
    wanted = config.blocks
    dims = [config.select_dim(tuple(spec.shape)) if len(spec.shape) == 2 else None for spec in specs]
    if wanted is False:
        return [LayoutChoice(None) for _ in specs]
    overrides = dict(wanted or {})
    for glob in overrides:
        if not any(_matches(glob, spec) for spec in specs):
            raise ConfigError(
                f"blocks={{{glob!r}: ...}} matches no projected weight; projected: "
                f"{[s.name for s in specs][:6]}{' ...' if len(specs) > 6 else ''}"
            )
    hf = _hf_config(model)
    choices = []
    for spec, dim in zip(specs, dims):
        if len(spec.shape) != 2:  # an expert stack: rows are selected per expert instead
            choices.append(LayoutChoice(None, "expert stack: r rows of each expert"))
            continue
        glob = next((g for g in overrides if _matches(g, spec)), None)
        if glob is not None:
            choices.append(_override(glob, overrides[glob], spec, dim))
            continue
        module = model.get_submodule(spec.module_name)
        leaf = spec.module_name.rpartition(".")[2]
        choices.append(detect_layout(module, leaf, spec.attr, tuple(spec.shape), dim, hf))
    return choices


def describe_selection(layout: BlockLayout | None, blocks: tuple | None, note: str) -> str:
    """What a site's selection does with its blocks, for ``grassfx.explain``.

    E.g. ``"q 64 | k 64 | v 64 rows, 8/8/8 selected [detected: GPT-2 c_attn]"``; without
    a layout, the reason there is none (``""`` for a weight that is not fused).
    """
    if layout is None:
        return note
    picked = "/".join(str(quota) for _, quota, _ in blocks)
    explored = [extra for _, _, extra in blocks]
    cover = f" ({'/'.join(map(str, explored))} of them for coverage)" if any(explored) else ""
    return f"{layout.describe()}, {picked} selected{cover} [{note}]"
