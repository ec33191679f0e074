"""Fused weights (q|k|v, gate|up): rows are selected per block, each block gets its quota."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import grassfx
from grassfx.instrument.blocks import BlockLayout
from grassfx.select import select_rows, split_rank


def _blocks_of(sizes, r, explore=0):
    quotas = split_rank(r, sizes)
    extras = [min(e, q - 1) for e, q in zip(split_rank(explore, quotas), quotas)] if explore else [0] * len(sizes)
    return tuple(zip(sizes, quotas, extras))


def _interleaved_labels(sizes, heads):
    """Block ids of ``heads`` periods of ``[block 0: sizes[0]/heads rows, block 1: ..., ...]``."""
    period = [(b, s // heads) for b, s in enumerate(sizes)]
    return BlockLayout(tuple(f"b{i}" for i in range(len(sizes))), tuple(period), heads).labels()


def _noise(method, m, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if method == "multinorm":
        return torch.rand(r, generator=gen, dtype=torch.float64)
    if method == "multinorm_nr":
        return -torch.log(-torch.log(torch.rand(m, generator=gen, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)))
    return torch.zeros(0)


# ----------------------------------------------------------------------------- selection


@given(sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4), heads=st.sampled_from([1, 2]),
       frac=st.floats(0.05, 1.0), method=st.sampled_from(["top_r", "multinorm", "multinorm_nr"]),
       explore=st.sampled_from([0, 1, 2]), seed=st.integers(0, 50))
def test_each_block_gets_exactly_its_quota(sizes, heads, frac, method, explore, seed):
    sizes = [s * heads for s in sizes]
    m = sum(sizes)
    r = max(len(sizes), min(m, round(frac * m)))
    explore = 0 if method == "multinorm" else min(explore, r - len(sizes))
    blocks = _blocks_of(sizes, r, explore)
    labels = _interleaved_labels(sizes, heads)
    torch.manual_seed(seed)
    sq = torch.rand(m) * torch.tensor([100.0 if b == len(sizes) - 1 else 1.0 for b in labels.tolist()])
    age = torch.randint(0, 5, (m,)).double()
    idx, rho = select_rows(sq, _noise(method, m, r, seed), r, method, age, sum(e for *_, e in blocks), labels, blocks)
    assert idx.shape == (r,) and rho.shape == (r,)
    assert torch.equal(idx, idx.sort().values)
    got = torch.bincount(labels[idx], minlength=len(sizes)).tolist()
    assert got == [q for _, q, _ in blocks]
    if method != "multinorm":
        assert len(set(idx.tolist())) == r  # without replacement: distinct rows


def test_top_r_takes_the_largest_rows_of_each_block():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    sq = torch.tensor([5.0, 1, 7, 2, 6, 3, 0.5, 0.2, 0.9, 50, 60, 40])  # block 2 (v) is loudest
    idx, _ = select_rows(sq, torch.zeros(0), 4, "top_r", labels=labels, blocks=((6, 2, 0), (3, 1, 0), (3, 1, 0)))
    assert idx.tolist() == [2, 4, 8, 10]
    whole, _ = select_rows(sq, torch.zeros(0), 4, "top_r")  # without blocks: v takes 3 of 4 rows
    assert torch.bincount(labels[whole], minlength=3).tolist() == [1, 0, 3]


def test_explore_rows_stay_inside_their_block():
    labels = torch.tensor([0] * 4 + [1] * 4)
    sq = torch.tensor([9.0, 8, 1, 1, 9, 8, 1, 1])
    age = torch.tensor([0.0, 0, 3, 7, 0, 0, 9, 2])
    blocks = ((4, 2, 1), (4, 2, 1))
    idx, _ = select_rows(sq, torch.zeros(0), 4, "top_r", age, 2, labels, blocks)
    assert idx.tolist() == [0, 3, 4, 6]  # best of each block + its oldest other row


def test_stratified_multinorm_is_unbiased_within_each_block():
    """E[sum_j rho_j^2 1{idx_j = i}] = 1 for every row: quota * q_i * 1 / (quota q_i)."""
    labels = torch.tensor([0] * 3 + [1] * 5)
    sq = torch.tensor([1.0, 4, 9, 0.25, 1, 4, 16, 0.01])
    blocks = ((3, 2, 0), (5, 2, 0))
    gen = torch.Generator().manual_seed(0)
    total, draws = torch.zeros(8, dtype=torch.float64), 4000
    for _ in range(draws):
        idx, rho = select_rows(sq, torch.rand(4, generator=gen, dtype=torch.float64), 4, "multinorm",
                               labels=labels, blocks=blocks)
        total.index_add_(0, idx, rho.double() ** 2)
    assert torch.allclose(total / draws, torch.ones(8, dtype=torch.float64), atol=0.08)


def test_stratified_uniform_draws_quota_rows_per_block():
    from grassfx.select import draw_uniform

    labels = _interleaved_labels([6, 3, 3], 3)
    blocks = _blocks_of([6, 3, 3], 4)
    idx, rho = draw_uniform(12, 4, torch.Generator().manual_seed(1), labels, blocks)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [2, 1, 1]
    assert sorted(rho.tolist()) == pytest.approx(sorted([3 ** 0.5] * 2 + [3 ** 0.5] * 2))


@pytest.mark.parametrize("method", ["top_r", "multinorm", "multinorm_nr"])
def test_compiled_selection_matches_eager(method):
    labels = _interleaved_labels([16, 8, 8], 4)
    blocks = _blocks_of([16, 8, 8], 8, 0 if method == "multinorm" else 2)
    explore = sum(e for *_, e in blocks)
    torch.manual_seed(3)
    sq, age = torch.rand(32) ** 4, torch.randint(0, 4, (32,)).double()
    noise = _noise(method, 32, 8, 3)

    def pick(sq, noise, age, labels):
        return select_rows(sq, noise, 8, method, age, explore, labels, blocks)

    eager = pick(sq, noise, age, labels)
    compiled = torch.compile(pick, backend="aot_eager", fullgraph=True)(sq, noise, age, labels)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_split_rank():
    assert split_rank(24, [64, 32, 32]) == [12, 6, 6]
    assert split_rank(3, [1000, 10, 10]) == [1, 1, 1]
    assert sum(split_rank(7, [5, 5, 5])) == 7


# ----------------------------------------------------------------------------- models


class _Fused(nn.Module):
    """An attention-like block with a fused ``qkv_proj`` (3 equal blocks, no config needed)."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.register_buffer("loud", torch.tensor([1.0] * (2 * d) + [100.0] * d))  # v's gradient dominates

    def forward(self, x):
        q, k, v = (self.qkv_proj(x) * self.loud).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2) / 100, -1) @ v)


