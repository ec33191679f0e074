"""Data parallelism for grassfx models: only compressed gradients cross the network.

With ``torch.distributed`` initialised (world size > 1), ``grassfx.compile``'s model trains
data-parallel with no wrapper:

* **Normal steps.** Gradients are averaged across ranks by bucketed asynchronous
  all-reduces launched from post-accumulate-grad hooks while the backward still runs
  (as DDP does): the (r x n) compressed gradient of each projected weight and the dense
  gradient of every other trainable parameter. Compiled models instead all-reduce the
  compressed gradients inside the backward graph (pass ``compress_allreduce``), and the
  hooks skip them. Projected weights therefore send r/m of a dense all-reduce.
* **Refresh steps** (every ``update_freq`` steps). Each projected weight's dense
  gradient is all-reduced once, inside the refresh backward, one layer at a time, so
  row norms and the selection come from the exact global gradient and every rank picks
  the same rows; the compressed gradient is then already global. Amortised, this adds
  1/update_freq of a dense all-reduce per step.
* **Checks.** The first forward all-gathers a fingerprint of the grassfx configuration
  (rank, selector, update_freq, seed, scale, explore, targets and shapes) and raises
  :class:`grassfx.GrassError` if ranks differ. With ``GRASSFX_CHECK_RANKS=1`` every
  refresh all-gathers a hash of each weight's ``idx`` and raises, naming the weight, if
  ranks disagree.
* **Gradient accumulation**: wrap all but the last micro-batch in ``model.no_sync()``.
* Wrapping the model in ``DistributedDataParallel`` also works: grassfx notices the
  wrapper and leaves the reduction to DDP, which sees only the handles (r x n) and the
  unprojected parameters, because projected weights are frozen.
* FSDP2 (``fully_shard`` applied before ``grassfx.compile``): FSDP2 reduce-scatters its
  sharded parameters' gradients; this reducer averages only the handles
  (:mod:`grassfx.fsdp`). FSDP1 wrappers are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch

from . import _compat, fsdp
from .errors import GrassError, UnsupportedModelError

__all__ = ["DataParallel", "attach", "world", "BUCKET_BYTES"]

BUCKET_BYTES = 25 * 2**20


def world():
    """``(process group, world size)`` when data-parallel training applies, else ``(None, 1)``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    size = dist.get_world_size()
    return (dist.group.WORLD, size) if size > 1 else (None, 1)


def attach(model):
    """A :class:`DataParallel` reducer for ``model`` when data-parallel training applies, else None."""
    group, size = world()
    if size > 1 and model.grass_config.data_parallel is not False:
        return DataParallel(model, group, size)
    return None


def _idx_hash(idx: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(idx.detach().cpu().numpy().tobytes()).digest()[:7], "little")


