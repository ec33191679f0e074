"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with grassfx: who holds what.

The supported order is the user's usual recipe, then grassfx::

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    model = grassfx.compile(model, rank=256)
    opt = grassfx.optim.AdamW(model.parameters(), lr=1e-3)

What lives where (``docs/distributed.md``):

* **Projected weights** stay FSDP2 parameters: each rank stores its ``Shard(0)`` rows and
  FSDP2 all-gathers them for forward and backward. They are frozen, so FSDP2 reduces no
  gradient for them.
* **Handles** (the (r x n) / (m x r) compressed gradients) are ordinary, replicated
  parameters that FSDP2 does not manage; grassfx averages them across ranks (eager hooks,
  or all-reduces inside the compiled backward), as in plain data parallelism.
* **Optimizer state of a projected weight** is sharded along the handle's first dim with
  ``torch.chunk``'s rule, as a ``DTensor`` ``Shard(0)`` on FSDP2's mesh, so
  ``torch.distributed.checkpoint`` saves and reshards it like any FSDP2 state:

  - columns selected (``dim=1``, handle (m x r)): the handle's rows *are* the weight's
    rows, so each rank's state and update cover exactly its shard of the weight; no
    communication beyond the gradient average;
  - rows selected (``dim=0``, handle (r x n)): rank k owns the k-th chunk of the r
    selection slots; it advances their moments, and the (r x n) update is all-gathered so
    that each rank writes the selected rows that fall in its shard of the weight.

* **Dense parameters** (embeddings, norms, head) follow FSDP2's path: sharded, gradients
  reduce-scattered by FSDP2, updated on the local shard.

Anything else (FSDP1 wrappers, 2-D meshes (HSDP), other placements, ``fully_shard``
applied after ``grassfx.compile``) is refused with an error that names the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

__all__ = ["is_dtensor", "local", "fsdp2_modules", "refuse_fsdp1", "check_model", "check_not_sharded_after", "sharded_weight", "Chunk",
           "chunk_of",
           "shard_like", "all_gather_rows", "clip_grad_norm_"]

_ORDER = ("apply fully_shard to the blocks and the root first, then call grassfx.compile on the sharded model "
          "(docs/distributed.md)")


_DTENSOR = None  # the DTensor class, imported at the first call (not with grassfx: 0.4 s)


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters)."""
    global _DTENSOR
    if _DTENSOR is None:  # set by grassfx.compile's first call, before anything is traced
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            _DTENSOR = DTensor
        else:
            _DTENSOR = ()  # isinstance(x, ()) is False
    return isinstance(tensor, _DTENSOR)


def local(tensor):
    """The local shard of a DTensor (a view: in-place updates write through), else ``tensor``."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def fsdp2_modules(model) -> list:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def refuse_fsdp1(model) -> None:
    """Raise if ``model`` holds FSDP1 wrappers (``FullyShardedDataParallel``)."""
    for mod in model.modules():
        if "FullyShardedDataParallel" in {c.__name__ for c in type(mod).__mro__}:
            raise UnsupportedModelError(
                "grassfx does not support FSDP1 (FullyShardedDataParallel wrappers): use FSDP2, "
                f"torch.distributed.fsdp.fully_shard; {_ORDER}"
            )


def check_model(model, target_names) -> bool:
    """Before grassfx instruments ``model``: refuse unsupported FSDP2 layouts.

    Returns whether the model is sharded by FSDP2. ``target_names``: the names of the
    weights grassfx will project (each must be a ``Shard(0)`` DTensor on a 1-D mesh).
    """
    refuse_fsdp1(model)
    if not fsdp2_modules(model):
        return False
    params = dict(model.named_parameters())
    for name in target_names:
        p = params[name]
        if not is_dtensor(p):
            raise UnsupportedModelError(
                f"{name!r} is not sharded although the model uses fully_shard: grassfx needs every "
                "projected weight inside a fully_shard module (apply fully_shard to the root too) "
                "or excluded (grassfx.compile(..., exclude=[...]))"
            )
        if p.dim() != 2:
            raise UnsupportedModelError(
                f"{name!r} is {p.dim()}-D (an expert stack): grassfx projects only 2-D FSDP2-sharded "
                "weights; exclude it (grassfx.compile(..., exclude=[...])) or do not shard it")
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
            raise UnsupportedModelError(
                f"{name!r} is sharded as {placements} on a {mesh.ndim}-D mesh: grassfx supports "
                "FSDP2's default layout only (Shard(0) on a 1-D mesh; no HSDP, no shard_placement_fn)"
            )
        if p.device.type != mesh.device_type:
            raise UnsupportedModelError(
                f"{name!r} is stored on {p.device.type} but computed on {mesh.device_type}: FSDP2's CPU "
                "offload (offload_policy) is not supported with grassfx")
        if mesh.size() != torch.distributed.get_world_size():
            raise UnsupportedModelError(
                f"{name!r} is sharded over {mesh.size()} of {torch.distributed.get_world_size()} ranks: "
                "grassfx averages compressed gradients over the whole world, so FSDP2's mesh must span it"
            )
    for name, p in params.items():
        if p.requires_grad and not is_dtensor(p) and name not in target_names:
            raise UnsupportedModelError(
                f"{name!r} is trainable but outside every fully_shard module: apply fully_shard to the "
                "root module too (grassfx supports FSDP2 models whose every parameter FSDP2 manages)")
    return True