def _train_counts(model, batches, steps=3):
    """Rows selected per block, summed over ``steps`` refreshes (update_freq=1), per site name."""
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
    counts = {}
    for step in range(steps):
        out = model(**batches(step)) if callable(batches) else model(batches)
        loss = out.loss if hasattr(out, "loss") else out.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        for site in model.sites:
            if site.blocks is not None:
                per = torch.bincount(site.block_labels[site.idx], minlength=len(site.blocks))
                assert per.tolist() == [q for _, q, _ in site.blocks]  # exact quotas at every refresh
                counts[site.name] = counts.get(site.name, 0) + per
    return counts


def test_dominant_v_no_longer_takes_every_row():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    plain = grassfx.compile(_Fused(), rank=6, update_freq=1, proj_dim="rows", blocks=False, backend="eager")
    _train_counts(plain, x)
    assert plain.sites[0].idx.min() >= 16  # the bug: only v's rows
    split = grassfx.compile(_Fused(), rank=6, update_freq=1, proj_dim="rows", backend="eager")
    counts = _train_counts(split, x)
    assert counts["qkv_proj.weight"].tolist() == [6, 6, 6]


@pytest.mark.parametrize("method", ["top_r", "multinorm"])
def test_refresh_rows_equal_in_eager_and_compiled(method):
    def run(backend):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = grassfx.compile(_Fused(), rank=6, update_freq=1, proj_dim="rows", selection=method,
                                backend=backend, seed=3, refresh="compiled")
        rows = []
        opt = grassfx.optim.SGD(model.parameters(), lr=1e-2)
        for step in range(2):
            model(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rows.append((model.sites[0].idx.clone(), model.sites[0].rho.clone()))
        if backend != "eager":
            assert model.compile_report.frames >= 1  # update_freq=1: every step runs the compiled refresh graph
        return rows

    for (i_e, r_e), (i_c, r_c) in zip(run("eager"), run("aot_eager")):
        assert torch.equal(i_e, i_c)
        assert torch.allclose(r_e, r_c)


def _tf():
    return pytest.importorskip("transformers")


def _tokens(vocab=64):
    x = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    return lambda step: {"input_ids": x, "labels": x}


def _hf_model(arch):
    """A 2-layer Hugging Face causal LM of ``arch`` (hidden 32, 4 heads) from a config, no dropout."""
    tf = _tf()
    common = dict(vocab_size=64, num_hidden_layers=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    build = {
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                                         num_key_value_heads=2, **common)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                         bos_token_id=0, eos_token_id=0)),
        "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                                               num_attention_heads=4, **common)),
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                                                               new_decoder_architecture=True, **common)),
        "falcon-mq": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_attention_heads=4, **common)),
    }
    torch.manual_seed(0)
    model = build[arch]()
    model.loss_type = "ForCausalLM"  # no one-time warning in the loss
    return model


