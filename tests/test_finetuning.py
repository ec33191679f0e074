"""``grassfx.finetune`` (the measured fine-tuning setting) and ``benchmarks/finetune.py``'s smoke path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import grassfx
from grassfx.finetuning import FINETUNE

ROOT = Path(__file__).resolve().parents[1]


class Classifier(nn.Module):
    """An embedding, two hidden matrices and a 2-label head (smaller than any rank used)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.pos = nn.Embedding(8, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 2)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.down(torch.relu(self.up(h))).mean(1))


def test_finetune_gives_the_documented_setting():
    base = Classifier()
    model, opt = grassfx.finetune(base, lr=1e-3, backend="eager")
    assert model.grass_config.rank == FINETUNE["rank"] == 16 and model.grass_config.update_freq == FINETUNE["update_freq"]
    assert sorted(s.name for s in model.sites) == ["down.weight", "up.weight"]  # the 2 x 32 head is dense
    assert isinstance(opt, grassfx.optim.AdamW)
    emb, rest = opt.param_groups
    assert emb["full_state"] == "factored_nomomentum" and {id(p) for p in emb["params"]} == {
        id(base.embed.weight), id(base.pos.weight)}
    assert rest["full_state"] == "adam" and all(g["lr"] == 1e-3 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    ids = torch.randint(0, 50, (4, 8))
    nn.functional.cross_entropy(model(ids), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    assert set(opt.state[base.embed.weight]) == {"step", "row_var", "col_var"}  # no moment of the table's size


def test_finetune_options():
    base = Classifier()
    model, opt = grassfx.finetune(base, lr=2e-3, rank=4, embeddings="frozen", backend="eager",
                                  exclude=["down*"], update_freq=7)
    assert [s.name for s in model.sites] == ["up.weight"] and model.grass_config.update_freq == 7
    assert not base.embed.weight.requires_grad
    assert all(p is not base.embed.weight for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr=0.0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"lr": "1e-3"}, "lr='1e-3'"),
    ({"lr": 1e-3, "embeddings": "sparse"}, "embeddings='sparse'"),
    ({"lr": 1e-3, "optimizer": "muon"}, "not keywords of grassfx.compile"),
    ({"lr": 1e-3, "rank": 0}, "rank=0"),
])
def test_finetune_refuses_bad_input(kwargs, match):
    with pytest.raises(grassfx.ConfigError, match=match):
        grassfx.finetune(Classifier(), backend="eager", **kwargs)


def test_finetune_refuses_a_non_module():
    with pytest.raises(grassfx.ConfigError, match="torch.nn.Module"):
        grassfx.finetune(lambda x: x, lr=1e-3)


def _benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    from grassfx.recipes.data import cache_dir

    if not ((cache_dir() / finetune.MODEL_WHEEL).is_file() and (cache_dir() / finetune.DATA_WHEEL).is_file()):
        pytest.skip(f"the wheels {finetune.MODEL_WHEEL} and {finetune.DATA_WHEEL} are not in {cache_dir()}")
    return finetune


def test_finetune_benchmark_smoke(tmp_path):
    """Full AdamW, both LoRA arms and the grassfx setting, two seeds, two steps, paired statistics."""
    finetune = _benchmark()
    out = tmp_path / "ft.json"
    methods = ["adamw", "lora8", "lora16", "grass_ft"]
    assert finetune.main(["--subset", "48", "--test-size", "16", "--steps", "2", "--batch-size", "4", "--max-len",
                          "16", "--threads", "1", "--seeds", "0", "1", "--methods", *methods, "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["test"][0]
    runs = {(r["method"], r["seed"]): r for r in entry["runs"]}
    assert set(runs) == {(m, s) for m in methods for s in (0, 1)}
    lora8, lora16 = runs["lora8", 0], runs["lora16", 0]
    assert lora8["trainable_params"] == 338_690 and lora16["trainable_params"] == 676_610
    # two fp32 moments per entry, and a step count per tensor
    assert 0 <= lora8["opt_state_bytes"] - 8 * lora8["trainable_params"] < 4096
    assert runs["grass_ft", 0]["opt_state_bytes"] <= lora8["opt_state_bytes"]
    summary = {e["method"]: e for e in entry["summary"]}
    assert summary["grass_ft"]["paired"]["adamw"]["seeds"] == [0, 1]
    assert set(summary["adamw"]["paired"]) == {"lora8"} and set(summary["lora8"]["paired"]) == {"adamw"}


def test_finetune_benchmark_grass_variants(tmp_path):
    """The grass arm's search options: Muon rows and a frozen word embedding, in the validation mode."""
    finetune = _benchmark()
    runs = []
    for k, extra in enumerate((["--grass-optimizer", "muon", "--embeddings", "factored_nomomentum"],
                               ["--embeddings", "frozen"])):
        out = tmp_path / f"ft{k}.json"
        assert finetune.main(["--subset", "48", "--test-size", "12", "--val-size", "12", "--lr-check", "1e-3",
                              "--steps", "2", "--batch-size", "4", "--max-len", "16", "--threads", "1", "--rank", "4",
                              "--methods", "grass", "--out", str(out), *extra]) == 0
        runs += json.loads(out.read_text())["lr_check"][0]["runs"]
    assert [r["grass_optimizer"] for r in runs] == ["muon", "adamw"]
    assert runs[1]["trainable_params"] < runs[0]["trainable_params"]  # the 30k x 384 table is out


def test_a_refused_compile_setting_leaves_the_embedding_trainable():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(50, 32), torch.nn.Linear(32, 32)

        def get_input_embeddings(self):
            return self.emb

    model = Tiny()
    with pytest.raises(grassfx.ConfigError):
        grassfx.finetune(model, lr=1e-3, embeddings="frozen", update_freq=0, backend="eager")
    assert model.emb.weight.requires_grad
