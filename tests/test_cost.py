"""The memory model (grassfx.cost) against bytes measured on a small Llama."""

from __future__ import annotations

import pytest
import torch

import grassfx
from grassfx.cost import LlamaShape, evaluate, memory


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      attn_implementation="sdpa", attention_dropout=0.0)
    return LlamaForCausalLM(cfg).eval(), cfg


def _batch():
    ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(0))  # T = 30, S = 10
    return {"input_ids": ids, "labels": ids}


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return sum(seen.values()), loss


def _grad_bytes(params) -> int:
    return sum(p.grad.nbytes for p in params if p.grad is not None)


def _moment_bytes(opt) -> int:
    return sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))


@pytest.fixture
def model_and_numbers():
    model, cfg = _llama()
    shape = LlamaShape.from_config(cfg)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    nums = evaluate(memory(shape), r=8, b_w=4, b_g=4, b_s=4, b_a=4, T=30, S=10)
    return model, nums


def test_activation_bytes_match_exactly(model_and_numbers):
    model, nums = model_and_numbers
    measured, _ = _saved_bytes(model, _batch())
    assert measured == nums["adamw"]["activations"]


def test_dense_adamw_gradients_and_state_match_exactly(model_and_numbers):
    model, nums = model_and_numbers
    opt = torch.optim.AdamW(model.parameters())
    model(**_batch()).loss.backward()
    assert _grad_bytes(model.parameters()) == nums["adamw"]["gradients"]
    opt.step()
    assert _moment_bytes(opt) == nums["adamw"]["optimizer_state"]
    assert sum(p.nbytes for p in model.parameters()) == nums["adamw"]["weights"]


def test_grassfx_gradients_and_state_match_exactly(model_and_numbers):
    model, nums = model_and_numbers
    gm = grassfx.compile(model, rank=8, backend="eager")
    opt = grassfx.optim.AdamW(gm.parameters())
    gm(**_batch()).loss.backward()
    assert _grad_bytes(gm.parameters()) == nums["grassfx"]["gradients"]
    opt.step()
    index = sum(s.idx.nbytes + s.rho.nbytes + s.last_seen.nbytes + opt.state[s.handle]["row_step"].nbytes
                for s in gm.sites)
    assert _moment_bytes(opt) + index == nums["grassfx"]["optimizer_state"]
    assert sum(p.nbytes for p in gm.parameters()) == nums["grassfx"]["weights"]  # with the handles
    assert nums["grassfx"]["optimizer_state"] < nums["galore"]["optimizer_state"] < nums["adamw"]["optimizer_state"]


@pytest.mark.parametrize("method, opt_cls, full_state", [
    ("grassfx_factored", grassfx.optim.AdamW, "factored"),
    ("grassfx_factored_nomomentum", grassfx.optim.AdamW, "factored_nomomentum"),
    ("grassfx_muon", grassfx.optim.Muon, "adam"),
    ("grassfx_muon_factored", grassfx.optim.Muon, "factored"),
    ("grassfx_muon_factored_nomomentum", grassfx.optim.Muon, "factored_nomomentum"),
    ("grassfx_muon_split", grassfx.optim.Muon, "split")])
def test_grassfx_factored_state_matches_exactly(model_and_numbers, method, opt_cls, full_state):
    model, nums = model_and_numbers
    gm = grassfx.compile(model, rank=8, backend="eager")
    params = gm.parameters()
    if full_state == "split":  # the input embedding without the first moment, the head with it
        params = grassfx.optim.embedding_groups(params, model.get_input_embeddings().weight, "factored_nomomentum")
        full_state = "factored"
    opt = opt_cls(params, full_state=full_state)
    gm(**_batch()).loss.backward()
    opt.step()
    index = sum(s.idx.nbytes + s.rho.nbytes + s.last_seen.nbytes + opt.state[s.handle]["row_step"].nbytes
                for s in gm.sites)
    kept = ("row_var", "col_var", "momentum_buffer")
    others = sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k in kept)
    assert others > 0
    assert _moment_bytes(opt) + others + index == nums[method]["optimizer_state"]
    assert nums[method]["optimizer_state"] < nums["grassfx"]["optimizer_state"]


def test_galore_state_matches_exactly(model_and_numbers):
    galore = pytest.importorskip("galore_torch")
    model, nums = model_and_numbers
    lowrank = [p for n, p in model.named_parameters() if p.dim() == 2 and "_proj" in n]
    other = [p for p in model.parameters() if all(p is not q for q in lowrank)]
    opt = galore.GaLoreAdamW([{"params": other}, {"params": lowrank, "rank": 8, "update_proj_gap": 50,
                                                  "scale": 1.0, "proj_type": "std"}], lr=1e-3,
                             no_deprecation_warning=True)
    model(**_batch()).loss.backward()
    opt.step()
    projectors = sum(st["projector"].ortho_matrix.nbytes for st in opt.state.values() if "projector" in st)
    assert _moment_bytes(opt) + projectors == nums["galore"]["optimizer_state"]


def test_thirteen_b_fits_40gb_only_with_grassfx():
    nums = evaluate(memory(LlamaShape.preset("13B")), r=1024, b_w=2, b_g=2, b_s=2, b_a=2, T=256, S=256)
    totals = {m: v["total"] / 2**30 for m, v in nums.items()}
    assert totals["grassfx"] < 40 < totals["galore"] < totals["adamw"]