def check_not_sharded_after(sites) -> None:
    """Raise if ``fully_shard`` was applied after ``grassfx.compile`` (to the grassfx model,
    which shards the handles, or to the module inside it, which replaces the weights that
    grassfx registered)."""
    for site in sites:
        # (a weight sharded at compile time may be a plain tensor now: FSDP2 has it gathered)
        what = ("its gradient handle is sharded" if is_dtensor(site.handle) else
                "it was not sharded when grassfx.compile ran" if is_dtensor(site.weight) and not site.sharded
                else None)
        if what is not None:
            raise UnsupportedModelError(
                f"{site.name!r} is an FSDP2 shard but {what}: fully_shard was applied after "
                f"grassfx.compile, which is not supported; {_ORDER}"
            )


def sharded_weight(site):
    """The FSDP2 shard of a site's weight (a DTensor); raises if FSDP2 holds it gathered now."""
    weight = site.weight
    if not is_dtensor(weight):
        raise UnsupportedModelError(
            f"{site.name!r} is gathered by FSDP2 now (a forward ran without its backward, e.g. an "
            "evaluation under torch.no_grad()): call reshard() on the fully_shard root (or run the "
            "backward) before stepping the optimizer, saving or unwrapping")
    return weight


@dataclass(frozen=True)
class Chunk:
    """This rank's part of a dimension of size ``size`` split with ``torch.chunk``'s rule."""

    start: int
    length: int
    size: int
    world: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def per_rank(self) -> int:
        return -(-self.size // self.world)  # ceil: every chunk but the last ones has this length


def chunk_of(size: int, world: int, rank: int) -> Chunk:
    """``torch.chunk(range(size), world)[rank]`` as a :class:`Chunk` (possibly empty), as FSDP2 shards."""
    per = -(-size // world)
    start = min(size, rank * per)
    return Chunk(start, max(0, min(size, start + per) - start), size, world)


def shard_like(local_tensor: torch.Tensor, weight, global_shape) -> torch.Tensor:
    """``local_tensor`` as a ``Shard(0)`` DTensor of ``global_shape`` on ``weight``'s mesh."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size(global_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor, weight.device_mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=stride)


def all_gather_rows(local_rows: torch.Tensor, chunk: Chunk, group) -> torch.Tensor:
    """Concatenate every rank's ``local_rows`` (dim 0 chunked as ``chunk``) into the whole tensor."""
    import torch.distributed as dist

    per = chunk.per_rank
    padded = local_rows.new_zeros((per, *local_rows.shape[1:]))
    padded[: chunk.length] = local_rows
    out = local_rows.new_empty((per * chunk.world, *local_rows.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, padded.contiguous(), group=group)
    return out[: chunk.size]


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, *, eps: float = 1e-6) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) for an FSDP2 model trained by grassfx.

    Its gradients mix FSDP2's sharded ones (DTensors: each rank holds a slice) with
    grassfx's compressed ones (plain tensors, the same on every rank), which torch's
    version cannot combine. The squared norms of the shards are summed across the mesh,
    the replicated ones counted once; every gradient is then scaled by
    ``min(1, max_norm / (norm + eps))``. Returns the total norm (a 0-d float32 tensor).
    Without FSDP2 it equals torch's.
    """
    import torch.distributed as dist

    from .errors import ConfigError

    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ConfigError(f"max_norm={max_norm!r}: expected a number > 0")
    if norm_type != 2:
        raise ConfigError(f"norm_type={norm_type!r}: grassfx.fsdp.clip_grad_norm_ computes the L2 norm only (2)")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = local(grads[0]).device
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    group = None
    for g in grads:
        square = local(g).float().pow(2).sum()
        if is_dtensor(g) and any(p.is_shard() for p in g.placements):
            sharded += square
            group = g.device_mesh.get_group()
        else:
            replicated += square
    if group is not None:
        dist.all_reduce(sharded, group=group)
    total = (sharded + replicated).sqrt()
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for g in grads:
        local(g).mul_(coef.to(g.dtype))
    return total
