"""Live tensor bytes of a piece of code, counted allocation by allocation.

:class:`track_memory` runs a block under ``torch.profiler`` with memory profiling and
replays the allocations and frees it recorded, in order: ``peak`` is the highest number
of bytes allocated and not yet freed at any point of the block (above what was live when
it began), ``net`` what the block left allocated. The count does not depend on timing or
sampling: every allocation of the CPU allocator is an event, inside compiled graphs too.

One blind spot, PyTorch's: the CPU allocator reports the free of a block only if the block
was allocated while a profiler was recording. A block that frees tensors made outside any
``track_memory`` (an optimizer replacing state it created earlier) sees the new tensors and
not the freed ones, so ``peak`` and ``net`` overstate it; run the code that made them under
``track_memory`` too (``benchmarks/memory_check.py`` runs its warm-up steps that way).

Example:
    >>> import torch
    >>> from grassfx.debug.memory import track_memory
    >>> with track_memory() as mem:
    ...     x = torch.ones(1024)              # 4 KiB
    ...     y = x + x                         # 4 KiB more
    ...     del x
    >>> mem.peak, mem.net
    (8192, 4096)
"""

from __future__ import annotations

import torch

from grassfx import _compat

__all__ = ["track_memory"]


class track_memory:  # noqa: N801 - used like a function: ``with track_memory() as mem``
    """Context manager; after the block ``peak``, ``net`` and ``events`` hold its memory."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.events = []  # (time ns, +bytes allocated / -bytes freed)
        self.peak = 0
        self.net = 0
        self._prof = None

    def __enter__(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device != "cpu":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.events = _compat.allocation_events(self._prof, self.device)
        self._prof = None
        live = peak = 0
        for _, nbytes in self.events:
            live += nbytes
            peak = max(peak, live)
        self.peak, self.net = peak, live
        return False
