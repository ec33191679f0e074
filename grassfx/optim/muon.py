"""Muon for the selected rows of projected weights, AdamW for every other parameter.

Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers") replaces Adam's
per-element normalization of a weight matrix's step by an orthogonalization of the
momentum: the update is ``U Vᵀ`` of the momentum's SVD, computed approximately by a few
Newton-Schulz iterations, so every direction of the step gets the same size whatever the
gradient's spectrum. Here it is applied to what grassfx trains of a projected weight:
the (r x n) compressed gradient ``C`` of the selected rows, with one (r x n) momentum
buffer (half of AdamW's moments)::

    M  = momentum * M + C
    U  = C + momentum * M              (nesterov=True; else U = M)
    O  = orthogonalize(U)              (r x n; an expert stack: each expert's block)
    W[idx] -= lr * scale * rms * sqrt(max(r, n)) * O

The factor ``rms * sqrt(max(r, n))`` gives ``O`` (whose singular values are ~1) an
entry RMS of ``rms`` = 0.2, the typical RMS of an AdamW step, so one learning rate serves
the AdamW-trained parameters and the orthogonalized ones (the matching proposed by Liu
et al., 2025, "Muon is scalable for LLM training"). The dense gradient is never needed:
``C`` is all the update reads.

Refreshes behave as with :class:`grassfx.optim.AdamW`: ``moments="reset"`` drops the
momentum, ``"keep_overlap"`` keeps the rows selected before and after and zeroes the new
ones; ``rewarmup=K`` ramps a new row's step from 1/K to 1 over its first K steps (per-row
step counts, ``state["row_step"]``). A selector's ``rho`` is divided out by the
orthogonalization's normalization, so it is applied once (as ``rho_scaling="once"`` of
AdamW: a row drawn twice gets one step). Decoupled weight decay follows the AdamW rules
(:mod:`grassfx.optim.decay`). Every parameter that is not a projected weight (embeddings,
norms, biases, an output head) is trained by AdamW (:func:`grassfx.optim.adamw.adamw_step`,
``betas``/``eps``) at the group's ``lr``.

Measured against AdamW-on-rows in ``benchmarks/RESULTS.md`` (section 3).
"""

from __future__ import annotations

import math

import torch

from grassfx import _compat
from grassfx.core.decay import owe
from grassfx.core.rows import broadcast_along
from grassfx.errors import ConfigError
from grassfx.select import WITH_REPLACEMENT

from .adamw import AdamW
from .base import GrassOptimizer
from .checks import check_number
from .rounding import add_to_rows, first_copies, index_add_along, round_update
from .rows import row_weights

__all__ = ["Muon", "orthogonalize", "orthogonalize_many", "shape_chunks", "NS_COEFFICIENTS"]

# The quintic Newton-Schulz iteration's coefficients published with Muon (Jordan et al.,
# 2024): they push every singular value of a matrix of norm <= 1 towards [0.7, 1.2] in
# five iterations.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(x: torch.Tensor, steps: int = 5, eps: float = 1e-7, scale=None) -> torch.Tensor:
    """Approximately ``U Vᵀ`` of ``x = U S Vᵀ`` over the last two dims (float32).

    Quintic Newton-Schulz: ``X <- a X + (b A + c A²) X`` with ``A = X Xᵀ``, started from
    ``x / ‖x‖_F`` (so every singular value is <= 1), on the wide orientation of ``x``
    (a tall matrix is transposed, iterated, transposed back). A leading batch dim is one
    matrix per entry (an expert stack). A matrix at least twice as wide as tall is iterated
    in its Gram space (:func:`_newton_schulz_gram`: the same iterates in exact arithmetic,
    fewer FLOPs). ``scale``: a number, or a float32 tensor with one factor per matrix of
    the flattened batch, that multiplies the result; in the Gram space it goes into the
    small final left factor instead of a pass over the result.
    """
    y = x.float()
    tall = y.shape[-2] > y.shape[-1]
    if tall:
        y = y.mT
    shape = y.shape
    y = y.reshape(-1, *shape[-2:])  # (batch, small, large)
    # normalized before the Gram product: a norm past float32's range gives 0, not inf * 0
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + eps)
    if isinstance(scale, torch.Tensor):
        if scale.device != y.device:  # factors made on the CPU: pinned, the copy does not wait for the stream
            scale = scale.pin_memory() if y.device.type == "cuda" else scale
            scale = scale.to(y.device, non_blocking=True)
        scale = scale.reshape(-1, 1, 1)
    if shape[-1] >= 2 * shape[-2]:
        y = _newton_schulz_gram(y, steps, scale)
    else:
        y = _newton_schulz(y, steps)
        if scale is not None:
            y = y * scale
    y = y.reshape(shape)
    return y.mT if tall else y


