"""grassfx in a plain training loop: a small MLP regression, trained with Grass.

    python examples/quickstart.py          # compiled (Inductor), 200 steps
    python examples/quickstart.py --tiny   # eager, a few steps (seconds); or GRASSFX_EXAMPLE_TINY=1
"""

import argparse
import os

import torch
from torch import nn

import grassfx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("GRASSFX_EXAMPLE_TINY") == "1")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    steps, backend = (8, "eager") if args.tiny else (args.steps, "inductor")

    torch.manual_seed(0)
    teacher = nn.Linear(64, 8)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8))

    # Each 2-D weight gets a (16 x n) gradient: 16 of its rows train, chosen every 50 steps.
    model = grassfx.compile(model, rank=16, update_freq=50, backend=backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    for step in range(steps):
        x = torch.randn(128, 64)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // 8) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    trained = grassfx.unwrap(model)  # the original nn.Sequential, with the trained weights
    print("trained:", type(trained).__name__, sum(p.numel() for p in trained.parameters()), "parameters")


if __name__ == "__main__":
    main()