# (fused weight's leaf name, expected labels of its rows along the selected dim)
_EXPECTED = {
    "phi3": {"qkv_proj": [0] * 32 + [1] * 16 + [2] * 16, "gate_up_proj": [0] * 48 + [1] * 48},
    "gpt2": {"c_attn": [0] * 32 + [1] * 32 + [2] * 32},
    "neox": {"query_key_value": ([0] * 8 + [1] * 8 + [2] * 8) * 4},
    "falcon": {"query_key_value": ([0] * 16 + [1] * 8 + [2] * 8) * 2},
    "falcon-mq": {"query_key_value": [0] * 32 + [1] * 8 + [2] * 8},
}


@pytest.mark.parametrize("arch", list(_EXPECTED))
def test_hf_fused_weights_train_every_block(arch):
    model = grassfx.compile(_hf_model(arch), rank=6, update_freq=1, backend="eager")
    fused = {s.module_name.rpartition(".")[2]: s for s in model.sites if s.blocks is not None}
    assert set(fused) == set(_EXPECTED[arch])
    for leaf, labels in _EXPECTED[arch].items():
        assert fused[leaf].block_labels.tolist() == labels
    counts = _train_counts(model, _tokens())
    assert len(counts) == 2 * len(_EXPECTED[arch])  # two layers
    for name, per in counts.items():
        assert (per > 0).all(), (name, per)
    fresh = grassfx.compile(_hf_model(arch), rank=6, backend="eager")
    report = str(grassfx.explain(fresh, **_tokens()(0)))
    lines = [line for line in report.splitlines() if "rows selected per block" in line or " selected [detected" in line]
    assert len(lines) == 1 + 2 * len(_EXPECTED[arch])  # the heading, then each fused weight
    if arch == "phi3":
        assert "self_attn.qkv_proj.weight: q 32 | k 16 | v 16 rows, 3/2/1 selected" in report


def test_explain_shows_the_split_of_gpt2_c_attn():
    model = grassfx.compile(_hf_model("gpt2"), rank=6, backend="aot_eager")
    report = grassfx.explain(model, **_tokens()(0))
    attn = [w for w in report.weights if w.name.endswith("attn.c_attn.weight")]
    assert len(attn) == 2 and all(w.rewritten for w in attn)
    assert attn[0].blocks == "q 32 | k 32 | v 32 rows, 2/2/2 selected [detected: GPT-2 c_attn]"
    assert "transformer.h.0.attn.c_attn.weight: q 32 | k 32 | v 32 rows, 2/2/2 selected" in str(report)
    assert report.to_dict()["weights"][0]["blocks"] == attn[0].blocks


