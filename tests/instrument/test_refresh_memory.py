"""A refresh step holds at most one dense weight gradient at a time.

Memory is counted allocation by allocation (``grassfx.debug.memory.track_memory``: every
allocation and free of the CPU allocator, replayed in order), so the peaks below do not
depend on timing. A refresh step may exceed a normal step's peak by the largest single
dense gradient plus a few small vectors; a step that keeps every dense gradient alive
(plain training, checked on the same model) exceeds that bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grassfx
from grassfx.debug.memory import track_memory
from grassfx.instrument.anchors import squared_norms

SIZES = (64, 256, 128, 512, 96)  # four projected weights of different sizes
UPDATE_FREQ = 3


def _net(seed=0):
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers)


def _dense_grad_bytes(net):
    return [p.numel() * p.element_size() for name, p in net.named_parameters() if name.endswith("weight")]


def _slack(model) -> int:
    """What a refresh holds besides one dense gradient: per weight its row norms (float32,
    one a row), the new idx/rho and the float64 record of them (8 + 4 + 16 bytes a selected
    row); 4 KiB for the 0-d tensors and the noise of the selector."""
    return 4096 + sum(4 * s.rows + 28 * s.rank for s in model.sites)


def _step_peaks(model, opt, x, steps):
    peaks = []
    for _ in range(steps):
        with track_memory() as mem:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        peaks.append(mem.peak)
    return peaks


@pytest.mark.parametrize("backend, refresh", [("aot_eager", "eager"), ("inductor", "compiled")])
def test_refresh_peak_is_steady_peak_plus_one_dense_gradient(backend, refresh):
    """Refresh steps run eagerly by default; a compiled refresh graph relies on Inductor
    freeing each dense gradient after its last use (aot_eager's refresh graph runs the
    norms after every weight-gradient GEMM, docs/architecture.md)."""
    net = _net()
    dense = _dense_grad_bytes(net)
    model = grassfx.compile(net, rank=8, update_freq=UPDATE_FREQ, backend=backend, refresh=refresh)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3, compiled=False)
    x = torch.randn(32, SIZES[0])
    _step_peaks(model, opt, x, UPDATE_FREQ)  # compiles both graphs, creates the optimizer state
    peaks = _step_peaks(model, opt, x, UPDATE_FREQ)  # a refresh step, then two normal steps
    refresh_peak, steady_peak = peaks[0], max(peaks[1:])
    bound = steady_peak + max(dense) + _slack(model)
    assert refresh_peak <= bound, (refresh_peak, steady_peak, dense)
    assert refresh_peak > steady_peak  # the refresh does form dense gradients
    # the bound tells one dense gradient from all of them
    assert steady_peak + sum(dense) > bound + max(dense)


def test_plain_training_with_every_dense_gradient_alive_exceeds_the_bound():
    """The same model trained densely keeps every weight gradient until the update: the
    refresh bound above would catch a refresh that did the same."""
    net = _net()
    dense = _dense_grad_bytes(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(32, SIZES[0])
    model = grassfx.compile(_net(), rank=8, update_freq=UPDATE_FREQ, backend="aot_eager")
    gopt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
    _step_peaks(model, gopt, x, UPDATE_FREQ + 1)
    steady_peak = max(_step_peaks(model, gopt, x, UPDATE_FREQ - 1))
    dense_peak = max(_step_peaks(net, opt, x, 2))
    assert dense_peak > steady_peak + max(dense) + _slack(model)
    assert dense_peak >= sum(dense)


def test_eager_normal_steps_hold_one_dense_gradient_at_a_time():
    """backend="eager" forms each dense gradient (then selects rows from it): one at a time."""
    x = torch.randn(32, SIZES[0])
    compiled = grassfx.compile(_net(), rank=8, update_freq=100, backend="aot_eager")
    eager = grassfx.compile(_net(), rank=8, update_freq=100, backend="eager")
    peaks = {}
    for name, model in (("compiled", compiled), ("eager", eager)):
        opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)
        _step_peaks(model, opt, x, 2)
        peaks[name] = max(_step_peaks(model, opt, x, 2))
    dense = _dense_grad_bytes(_net())
    assert peaks["eager"] <= peaks["compiled"] + max(dense) + _slack(eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 1])
def test_squared_norms_make_no_gradient_sized_temporary(dtype, dim):
    torch.manual_seed(0)
    grad = torch.randn(512, 256).to(dtype)
    with track_memory() as mem:
        norms = squared_norms(grad, 1 - dim, dim)
    g32 = grad.float()
    expect = (g32 * g32).sum(dim=1 - dim)
    torch.testing.assert_close(norms, expect, rtol=1e-5, atol=0)
    nbytes = grad.numel() * grad.element_size()
    assert mem.peak <= nbytes // 4 + 4 * grad.shape[dim] + 4096  # 1/8 of a bf16 gradient in float32


def test_expert_stack_norms_match():
    torch.manual_seed(0)
    grad = torch.randn(4, 64, 32).to(torch.bfloat16)
    g32 = grad.float()
    torch.testing.assert_close(squared_norms(grad, 2, 1), (g32 * g32).sum(dim=2), rtol=1e-5, atol=0)
