"""The public API as a user calls it, for ``mypy`` (``make lint``): not run, only type-checked.

A renamed or removed keyword argument of ``grassfx.compile`` or a public optimizer fails
the type check here before it fails a user.
"""

from __future__ import annotations

import torch

import grassfx


def _usage() -> None:
    net = torch.nn.Linear(8, 8)
    model = grassfx.compile(net, 4, selection="top_r", update_freq=200, scale=1.0, proj_dim="auto", targets=None,
                            exclude=None, seed=0, backend="eager", mode=None, moments="reset", explore=0.0,
                            dynamic=None, options=None, data_parallel=None, record=False, refresh="eager",
                            blocks=None)
    params = list(model.parameters())
    grassfx.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, nonfinite="raise",
                        compiled=False, rewarmup=0, rho_scaling="once", update_rounding="nearest", state_dtype=None,
                        update_in_backward=False, full_state="adam")
    grassfx.optim.Muon(params, lr=2e-3, momentum=0.95, nesterov=True, ns_steps=5, rms=0.2, betas=(0.9, 0.999),
                       eps=1e-8, weight_decay=0.0, nonfinite="raise", rewarmup=0, update_rounding="nearest",
                       state_dtype=None, update_in_backward=False, compiled=False, full_state="adam")
    grassfx.optim.SGD(params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                      nonfinite="raise", update_in_backward=False)
    grassfx.optim.Adafactor(params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                            nonfinite="raise", rho_scaling="once", update_in_backward=False)
    plain: torch.nn.Module = grassfx.unwrap(model)
    del plain
