"""Data-parallel training with grassfx: launch with torchrun, no wrapper needed.

    torchrun --nproc-per-node 2 examples/data_parallel.py          # gloo on CPU, nccl on GPUs
    torchrun --nproc-per-node 2 examples/data_parallel.py --tiny   # eager, a few steps (seconds)

With the process group initialised, ``grassfx.compile`` averages gradients across ranks
itself, sending only the compressed (r x n) gradients of projected weights; every rank
selects the same rows. See docs/distributed.md.
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import grassfx


def train(steps: int, backend: str, device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    teacher = nn.Linear(32, 4).to(device)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 4)).to(device)
    model = grassfx.compile(model, rank=8, update_freq=20, backend=backend)
    opt = grassfx.optim.AdamW(model.parameters(), lr=3e-3)

    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own shard of the batch
        x = torch.randn(64 // world, 32, generator=g).to(device)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        loss.backward()  # gradients are averaged across ranks here
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % max(1, steps // 5) == 0 or step == steps - 1):
            print(f"step {step:3d}  loss on rank 0's shard {loss.item():.4f}")

    # Every rank holds the same weights.
    weight = grassfx.unwrap(model)[0].weight.detach()
    copies = [torch.empty_like(weight) for _ in range(world)]
    dist.all_gather(copies, weight)
    assert all(torch.equal(c, weight) for c in copies), "ranks diverged"
    if rank == 0:
        print(f"{world} ranks trained identical weights")


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
