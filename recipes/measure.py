"""Measuring a training run: bytes of optimizer state, peak memory, throughput."""

from __future__ import annotations

import ctypes
import resource
import statistics
import sys

import torch

__all__ = ["proc_status_bytes", "tensor_nbytes", "optimizer_state_bytes", "PeakMemory", "Throughput", "compiled_graphs", "fmt_bytes",
           "sync", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
_MMAP_THRESHOLD_MAX = 32 << 20


def tensor_nbytes(obj, _seen: set | None = None) -> int:
    """Bytes held by every tensor reachable from ``obj`` (dicts, sequences, object attributes).

    Applied to ``optimizer.state`` it counts the moments, projection matrices and
    any other per-parameter state, whatever container an optimizer keeps them in.
    Each tensor is counted once.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(tensor_nbytes(v, seen) for v in obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return 0
    attrs = getattr(obj, "__dict__", None)
    return tensor_nbytes(attrs, seen) if isinstance(attrs, dict) else 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of the tensors in ``optimizer.state`` (the same measure for every optimizer)."""
    return tensor_nbytes(dict(optimizer.state))


def _glibc():
    """The C library when it is glibc on Linux (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def _release_freed_memory() -> None:
    """Give the heap's free memory back to the system (``malloc_trim``): a run's peak RSS must
    not start at what an earlier run of the process freed (:func:`keep_freed_memory` keeps it)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process; returns whether it did.

    glibc serves large allocations by ``mmap`` and gives freed memory back to the system
    (``munmap``, heap trimming) under thresholds it adjusts as the program runs. A training
    step frees and re-allocates its activations every step, so whether they come back as
    fresh pages, each one page-faulted and zeroed by the kernel, changes over the run: on
    the demo's tiny model that was up to thousands of minor faults and a few ms per step,
    varying over the run (``benchmarks/step_breakdown.py --malloc system``).
    Fixed thresholds (every allocation up to 32 MiB from the heap, no trimming) keep the
    freed pages for the next step. Process-wide: every run of the process gets it. Linux
    with glibc only (elsewhere nothing is changed and False is returned).
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # an explicit mmap threshold also turns off glibc's dynamic adjustment of both thresholds;
    # the trim threshold is the largest value mallopt takes (an int): 2 GiB free at the heap's top
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _proc_status_kib(field: str) -> int | None:
    """A ``VmXXX`` field of /proc/self/status in KiB, or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_status_bytes(field: str) -> int:
    """A ``VmXXX`` field of /proc/self/status (``VmRSS``, ``VmHWM``, ``VmData``) in bytes."""
    kib = _proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")
    return kib * 1024


class PeakMemory:
    """Peak memory of one run: CUDA allocator peak on GPU, else the process's peak RSS.

    On Linux the RSS high-water mark is reset at the start of the run (through
    /proc/self/clear_refs) so that each run reports its own peak, after the heap's free
    memory (kept by :func:`keep_freed_memory`) is handed back; where that is not possible
    the peak of the whole process so far is reported.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _release_freed_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self.device = device

    def peak(self) -> int:
        """Peak bytes so far in this run."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def fmt_bytes(n: float) -> str:
    """Human-readable byte count (KiB/MiB/GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Training time and tokens/s over the steady steps, and the time spent compiling.

    The first step (allocator warm-up) and every step during which Dynamo compiled a graph
    (the first step of a compiled run, a recompile) are left out of tokens/s; what a
    compiling step took beyond a steady step (the median of the others) is counted as
    compile time. :meth:`add_compile` adds compile time measured elsewhere
    (the first evaluation of a compiled model).
    """

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.first_step_s = tokens_per_step, 0.0
        self.steady = []  # seconds of each steady step
        self.compiling = []  # seconds of each step that compiled (the first step included)
        self.extra_compile_s = 0.0

    @property
    def steps(self) -> int:
        return len(self.steady)

    @property
    def seconds(self) -> float:
        return float(sum(self.steady))

    def add(self, dt: float, compiled: bool = False) -> None:
        """Account one step that took ``dt`` seconds (``compiled``: a graph was compiled in it)."""
        first = not self.first_step_s
        if first:
            self.first_step_s = dt
        if compiled:
            self.compiling.append(dt)
        elif not first:  # an uncompiled first step is warm-up: neither steady nor compiling
            self.steady.append(dt)

    def add_compile(self, seconds: float) -> None:
        self.extra_compile_s += max(0.0, seconds)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling: compiling steps beyond a steady step, plus :meth:`add_compile`."""
        typical = statistics.median(self.steady) if self.steady else 0.0
        return sum(max(0.0, dt - typical) for dt in self.compiling) + self.extra_compile_s

    @property
    def tokens_per_s(self) -> float:
        """Mean tokens/s over the steady steps (over the first one when there is no other)."""
        if not self.steady:
            return self.tokens_per_step / max(self.first_step_s, 1e-9)
        return self.steps * self.tokens_per_step / max(self.seconds, 1e-9)


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (a step that raises it compiled something)."""
    from grassfx import _compat

    return _compat.compiled_graph_count()
