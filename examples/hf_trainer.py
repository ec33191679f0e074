"""A Hugging Face ``Trainer`` training a small LLaMA (built from a config) with Grass.

    python examples/hf_trainer.py          # compiled (TrainingArguments(torch_compile=True)), 60 steps
    python examples/hf_trainer.py --tiny   # eager, a few steps (seconds); or GRASSFX_EXAMPLE_TINY=1

The data is random token rows with a repeating pattern (so the loss falls); swap in your
own ``datasets.Dataset`` of ``input_ids``/``labels``.
"""

import argparse
import os
import tempfile

import torch
import transformers

import grassfx


class PatternRows(torch.utils.data.Dataset):
    """Rows of ``length`` tokens: a random prefix of 4 tokens repeated."""

    def __init__(self, n: int, length: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, vocab, (4,), generator=g).repeat(length // 4) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("GRASSFX_EXAMPLE_TINY") == "1")
    parser.add_argument("--out", default=None, help="the Trainer's output_dir (default: a temporary folder)")
    args = parser.parse_args()
    steps = 6 if args.tiny else 60
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model = grassfx.compile(model, rank=8, update_freq=20, backend="eager" if args.tiny else "inductor")

    # The Trainer's default optimizer would step grassfx's gradient handles as ordinary
    # parameters (grassfx refuses it at its first step): pass a grassfx optimizer.
    opt = grassfx.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=steps // 10, num_training_steps=steps)

    with tempfile.TemporaryDirectory() as tmp:
        training_args = transformers.TrainingArguments(
            output_dir=args.out or tmp, max_steps=steps, per_device_train_batch_size=8, logging_steps=max(1, steps // 6),
            save_strategy="no", report_to=[], use_cpu=True, seed=0, torch_compile=not args.tiny,
        )
        trainer = transformers.Trainer(model=model, args=training_args,
                                       train_dataset=PatternRows(256, 32, config.vocab_size), optimizers=(opt, sched))
        result = trainer.train()
    print(f"trained {result.global_step} steps, final training loss {result.training_loss:.4f}")
    # grassfx.unwrap(model).save_pretrained(...) saves the plain LlamaForCausalLM.


if __name__ == "__main__":
    main()
