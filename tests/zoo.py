"""Small models that exercise every weight-use pattern the sparsify pass must handle."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Shapes(nn.Module):
    """nn.Linear with/without bias on 2-D, 3-D and 4-D inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 20)  # 2-D input, bias
        self.b = nn.Linear(20, 16, bias=False)  # 3-D input
        self.c = nn.Linear(16, 8)  # 4-D input

    def forward(self, x):  # x: (6, 12)
        h = torch.tanh(self.a(x))  # (6, 20)
        h = torch.tanh(self.b(h.view(2, 3, 20)))  # (2, 3, 16)
        return self.c(h.view(2, 3, 1, 16)).sum(dim=(1, 2))  # (2, 8)


class Heads(nn.Module):
    """A weight read through einsum with a head reshape and through matmul / @."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Parameter(torch.randn(3 * d, d) / d**0.5)
        self.out = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.mix = nn.Parameter(torch.randn(24, d) / d**0.5)

    def forward(self, x):  # x: (b, s, d)
        b, s, d = x.shape
        w = self.qkv.view(3, self.heads, d // self.heads, d)
        q, k, v = torch.einsum("bsd,thed->tbhse", x, w).unbind(0)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        y = torch.matmul(y, self.out.t())
        return y @ self.mix.t()


class Shared(nn.Module):
    """One linear applied twice (a weight used twice: its gradient is an add)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.block(torch.relu(self.block(x)))))


class Checkpointed(nn.Module):
    """Activation checkpointing around two linears."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def _inner(self, x):
        return self.down(torch.relu(self.up(x)))

    def forward(self, x):
        return self.head(checkpoint(self._inner, x, use_reentrant=False))


class Sliced(nn.Module):
    """A weight sliced before its matmul: its gradient cannot be pushed into a GEMM."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.matmul(x, self.w[:8].t()).sum() + self.fc(x).sum()


class Zoo(nn.Module):
    """Everything above in one model, so one compile covers every pattern."""

    def __init__(self):
        super().__init__()
        self.shapes = Shapes()
        self.heads = Heads()
        self.shared = Shared()
        self.ckpt = Checkpointed()
        self.bridge = nn.Linear(8, 16)

    def forward(self, x):  # x: (6, 12)
        h = self.bridge(self.shapes(x)).view(2, 1, 16).expand(2, 5, 16)  # (2, 5, 16)
        h = self.heads(h)  # (2, 5, 24)
        h = h[..., :16]
        return self.ckpt(h).pow(2).mean() + self.shared(h).pow(2).mean()