class DataParallel:
    """The gradient reducer of one GrassModel (see the module docstring)."""

    def __init__(self, model, group, size: int, bucket_bytes: int = BUCKET_BYTES):
        self.model, self.group, self.size = model, group, size
        self.bucket_bytes = bucket_bytes
        self.enabled = True  # False under DDP: DDP reduces
        self.sync = True
        self.refresh_backward = False
        self.bytes_sent = {"projected": 0, "dense": 0, "refresh_dense": 0}
        self.check_ranks = os.environ.get("GRASSFX_CHECK_RANKS", "0") not in ("", "0")
        self._bucket, self._bucket_size, self._pending = [], 0, []
        self._callback_queued = False
        self._checked = False
        self._handles = {id(s.handle): s for s in model.sites}
        self._hooks = []
        for p in self._trainable():
            self._hooks.append(p.register_post_accumulate_grad_hook(self._ready))
        model._schedule.on_refresh_seen.append(self.check_selection)

    @property
    def reduced_in_graph(self) -> set:
        """Weight names whose compressed gradients the compiled graphs average (from the compile report)."""
        report = self.model.compile_report
        return report.reduced_in_graph() if report is not None else set()

    def group_and_size(self) -> tuple:
        """``(group name, world size)`` for collectives traced into the refresh backward."""
        return self.group.group_name, self.size

    def expect_refresh(self, sites) -> None:
        """This forward is a refresh: its backward all-reduces each such weight's dense gradient once."""
        self.refresh_backward = True
        self.bytes_sent["refresh_dense"] += sum(s.weight.numel() * s.weight.element_size() for s in sites)

    def _trainable(self):
        frozen = {id(s.weight) for s in self.model.sites}
        # parameters inside fully_shard modules are FSDP2's to reduce-scatter (sharded or, after a
        # forward without backward, gathered: either way not ours); the handles and anything
        # outside every fully_shard module are averaged here
        managed = {id(p) for m in fsdp.fsdp2_modules(self.model.module) for p in m.parameters()}
        for _, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in frozen and id(p) not in managed and not fsdp.is_dtensor(p):
                yield p

    # -- first forward --------------------------------------------------------------------
    def first_forward(self) -> None:
        if self._checked:
            return
        self._checked = True
        if _compat.called_by("DistributedDataParallel"):
            self.enabled = False
        if _compat.called_by("FullyShardedDataParallel") or _compat.called_by("FSDPModule"):
            raise UnsupportedModelError(
                "a grassfx model is being run inside an FSDP wrapper: FSDP was applied after "
                "grassfx.compile; apply fully_shard to the blocks and the root first, then call "
                "grassfx.compile on the sharded model (docs/distributed.md)")
        fsdp.check_not_sharded_after(self.model.sites)
        self._check_same_config()

    def _fingerprint(self) -> str:
        cfg = self.model.grass_config
        sites = [(s.name, tuple(s.weight.shape), s.dim, s.rank, s.blocks) for s in self.model.sites]
        key = (cfg.rank, cfg.selection, cfg.update_freq, cfg.seed, cfg.scale, cfg.proj_dim, cfg.moments, cfg.explore, sites)
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def _check_same_config(self) -> None:
        import torch.distributed as dist

        mine = self._fingerprint()
        everyone = [None] * self.size
        dist.all_gather_object(everyone, mine, group=self.group)
        if len(set(everyone)) != 1:
            cfg = self.model.grass_config
            raise GrassError(
                f"ranks compiled different grassfx configurations (this rank: rank={cfg.rank}, "
                f"selection={cfg.selection!r}, update_freq={cfg.update_freq}, seed={cfg.seed}, "
                f"{len(self.model.sites)} projected weights); every rank must call "
                "grassfx.compile with the same arguments on the same model"
            )

    def count_in_graph(self) -> None:
        """Account for the in-graph all-reduces of one normal (non-refresh) backward; the
        sizes are those of the collectives the compress_allreduce pass inserted."""
        reduced = self.reduced_in_graph
        self.bytes_sent["projected"] += sum(s.handle.numel() * s.handle.element_size()
                                            for s in self.model.sites if s.name in reduced)

    # -- hooks and buckets ----------------------------------------------------------------
    def _ready(self, p: torch.Tensor) -> None:
        if not self.enabled or p.grad is None:
            return
        if not self._callback_queued:  # once per backward: finish() runs at its end
            _compat.queue_backward_callback(self.finish)
            self._callback_queued = True
        if not self.sync:
            return
        site = self._handles.get(id(p))
        if site is not None and (self.refresh_backward or site.name in self.reduced_in_graph):
            return  # already global (refresh) or reduced inside the compiled graph
        self._bucket.append((p, "projected" if site is not None else "dense"))
        self._bucket_size += p.grad.numel() * p.grad.element_size()
        if self._bucket_size >= self.bucket_bytes:
            self._launch()

    def _launch(self) -> None:
        import torch.distributed as dist

        if not self._bucket:
            return
        bucket, self._bucket, self._bucket_size = self._bucket, [], 0
        grads = [p.grad for p, _ in bucket]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        for p, kind in bucket:
            self.bytes_sent[kind] += p.grad.numel() * 4
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending.append((work, flat, bucket))

    def finish(self) -> None:
        """Wait for every bucket and write the averaged gradients back."""
        self._launch()
        for work, flat, bucket in self._pending:
            work.wait()
            flat.div_(self.size)
            offset = 0
            for p, _ in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self._pending.clear()
        if not self.refresh_backward:
            self.count_in_graph()
        self._callback_queued = False
        self.refresh_backward = False

    @contextlib.contextmanager
    def no_sync(self):
        previous, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = previous

    # -- checks -----------------------------------------------------------------------------
    def check_selection(self) -> None:
        """All-gather a hash of every site's idx; raise naming the first disagreeing weight."""
        import torch.distributed as dist

        if not self.check_ranks:
            return
        mine = [_idx_hash(s.idx) for s in self.model.sites]
        everyone = [None] * self.size
        dist.all_gather_object(everyone, mine, group=self.group)
        for i, site in enumerate(self.model.sites):
            values = {h[i] for h in everyone}
            if len(values) != 1:
                raise GrassError(
                    f"ranks selected different rows for {site.name!r} (idx hashes differ across "
                    f"{self.size} ranks): their weights would diverge. Every rank must compile with "
                    "the same seed and selector and see the same refresh steps"
                )