def _newton_schulz(y: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` quintic iterations on a batch of wide (s x l) matrices: per step two
    (s x s x l) matmuls and one (s x s x s)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = torch.bmm(y, y.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A²
        y = torch.baddbmm(y, poly, y, beta=a)  # a X + (b A + c A²) X
    return y


def _newton_schulz_gram(y: torch.Tensor, steps: int, scale=None) -> torch.Tensor:
    """The iterates of :func:`_newton_schulz` (in exact arithmetic), computed in the (s x s)
    Gram space, times ``scale`` (None, a number or a (batch, 1, 1) tensor, applied to the
    final left factor). In float32 they lose more to rounding along the near-null
    directions of a nearly rank-deficient input (5-9x the direct iteration's error, up to
    ~1e-3 of the largest entry at 1024 x 4096 with rank 1-4 inputs): harmless for an
    optimizer step.

    Each step multiplies ``X`` on the left by ``M = a I + b A + c A²``, a polynomial in
    ``A = X Xᵀ``, so ``M`` is symmetric and commutes with ``A``. Hence
    ``X_k = Q_k X_0`` with ``Q_{k+1} = M_k Q_k``, and ``A_{k+1} = M_k A_k M_k``: only
    (s x s) products inside the loop, one (s x s x l) product before it (``A_0``) and one
    after (``Q X_0``). For ``steps`` = 5 that is 2 s²l + 17 s³ multiply-adds instead of
    10 s²l + 5 s³: about half for l = 4s.
    """
    a, b, c = NS_COEFFICIENTS
    gram = torch.bmm(y, y.mT)
    q = None
    for k in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A²
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # M = a I + b A + c A²
        q = poly if q is None else torch.bmm(poly, q)
        if k < steps - 1:
            gram = torch.bmm(torch.bmm(poly, gram), poly)
    return torch.bmm(q if scale is None else q * scale, y)


# The most float32 elements one batched Newton-Schulz call stacks (4 MiB of input; the
# iteration holds a few such buffers): larger sets of matrices are split into chunks, and
# the optimizer finishes one chunk (momentum, orthogonalization, row writes) before the
# next, so its temporaries stay a few chunks' size whatever the model's (the tiny preset's
# 28 matrices of 64 x 256 are one chunk; at 444M parameters a chunk is two 256 x 2048)
BATCH_ELEMENTS = 1 << 20


def shape_chunks(shapes: list, devices: list, max_elements=None) -> list[list[int]]:
    """Indices of matrices batched together: one wide shape ``(small, large)`` (of the last
    two dims of ``shapes[i]``) and device per chunk, at most ``max_elements`` elements each
    (default :data:`BATCH_ELEMENTS`; a single larger matrix is a chunk of its own)."""
    max_elements = BATCH_ELEMENTS if max_elements is None else max_elements
    groups: dict[tuple, list[int]] = {}
    for i, (shape, device) in enumerate(zip(shapes, devices)):
        r, n = shape[-2:]
        groups.setdefault((min(r, n), max(r, n), device), []).append(i)
    chunks = []
    for members in groups.values():
        chunk, size = [], 0
        for i in members:
            numel = math.prod(shapes[i])
            if chunk and size + numel > max_elements:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(i)
            size += numel
        chunks.append(chunk)
    return chunks


def orthogonalize_many(xs: list[torch.Tensor], steps: int = 5, eps: float = 1e-7,
                       max_elements=None, scales=None) -> list[torch.Tensor]:
    """:func:`orthogonalize` of each tensor in ``xs``; matrices of one wide shape (and device)
    are stacked and iterated together, in chunks of at most ``max_elements`` elements
    (:func:`shape_chunks`; default :data:`BATCH_ELEMENTS`). ``scales``: a factor per tensor
    (floats, or 0-d / 1-element float32 tensors) that multiplies its result, at the cost of
    an (s x s) product instead of a pass over the result (the optimizer's step size).

    Each result equals ``scales[i] * orthogonalize(x, steps, eps)`` up to float32 rounding
    (a batched matmul may sum in another order); shapes and the float32 dtype are as it returns.
    """
    out: list[torch.Tensor | None] = [None] * len(xs)
    for chunk in shape_chunks([x.shape for x in xs], [x.device for x in xs], max_elements):
        # each as (batch, small, large): orthogonalize would orient it alike, one at a time
        wide = [xs[j].float().reshape(-1, *xs[j].shape[-2:]) for j in chunk]
        wide = [w.mT if w.shape[-2] > w.shape[-1] else w for w in wide]
        factor = None if scales is None else _chunk_scale([scales[j] for j in chunk], [w.shape[0] for w in wide])
        pieces = orthogonalize(torch.cat(wide), steps, eps, factor).split([w.shape[0] for w in wide])
        for j, piece in zip(chunk, pieces):
            tall = xs[j].shape[-2] > xs[j].shape[-1]
            out[j] = (piece.mT if tall else piece).reshape(xs[j].shape)
    return out


def _chunk_scale(per: list, counts: list[int]):
    """One factor per matrix of a chunk's stacked batch, from one per tensor (``counts[i]``
    matrices each): a float when they are all one float (the usual case: one learning rate
    and one shape), else a float32 tensor (floats are made into one on the CPU and moved
    without waiting where the device allows; 0-d tensors of a compiled step are stacked)."""
    if not isinstance(per[0], torch.Tensor):
        if all(f == per[0] for f in per):
            return float(per[0])
        return torch.tensor([f for f, n in zip(per, counts) for _ in range(n)], dtype=torch.float32)
    return torch.cat([f.reshape(1).expand(n) for f, n in zip(per, counts)]).float()


def _rows_step(bufs, grads, row_steps, weights, idxs, alphas, dims, momentum, nesterov, ns_steps) -> None:
    """Muon's step of plain projected weights (eager, or compiled with ``Muon(compiled=True)``):
    advance each momentum, orthogonalize the directions (batched per shape), add ``alphas[i]``
    times the result to the selected rows ``idxs[i]`` along ``dims[i]`` of ``weights[i]``,
    one chunk of same-shape weights (:func:`shape_chunks`) at a time.
    ``alphas`` and ``momentum``: floats, or (compiled) a float32 tensor and a 0-d one."""
    _compat.foreach_add_scalar_(row_steps, 1.0)
    for chunk in shape_chunks([b.shape for b in bufs], [b.device for b in bufs]):
        directions = _compat.foreach_momentum([bufs[i] for i in chunk], [grads[i] for i in chunk], momentum, nesterov)
        # the step size goes into Newton-Schulz's last (s x s) factor: no pass over the result
        ortho = orthogonalize_many(list(directions), ns_steps, max_elements=math.inf,
                                   scales=[alphas[i] for i in chunk])
        del directions
        for i, o in zip(chunk, ortho):
            index_add_along(weights[i], dims[i], idxs[i], o.to(weights[i].dtype))


class Muon(AdamW):
    """Orthogonalized momentum for projected weights' selected rows; AdamW for the rest.

    Args:
        params: ``model.parameters()`` of a model from :func:`grassfx.compile` (groups ok;
            ``lr`` and ``weight_decay`` per group, the Muon settings below are the optimizer's).
        lr: learning rate of every parameter (the orthogonalized step is matched to AdamW's
            RMS, see the module docstring); a projected weight's step is also multiplied by
            its ``scale`` (``grassfx.compile(..., scale=)``).
        momentum: the (r x n) momentum's decay (0 <= momentum < 1).
        nesterov: orthogonalize ``C + momentum * M`` (True, the default) or ``M``.
        ns_steps: Newton-Schulz iterations (an int >= 1).
        rms: target entry RMS of the orthogonalized step before ``lr`` (> 0).
        betas, eps: AdamW's, for the parameters that are not projected.
        weight_decay: decoupled, for every parameter (``lr * weight_decay`` per step).
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf.
        rewarmup: ramp a newly selected row's step from 1/K to 1 over its first K steps.
        update_rounding, state_dtype: as :class:`grassfx.optim.AdamW` (pure bf16 training:
            the momentum buffer is kept in ``state_dtype``, and the selected rows' new values
            are rounded as ``update_rounding`` says). Newton-Schulz gives every direction of
            the compressed gradient a step of the same size, so a rank-deficient gradient
            (a batch of fewer tokens than ``min(r, n)``) computed in bf16 has its rounding
            noise lifted to full-size steps: train with batches of at least that many tokens.
        update_in_backward: as :class:`grassfx.optim.AdamW` (each parameter updated inside
            backward as soon as its gradient exists).
        full_state: as :class:`grassfx.optim.AdamW`: the state of the embeddings and an
            untied LM head (``"adam"``, ``"factored"``, ``"factored_nomomentum"``).
        compiled: ``False`` (default: eager, nothing to compile) or ``True`` (a bool: unlike
            :class:`grassfx.optim.AdamW` there is no ``None``): the selected rows' step
            (momentum, Newton-Schulz, the scaled row writes) of every plain projected weight
            runs as one function compiled by ``torch.compile`` (Inductor), with the learning
            rates and ``momentum`` as tensors, so schedules and refreshes do not recompile.
            Equal to the eager step up to rounding (Inductor fuses the float arithmetic: in
            bf16 weights that can be one unit in the last place).
            A weight with re-warmup, weight decay, a selector that draws rows twice, rounding
            other than nearest, an expert stack or every row kept takes the eager path. The
            other parameters always go through torch's fused AdamW kernel. On the tiny
            preset's 28 weights (2 CPU cores) the optimizer step inside training went from
            8.9 to 8.3 ms, for about 10 s of cold compile (``benchmarks/step_breakdown.py
            --muon-compiled``, ``benchmarks/RESULTS.md`` section 1): ``grassfx train`` leaves
            it off.

    Example:
        >>> import torch, grassfx
        >>> model = grassfx.compile(torch.nn.Linear(32, 32), rank=4, backend="eager")
        >>> opt = grassfx.optim.Muon(model.parameters(), lr=2e-3)
        >>> model(torch.randn(2, 32)).sum().backward(); opt.step()
        >>> {k: tuple(v.shape) for k, v in opt.state[model.sites[0].handle].items()}
        {'row_step': (4,), 'momentum_buffer': (4, 32)}
    """

    #: sharded weights: not supported (the AdamW sharded step is not Muon's)
    _sharding_refusal = GrassOptimizer._sharding_refusal

    def __init__(self, params, lr=2e-3, momentum=0.95, nesterov=True, ns_steps=5, rms=0.2, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0.0, *, nonfinite="raise", rewarmup=0, update_rounding="nearest",
                 state_dtype=None, update_in_backward=False, compiled=False, full_state="adam"):
        check_number("momentum", momentum, low=0.0, high=1.0)
        if not isinstance(compiled, bool):
            raise ConfigError(f"compiled={compiled!r}: expected True or False")
        if compiled and update_in_backward:
            raise ConfigError("compiled=True with update_in_backward=True: updates inside backward run one "
                              "weight at a time, eagerly")
        check_number("rms", rms, low=0.0, low_open=True)
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
            raise ConfigError(f"ns_steps={ns_steps!r}: expected an int >= 1 (Newton-Schulz iterations)")
        if not isinstance(nesterov, bool):
            raise ConfigError(f"nesterov={nesterov!r}: expected True or False")
        self.momentum, self.nesterov, self.ns_steps, self.rms = momentum, nesterov, ns_steps, rms
        self._rows_compiled = compiled
        self._compiled_rows = None  # the torch.compile'd _rows_step, made at the first use
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nonfinite=nonfinite,
                         rewarmup=rewarmup, update_rounding=update_rounding, state_dtype=state_dtype,
                         update_in_backward=update_in_backward, full_state=full_state)

    def _apply_lists(self, work, beta1: float, beta2: float, eps: float) -> None:
        rest, rows = [], []
        for group, p, site in work:
            if site is None:
                rest.append((group, p, site))
            else:
                self._init_state(p, site)
                rows.append((group, p, site))
        plain = [self._plain(*item) for item in rows]
        if any(plain):
            self._step_plain_rows([item for item, ok in zip(rows, plain) if ok])
            rows = [item for item, ok in zip(rows, plain) if not ok]
        # re-warmup, decay, rows drawn twice, rounding, expert stacks, every row kept: Newton-Schulz
        # on the directions of one (wide) shape at once, a few batched matmuls instead of a few
        # small ones per weight (a step of the tiny preset: 28 matrices of 64 x 256 in one batch),
        # one chunk at a time
        for chunk in shape_chunks([p.shape for _, p, _ in rows], [p.device for _, p, _ in rows]):
            items = [rows[i] for i in chunk]
            directions = self._directions([p for _, p, _ in items])
            ortho = orthogonalize_many(directions, self.ns_steps, max_elements=math.inf)
            del directions
            for (group, p, site), o in zip(items, ortho):
                self._update_rows(p, site, group, o)
        if rest:  # every parameter that is not projected: AdamW's kernel
            super()._apply_lists(rest, beta1, beta2, eps)

    def _plain(self, group, handle, site) -> bool:
        """Whether one weight's step is :func:`_rows_step`'s: plain rows, nearest rounding, no
        re-warmup, no weight decay, each row drawn once, momentum in the handle's dtype."""
        return (not site.full and not site.per_expert and not self.rewarmup
                and group["weight_decay"] == 0 and site.method not in WITH_REPLACEMENT
                and self._rounding(handle, site) == "nearest"
                and self.state[handle]["momentum_buffer"].dtype == handle.dtype)

    def _step_plain_rows(self, rows: list) -> None:
        """The step of ``rows`` (``(group, handle, site)``, all :meth:`_plain`) by
        :func:`_rows_step`: eagerly, or compiled (``compiled=True``) with the per-weight step
        sizes and the momentum as tensors (no recompile when they change)."""
        if self._rows_compiled and self._compiled_rows is None:
            # a private code object per optimizer: Dynamo's cache and recompile limit (8 graphs)
            # are per code object, and each optimizer has its own shapes. Past the limit (a set
            # of plain weights that keeps changing) Dynamo runs the function eagerly: no fullgraph
            self._compiled_rows = torch.compile(_compat.own_function(_rows_step), dynamic=False)
        by_device: dict = {}
        for item in rows:
            by_device.setdefault(item[1].device, []).append(item)
        for device, items in by_device.items():
            states = [self.state[h] for _, h, _ in items]
            alphas = [-group["lr"] * site.scale * self.rms * math.sqrt(max(h.shape)) for group, h, site in items]
            step, momentum = _rows_step, self.momentum
            if self._rows_compiled:
                step = self._compiled_rows
                alphas = torch.tensor(alphas, dtype=torch.float32, device=device)
                momentum = torch.tensor(momentum, dtype=torch.float32, device=device)
            step([st["momentum_buffer"] for st in states], [h.grad for _, h, _ in items],
                 [st["row_step"] for st in states], [site.weight for _, _, site in items],
                 [site.idx for _, _, site in items], alphas, tuple(site.dim for _, _, site in items),
                 momentum, self.nesterov, self.ns_steps)

    def _create_state(self, p, site, group) -> None:
        if site is None:
            self._state(p, None, self._mode(group, p, None))
        else:
            self._init_state(p, site)

    def _init_state(self, handle, site) -> None:
        state = self.state[handle]
        if not state:
            if not site.full:
                state["row_step"] = torch.zeros(site.rank, dtype=torch.float32, device=handle.device)
            state["momentum_buffer"] = torch.zeros_like(handle, dtype=self.state_dtype or handle.dtype,
                                                        memory_format=torch.preserve_format)
            if self._rounding(handle, site) == "kahan":
                state["kahan_comp"] = torch.zeros_like(handle, dtype=site.weight.dtype)

    def _directions(self, handles: list) -> list[torch.Tensor]:
        """Advance the momentum of each projected weight (one ``_foreach`` call per device and
        dtype); return the directions to orthogonalize, in ``handles``' order."""
        out: list[torch.Tensor | None] = [None] * len(handles)
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(handles):
            buf = self.state[h]["momentum_buffer"]
            groups.setdefault((buf.device, buf.dtype), []).append(i)
        for (_, dtype), members in groups.items():
            bufs = [self.state[handles[i]]["momentum_buffer"] for i in members]
            grads = [handles[i].grad.to(dtype) for i in members]
            directions = _compat.foreach_momentum(bufs, grads, self.momentum, self.nesterov)
            for i, d in zip(members, directions):
                out[i] = d
        return out

    def _update_rows(self, handle, site, group, ortho) -> None:
        """Write the orthogonalized step ``ortho`` (handle-shaped) into one weight's selected rows."""
        state, mode = self.state[handle], self._rounding(handle, site)
        alpha = -group["lr"] * site.scale * self.rms * math.sqrt(max(ortho.shape[-2:]))
        update = site.flat(ortho)  # an expert stack: (E*r, n), rows as the weight's flat view
        decay = 1 - group["lr"] * group["weight_decay"]
        weight, comp = site.weight, state.get("kahan_comp")
        comp = None if comp is None else site.flat(comp)
        if site.full:
            weight.copy_(round_update(mode, weight.float() * decay + update * alpha, weight.dtype, comp))
            return
        state["row_step"].add_(1)
        # per-row factors only where rows differ: the re-warmup ramp, 1 / copies for a row
        # drawn more than once; otherwise every selected row gets the same step
        factor = (state["row_step"] / self.rewarmup).clamp(max=1.0) if self.rewarmup else None
        weights = row_weights(site, "once")
        if weights is not None:
            factor = weights if factor is None else factor * weights
        if factor is None:
            update = update * alpha
        else:
            update = update * broadcast_along(factor * alpha, update.dim(), site.dim)
        if decay != 1.0:
            owe(site, decay)  # the rows outside the selection
        firsts = first_copies(site.idx, site.rows) if weights is not None and mode != "nearest" else None
        add_to_rows(weight, site.dim, site.idx, update, mode, comp, firsts, decay if decay != 1.0 else None)
