"""grassfx.optim.AdamW below full rank against a short, independent subspace AdamW."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import grassfx


def reference_subspace_adamw(w, xs, ys, r, freq, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Grass + AdamW on one weight, written out: top-r rows by gradient norm every ``freq`` steps.

    Adam moments live on the r selected rows and restart at a refresh. Decoupled decay hits
    the selected rows every step; the other rows owe it and pay at the next refresh, after
    that step's gradient (so a refresh's norms see them still owing it), and at the end.
    """
    w = w.clone().double()
    b1, b2 = betas
    owed, idx = torch.ones(w.shape[0], dtype=w.dtype), None
    for step, (x, y) in enumerate(zip(xs, ys)):
        wv = w.clone().requires_grad_(True)
        ((x.double() @ wv.T - y.double()) ** 2).mean().backward()
        g = wv.grad  # (m, n) dense gradient
        if step % freq == 0:  # refresh: r largest row norms, fresh moments, debts paid
            w *= owed[:, None]
            owed = torch.ones_like(owed)
            idx = g.pow(2).sum(1).topk(r).indices.sort().values
            m, v, t = torch.zeros(r, w.shape[1], dtype=w.dtype), torch.zeros(r, w.shape[1], dtype=w.dtype), 0
        c = g[idx]  # (r, n) compressed gradient (rho = 1 for top_r)
        t += 1
        m = b1 * m + (1 - b1) * c
        v = b2 * v + (1 - b2) * c * c
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        owed *= 1 - lr * wd
        owed[idx] = 1.0
        w[idx] = w[idx] * (1 - lr * wd) - lr * update
    return w * owed[:, None]


@settings(max_examples=30)
@given(
    m=st.integers(4, 12), n=st.integers(2, 8), r_frac=st.floats(0.1, 0.9), freq=st.integers(1, 4),
    steps=st.integers(1, 7), wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16),
)
def test_adamw_below_full_rank_matches_reference(m, n, r_frac, freq, steps, wd, seed):
    r = max(1, min(m - 1, int(r_frac * m)))
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(5, n, generator=g) for _ in range(steps)]
    ys = [torch.randn(5, m, generator=g) for _ in range(steps)]
    lin = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g))
    start = lin.weight.detach().clone()
    model = grassfx.compile(lin, rank=r, update_freq=freq, proj_dim="rows", backend="eager")
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    got = grassfx.unwrap(model).weight.detach().double()
    want = reference_subspace_adamw(start, xs, ys, r, freq, lr=1e-2, wd=wd)
    # float32 training against a float64 reference; a wrong decay or step count is >= 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
