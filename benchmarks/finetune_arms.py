"""The methods ``benchmarks/finetune.py`` compares: each builds (model, optimizer) from one base.

* ``adamw``  -- ``torch.optim.AdamW`` on every parameter (full finetuning).
* ``galore`` -- ``galore_torch.GaLoreAdamW``: the projected weights in a group with
  ``rank``, ``update_proj_gap = update_freq``, ``scale`` and ``proj_type="std"``.
* ``grass``  -- ``grassfx.compile(model, rank, update_freq, scale, selection, backend="eager",
  exclude=["*classifier*"])`` with ``grassfx.optim.AdamW`` (``--grass-optimizer muon``:
  ``grassfx.optim.Muon``). ``--embeddings`` chooses what the three embedding matrices
  (word, position, token type) keep: ``adam`` (both moments, the default),
  ``factored`` / ``factored_nomomentum`` (``full_state`` of their parameter group,
  :mod:`grassfx.optim.factored`) or ``frozen`` (the word embedding does not train; position
  and token-type embeddings keep ``adam``).
* ``grass_ft`` -- ``grassfx.finetune(model, lr=lr, seed=seed, backend="eager")``: the
  documented fine-tuning setting (:mod:`grassfx.finetuning`), nothing else given.
* ``lora8`` / ``lora16`` -- ``peft`` LoRA, ``LoraConfig(task_type=SEQ_CLS, r=8 or 16,
  lora_alpha=8, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])``:
  adapters on every attention and FFN matrix and the pooler; ``task_type=SEQ_CLS`` trains
  the new classifier in full (``modules_to_save``). ``lora_alpha=8`` and ``lora_dropout=0``
  are peft's own defaults, and alpha 8 at r 8 is the LoRA paper's RoBERTa-base GLUE
  setting (Hu et al., 2021, table 9), which keeps alpha at the first rank tried rather
  than tuning it (section 4.1): the learning rate is tuned instead. Biases and LayerNorms
  stay frozen (``bias="none"``). The adapters' random init (``lora_A``) is seeded with the
  run's seed. ``torch.optim.AdamW`` over the trainable parameters.

The projected weights of ``galore`` and ``grass``: every ``nn.Linear`` weight except the
classifier's (36 encoder matrices and the 384 x 384 pooler); ``build`` checks grassfx's
sites are that set.
"""

from __future__ import annotations

import copy

import torch

METHODS = ("adamw", "galore", "grass", "grass_ft", "lora8", "lora16")
LORA_RANKS = {"lora8": 8, "lora16": 16}
LORA_ALPHA = 8
LORA_DROPOUT = 0.0
LORA_TARGETS = ["query", "key", "value", "dense"]
EMBEDDINGS = ("adam", "factored", "factored_nomomentum", "frozen")
BETAS, EPS = (0.9, 0.999), 1e-8


def projected_names(model) -> list[str]:
    """The weights GaLore and grassfx project: every nn.Linear weight but the classifier's."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not mod_name.startswith("classifier"):
            names.append(f"{mod_name}.weight")
    return names


def embedding_params(model) -> list:
    """The weights of every ``nn.Embedding`` of ``model`` (word, position, token type)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]


def word_embedding(model):
    return model.get_input_embeddings().weight


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def _grass(model, lr, args, seed):
    import grassfx

    proj = set(projected_names(model))
    if args.embeddings == "frozen":
        word_embedding(model).requires_grad_(False)
    model = grassfx.compile(model, rank=args.rank, update_freq=args.update_freq, scale=args.scale,
                            selection=args.selection, backend="eager", exclude=["*classifier*"], seed=seed)
    sites = {s.name for s in model.sites}
    if sites != proj:
        raise RuntimeError(f"grassfx projects {sorted(sites ^ proj)} differently from GaLore's group")
    params = [p for p in model.parameters() if p.requires_grad]
    if args.embeddings in ("factored", "factored_nomomentum"):
        emb = {id(p) for p in embedding_params(model)}
        groups = [{"params": [p for p in params if id(p) in emb], "full_state": args.embeddings},
                  {"params": [p for p in params if id(p) not in emb]}]
    else:
        groups = params
    if args.grass_optimizer == "muon":
        opt = grassfx.optim.Muon(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    else:
        opt = grassfx.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    return model, opt, {id(s.handle) for s in model.sites}


def _lora(model, rank, lr, seed):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                        target_modules=LORA_TARGETS, bias="none")
    torch.manual_seed(seed + 3)  # lora_A's init
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, _adamw(params, lr), set()


def build(method: str, base, lr: float, args, seed: int):
    """(model, optimizer, ids of projected parameters) for ``method``, from a copy of ``base``."""
    model = copy.deepcopy(base)
    proj = set(projected_names(model))
    if method == "adamw":
        return model, _adamw(model.parameters(), lr), {id(p) for n, p in model.named_parameters() if n in proj}
    if method == "galore":
        from galore_torch import GaLoreAdamW

        low = [p for n, p in model.named_parameters() if n in proj]
        rest = [p for n, p in model.named_parameters() if n not in proj]
        groups = [
            {"params": low, "rank": args.rank, "update_proj_gap": args.update_freq,
             "scale": args.scale, "proj_type": "std"},
            {"params": rest},
        ]
        opt = GaLoreAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, no_deprecation_warning=True)
        return model, opt, {id(p) for p in low}
    if method == "grass":
        return _grass(model, lr, args, seed)
    if method == "grass_ft":
        import grassfx

        model, opt = grassfx.finetune(model, lr=lr, seed=seed, backend="eager")
        return model, opt, {id(s.handle) for s in model.sites}
    if method in LORA_RANKS:
        return _lora(model, LORA_RANKS[method], lr, seed)
    raise ValueError(method)


def trainable(model, opt) -> int:
    """Parameters the optimizer trains (a grassfx handle counts its r x n entries)."""
    return sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)


def state_bytes(opt, proj_ids: set) -> tuple[int, int]:
    """(all optimizer-state bytes, the part kept for projected weights)."""
    from grassfx.recipes.measure import tensor_nbytes

    seen: set = set()
    total = projected = 0
    for p, st in opt.state.items():
        b = tensor_nbytes(st, seen)
        total += b
        if id(p) in proj_ids:
            projected += b
    return total, projected
