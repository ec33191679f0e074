"""Memory model: bytes of weights, gradients, optimizer state and activations of a LLaMA.

Symbolic (sympy) in the rank ``r``, the bytes per element of weights ``b_w``, gradients
``b_g``, optimizer state ``b_s`` and activations ``b_a``, the tokens per step ``T``
(= batch x sequence) and the sequence length ``S``, for four ways to train:

* ``adamw``: full gradients, two full moments;
* ``galore``: full gradients (GaLore projects after the gradient exists); moments of the
  projected gradient, r x max(m, n), plus the r x min(m, n) projector, per projected weight
  (galore-torch's "std" projection keeps the larger side);
* ``grassfx``: compressed gradients r x min(m, n) (``proj_dim="auto"`` selects along the
  larger dim), two moments of that size, the ``idx``/``rho`` buffers and AdamW's per-row
  step count (16 bytes a selected row, r < rows), and ``last_seen`` (8 bytes a row of the
  selected dim);
* ``grassfx_fused``: grassfx with updates inside backward
  (``grassfx.optim.AdamW(..., update_in_backward=True)``): each parameter's gradient (a
  projected weight's compressed one, and the embedding's, head's and norms' dense ones) is
  consumed by its update as soon as it exists, so at most the largest single gradient is
  alive. That holds where autograd runs layer by layer (eager backward, refresh steps);
  a compiled backward graph returns all its gradients at once, so there the gradients
  are those of ``grassfx``;
* ``grassfx_factored``: grassfx with ``AdamW(full_state="factored")``: the embedding and an
  untied head keep their first moment and a factored second moment (float32 row and
  column means, 4 (m + n) bytes per matrix; :mod:`grassfx.optim.factored`);
* ``grassfx_factored_nomomentum``: ``full_state="factored_nomomentum"``: those matrices
  keep the factored second moment only;
* ``grassfx_muon``: ``grassfx.optim.Muon``: the selected rows keep one moment (Muon's
  momentum, r x min(m, n)) instead of AdamW's two;
* ``grassfx_muon_factored``, ``grassfx_muon_factored_nomomentum``: ``grassfx.optim.Muon``
  with ``full_state="factored"`` / ``"factored_nomomentum"``: Muon's rows, the embedding
  and head as ``grassfx_factored`` / ``grassfx_factored_nomomentum``;
* ``grassfx_muon_split``: Muon's rows, the input embedding with the factored second moment
  alone and an untied head with the first moment too (``full_state`` per parameter group).

Unprojected parameters (embedding, an untied LM head, norms) always keep a full gradient,
and (but for the two factored methods' matrices) full moments. grassfx's weights include its gradient handles (a zero parameter of the
compressed gradient's shape per projected weight).
Activations are what Hugging Face's ``LlamaForCausalLM`` (eager, sdpa attention, no
checkpointing) saves for backward, counted tensor by tensor, per layer
``T (8 h + 4 I + 2 kv + 2 + H)`` elements, plus ``T (3 h + 1 + V) + 2 S h/H`` outside the
layers, plus the int64 token ids and labels. On a small model in fp32 this matches
the bytes measured with saved-tensor hooks exactly (``tests/test_cost.py``); under bf16
autocast some saved tensors stay fp32, so ``b_a = 2`` is a lower bound there.

Example:
    >>> from grassfx.cost import LlamaShape, memory, evaluate
    >>> shape = LlamaShape.preset("7B")
    >>> numbers = evaluate(memory(shape), r=1024, b_w=2, b_g=2, b_s=2, b_a=2, T=256, S=256)
    >>> numbers["grassfx"]["optimizer_state"] < numbers["galore"]["optimizer_state"]
    True

``python -m grassfx.cost`` prints the tables for LLaMA 1B / 7B / 13B.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import sympy as sp

__all__ = ["LlamaShape", "memory", "evaluate", "SYMBOLS", "METHODS", "COMPONENTS", "table", "main"]

r, b_w, b_g, b_s, b_a, T, S = sp.symbols("r b_w b_g b_s b_a T S", positive=True)
SYMBOLS = {"r": r, "b_w": b_w, "b_g": b_g, "b_s": b_s, "b_a": b_a, "T": T, "S": S}
METHODS = ("adamw", "galore", "grassfx", "grassfx_fused", "grassfx_factored", "grassfx_factored_nomomentum",
           "grassfx_muon", "grassfx_muon_factored", "grassfx_muon_factored_nomomentum", "grassfx_muon_split")
COMPONENTS = ("weights", "gradients", "optimizer_state", "activations", "total")
INDEX_BYTES = 16  # int64 idx + fp32 rho + fp32 row_step per selected row
SEEN_BYTES = 8  # int64 last_seen per row of the selected dim


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a LLaMA that memory depends on."""

    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> "LlamaShape":
        """From a Hugging Face ``LlamaConfig``."""
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or
                   config.num_attention_heads, bool(getattr(config, "tie_word_embeddings", False)))

    @classmethod
    def preset(cls, name: str) -> "LlamaShape":
        """LLaMA sizes as used by the GaLore and Grass papers (vocabulary 32000)."""
        sizes = {"60M": (512, 1376, 8, 8), "350M": (1024, 2736, 24, 16), "1B": (2048, 5461, 24, 32),
                 "7B": (4096, 11008, 32, 32), "13B": (5120, 13824, 40, 40)}
        if name not in sizes:
            raise ValueError(f"unknown LLaMA size {name!r}; choose one of {', '.join(sizes)}")
        h, i, layers, heads = sizes[name]
        return cls(32000, h, i, layers, heads, heads)

    @property
    def kv(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projected(self) -> list:
        """(m, n) of every weight grassfx (and GaLore) projects: the 7 linears of each layer.

        The LM head is trained densely: grassfx does not project a model's output embedding
        by default (see ``grassfx.instrument.targets``), and GaLore's setup projects attention/MLP only.
        """
        h, i, kv = self.hidden, self.inter, self.kv
        per_layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
        return per_layer * self.layers

    def unprojected_matrices(self) -> list:
        """(m, n) of the 2-D parameters nobody projects: the embedding and an untied LM head."""
        return [(self.vocab, self.hidden)] * (1 if self.tied else 2)

    def unprojected_params(self) -> int:
        """Embedding, untied LM head and norm weights."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return sum(m * n for m, n in self.projected()) + self.unprojected_params()


def _activations(shape: LlamaShape):
    h, i, kv, heads = shape.hidden, shape.inter, shape.kv, shape.heads
    per_layer = T * (8 * h + 4 * i + 2 * kv + 2 + heads)
    outside = T * (3 * h + 1 + shape.vocab) + 2 * S * (h // heads)
    return b_a * (shape.layers * per_layer + outside) + 16 * T + 4  # + int64 ids/labels, the loss's fp32 count


def memory(shape: LlamaShape) -> dict:
    """``{method: {component: sympy expression in bytes}}`` (see the module docstring)."""
    dense = shape.unprojected_params()
    proj = shape.projected()
    full = sum(m * n for m, n in proj)
    kept = sum(sp.Min(r, max(m, n)) * min(m, n) for m, n in proj)
    largest_kept = sp.Max(*[sp.Min(r, max(m, n)) * min(m, n) for m, n in proj])
    largest_grad = sp.Max(largest_kept, shape.vocab * shape.hidden)  # or the embedding / head
    galore_state = sum(2 * sp.Min(r, min(m, n)) * max(m, n) + sp.Min(r, min(m, n)) * min(m, n) for m, n in proj)
    weights = b_w * (full + dense)
    acts = _activations(shape)
    index = INDEX_BYTES * sum(sp.Min(r, max(m, n)) for m, n in proj) + SEEN_BYTES * sum(max(m, n) for m, n in proj)
    mats = shape.unprojected_matrices()
    mat_params = sum(m * n for m, n in mats)
    factors = 4 * sum(m + n for m, n in mats)  # float32 row and column means
    vectors = dense - mat_params  # norms: both moments
    head_params = 0 if shape.tied else shape.vocab * shape.hidden
    adam_rows, muon_rows = 2 * b_s * kept + index, b_s * kept + index
    factored_full = b_s * mat_params + factors + 2 * b_s * vectors
    out = {
        "adamw": dict(gradients=b_g * (full + dense), optimizer_state=2 * b_s * (full + dense)),
        "galore": dict(gradients=b_g * (full + dense), optimizer_state=b_s * (galore_state + 2 * dense)),
        "grassfx": dict(gradients=b_g * (kept + dense), optimizer_state=2 * b_s * (kept + dense) + index),
        "grassfx_fused": dict(gradients=b_g * largest_grad, optimizer_state=2 * b_s * (kept + dense) + index),
        "grassfx_factored": dict(gradients=b_g * (kept + dense), optimizer_state=adam_rows + factored_full),
        "grassfx_factored_nomomentum": dict(gradients=b_g * (kept + dense),
                                            optimizer_state=adam_rows + factors + 2 * b_s * vectors),
        "grassfx_muon": dict(gradients=b_g * (kept + dense), optimizer_state=muon_rows + 2 * b_s * dense),
        "grassfx_muon_factored": dict(gradients=b_g * (kept + dense), optimizer_state=muon_rows + factored_full),
        "grassfx_muon_factored_nomomentum": dict(gradients=b_g * (kept + dense),
                                                 optimizer_state=muon_rows + factors + 2 * b_s * vectors),
        "grassfx_muon_split": dict(gradients=b_g * (kept + dense),
                                   optimizer_state=muon_rows + b_s * head_params + factors + 2 * b_s * vectors),
    }
    for method, parts in out.items():
        # grassfx's gradient handles: one zero (r x n) parameter per projected weight, in its dtype
        parts["weights"] = weights + (b_w * kept if method.startswith("grassfx") else 0)
        parts["activations"] = acts
        parts["total"] = parts["weights"] + parts["gradients"] + parts["optimizer_state"] + acts
    return out


def evaluate(model: dict, **values) -> dict:
    """Substitute numbers for the symbols: ``{method: {component: int bytes}}``."""
    subs = {SYMBOLS[k]: v for k, v in values.items()}
    return {m: {c: int(sp.Integer(sp.ceiling(expr.subs(subs)))) for c, expr in parts.items()}
            for m, parts in model.items()}


def table(names=("1B", "7B", "13B"), rank_of=None, b=2, tokens=256, seq=256, budget_gib=40.0) -> str:
    """A markdown table (GiB) per model and method, and whether it fits ``budget_gib``."""
    rank_of = rank_of or {"1B": 512, "7B": 1024, "13B": 1024}
    lines = [f"pure bf16 (b_w = b_g = b_s = b_a = {b}), T = {tokens} tokens per step, S = {seq}, "
             f"no activation checkpointing; fits = total <= {budget_gib:.0f} GiB", "",
             "| model | params | rank | method | weights | gradients | optimizer state | activations | total | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        shape = LlamaShape.preset(name)
        rank = rank_of[name]
        nums = evaluate(memory(shape), r=rank, b_w=b, b_g=b, b_s=b, b_a=b, T=tokens, S=seq)
        for method in METHODS:
            gib = {c: v / 2**30 for c, v in nums[method].items()}
            fits = "yes" if gib["total"] <= budget_gib else "no"
            lines.append(f"| LLaMA-{name} | {shape.params() / 1e9:.2f}B | {rank} | {method} | {gib['weights']:.1f} | "
                         f"{gib['gradients']:.1f} | {gib['optimizer_state']:.1f} | {gib['activations']:.1f} | "
                         f"{gib['total']:.1f} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the memory tables (``python -m grassfx.cost``)."""
    p = argparse.ArgumentParser(description="grassfx memory model for LLaMA 1B/7B/13B")
    p.add_argument("--tokens", type=int, default=256, help="tokens per step (batch x sequence)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--bytes", type=int, default=2, help="bytes per element (2: bf16)")
    p.add_argument("--budget", type=float, default=40.0, help="GPU memory in GiB")
    args = p.parse_args(argv)
    print(table(b=args.bytes, tokens=args.tokens, seq=args.seq, budget_gib=args.budget))
    shape = LlamaShape.preset("13B")
    per_method = evaluate(memory(shape), r=1024, b_w=2, b_g=2, b_s=2, b_a=2, T=args.tokens, S=args.seq)
    print()
    for method in METHODS:
        total = per_method[method]["total"] / 2**30
        verdict = "fits" if total <= args.budget else "does not fit"
        print(f"LLaMA-13B, pure bf16, {method}: {total:.1f} GiB -> {verdict} in {args.budget:.0f} GiB")
    print("\nsymbolic totals (bytes), LLaMA-13B:")
    for method, parts in memory(shape).items():
        print(f"  {method}: {sp.simplify(parts['total'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
