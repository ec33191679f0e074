"""FSDP2 (``fully_shard``) with grassfx: shard first, as usual, then compile.

    torchrun --nproc-per-node 2 examples/fsdp2.py          # gloo on CPU, nccl on GPUs
    torchrun --nproc-per-node 2 examples/fsdp2.py --tiny   # eager, a few steps (seconds)

Projected weights stay FSDP2 shards; FSDP2 reduce-scatters only the dense parameters'
gradients while grassfx all-reduces the compressed ones, and each rank keeps a slice of
the projected optimizer state. See docs/distributed.md.
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import grassfx


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def train(steps: int, backend: str, device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    teacher = nn.Linear(32, 4).to(device)
    model = Net().to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    model = grassfx.compile(model, rank=8, update_freq=20, backend=backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own shard of the batch
        x = torch.randn(64 // world, 32, generator=g).to(device)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % max(1, steps // 5) == 0 or step == steps - 1):
            print(f"step {step:3d}  loss on rank 0's shard {loss.item():.4f}")

    if rank == 0:
        print(f"trained {steps} steps with FSDP2 on {world} ranks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("GRASSFX_EXAMPLE_TINY") == "1")
    args = parser.parse_args()
    steps, backend = (6, "eager") if args.tiny else (100, "inductor")

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    if device is not None:
        torch.cuda.set_device(device)

    train(steps, backend, device)
    # Tear down in order: gloo work objects that outlive the process group can abort a
    # process at interpreter exit. train()'s model and optimizer are gone once it returns.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
