"""Data-parallel ``grassfx train``: re-launching under torchrun and joining the process group."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def launch(argv: list[str], nproc: int) -> int:
    """Re-run this command under ``torchrun --standalone --nproc-per-node nproc``."""
    import subprocess

    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "grassfx.train", *rest]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def init_distributed(args: argparse.Namespace, device: torch.device) -> torch.device:
    """Under torchrun: join the process group (NCCL on GPU, gloo on CPU); set rank/world."""
    args.world_size, args.proc_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.world_size == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