def test_columns_selected_need_no_blocks_and_explain_says_why():
    model = grassfx.compile(_hf_model("gpt2"), rank=6, proj_dim="rows", backend="eager")  # c_attn (32, 96): rows = inputs
    site = model.site("transformer.h.0.attn.c_attn.weight")
    assert site.blocks is None and site.block_labels is None
    assert "rows selected: each spans every block" in site.block_note


# ----------------------------------------------------------------------------- config


def test_override_sizes_and_no_blocks():
    model = grassfx.compile(_Fused(), rank=6, proj_dim="rows", backend="eager", blocks={"*qkv_proj": [12, 6, 6]})
    site = model.sites[0]
    assert site.blocks == ((12, 3, 0), (6, 2, 0), (6, 1, 0))  # (size, quota, coverage rows) per block
    assert site.block_labels.tolist() == [0] * 12 + [1] * 6 + [2] * 6
    none = grassfx.compile(_Fused(), rank=6, proj_dim="rows", backend="eager", blocks={"qkv_proj": None})
    assert none.sites[0].blocks is None and "no blocks" in none.sites[0].block_note
    off = grassfx.compile(_Fused(), rank=6, proj_dim="rows", backend="eager", blocks=False)
    assert off.sites[0].blocks is None


@pytest.mark.parametrize("blocks, match", [
    ({"*.nothing": [8, 8, 8]}, "matches no projected weight"),
    ({"qkv_proj": [8, 8, 9]}, "sums to 25"),
    ({"qkv_proj": [8, 0, 16]}, "ints >= 1"),
    ({"qkv_proj": 24}, "list of block sizes"),
    ("auto", "expected None"),
])
def test_bad_blocks_are_config_errors(blocks, match):
    with pytest.raises(grassfx.ConfigError, match=match):
        grassfx.compile(_Fused(), rank=6, proj_dim="rows", backend="eager", blocks=blocks)


def test_fused_name_whose_sizes_do_not_add_up_gets_no_blocks():
    net = _Fused()
    net.config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=16)
    model = grassfx.compile(net, rank=6, proj_dim="rows", backend="eager")
    site = model.sites[0]
    assert site.blocks is None
    assert "!= 24 rows: no blocks" in site.block_note


def test_rank_below_the_number_of_blocks_selects_over_the_whole_weight():
    model = grassfx.compile(_Fused(), rank=2, proj_dim="rows", backend="eager")
    assert model.sites[0].blocks is None and "rank 2 < 3 blocks" in model.sites[0].block_note


def test_checkpoints_round_trip_and_old_ones_load():
    torch.manual_seed(0)
    model = grassfx.compile(_Fused(), rank=6, update_freq=1, proj_dim="rows", backend="eager")
    _train_counts(model, torch.randn(2, 5, 8), steps=2)
    state = model.state_dict()
    assert not any("block_labels" in k for k in state)  # configuration, not state
    plain_keys = set(grassfx.compile(_Fused(), rank=6, proj_dim="rows", backend="eager", blocks=False).state_dict())
    assert set(state) == plain_keys  # a checkpoint from before blocks has the same keys
    fresh = grassfx.compile(_Fused(), rank=6, update_freq=1, proj_dim="rows", backend="eager")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sites[0].idx, model.sites[0].idx)
    assert fresh.sites[0].block_labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_multihead_attention_in_proj_has_three_row_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = grassfx.compile(Net(), rank=6, targets=["*in_proj_weight"], backend="eager")
    site = model.site("attn.in_proj_weight")
    assert site.dim == 0 and site.block_labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert "MultiheadAttention in_proj" in site.block_note


def test_gpt2_cross_attention_c_attn_is_k_and_v():
    from transformers.pytorch_utils import Conv1D

    from grassfx.instrument.blocks import detect_layout

    choice = detect_layout(Conv1D(64, 32), "c_attn", "weight", (32, 64), 1)
    assert choice.layout.names == ("k", "v") and choice.layout.sizes == (32, 32)
    odd = detect_layout(Conv1D(80, 32), "c_attn", "weight", (32, 80), 1)
    assert odd.layout is None and "neither 3 nor 2 x 32" in odd.note
