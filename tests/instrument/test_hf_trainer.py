"""The Hugging Face Trainer with default TrainingArguments trains a grassfx model and resumes it."""

from __future__ import annotations

import inspect

import pytest
import torch

import grassfx

from conftest import make_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Rows(torch.utils.data.Dataset):
    """Token rows with a column the model does not take (Trainer must drop only that one)."""

    def __init__(self, n=8, length=12):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 96, (length,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i], "text": f"row {i}"}


def _trainer(tmp_path, max_steps):
    model = grassfx.compile(make_llama().train(), rank=4, update_freq=2, backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, save_steps=3,
        report_to=[], use_cpu=True, seed=0,
    )
    def collate(rows):
        return ({k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels") if k in rows[0]}
                | {k: [r[k] for r in rows] for k in rows[0] if k == "text"})

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=collate,
                                optimizers=(opt, sched)), model


def test_wrapper_exposes_the_wrapped_signature():
    model = grassfx.compile(make_llama(), rank=4, backend="eager")
    assert "input_ids" in inspect.signature(model.forward).parameters
    assert "labels" in inspect.signature(model.forward).parameters


@pytest.mark.slow
def test_trainer_with_default_arguments_trains_and_resumes_exactly(tmp_path):
    trainer, model = _trainer(tmp_path / "a", max_steps=6)
    trainer.train()
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.step == 6
    resumed_trainer, resumed = _trainer(tmp_path / "a", max_steps=6)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.step == 6
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, straight[name]), name
