"""The refresh state machine and the step counter of a grassfx model.

Every ``update_freq`` optimizer steps, the first forward with gradients on is a
*refresh*: :meth:`RefreshSchedule.begin_if_due` draws each site's selector noise, reads
the rows' ages when the site reserves rows for coverage, and makes a float64 *probe*; the refresh backward (``RefreshAnchor``) reports the new rows as the
probe's gradient, and a hook on the probe commits them into the site's ``idx``/``rho``
(in place: compiled graphs see new values without recompiling). The compressed gradient
of that same step already uses the new rows.

The step counter lives in the model's buffers (``grass_step``, ``grass_refreshed_at``,
so ``state_dict`` carries it); the optimizer advances it with :meth:`advance` and tells
:meth:`refresh_seen` when it handled committed refreshes (data-parallel checks hook in
there).

A refresh whose forward or backward raised (a skipped bad batch, an out-of-memory error)
is redone by the next forward with gradients on; rows a partial backward already
committed are replaced, and the optimizer still sees the rows of before the refresh
(``Site.commit`` keeps the first ``prev_idx`` until the optimizer handles it).
"""

from __future__ import annotations

import copy
import weakref

import torch

from grassfx import select as _select
from grassfx.errors import GrassError

__all__ = ["RefreshSchedule"]


class RefreshSchedule:
    """When a refresh is due, its probes and commits, and the step counter of one model."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.pending = set()  # indices of sites whose refresh backward has not run yet
        self.pending_ok = True  # False once a pending refresh saw a non-finite gradient
        self.on_refresh_seen = []  # callbacks run when the optimizer handles committed refreshes
        self.on_commit = []  # callbacks (schedule, site index) once a refresh backward has handled a site
        self.generation = 0  # counts forwards with gradients on; a refresh's probes carry theirs
        self.superseded = set()  # generations whose refresh a later forward replaced
        self.advanced_by = None  # (generation, optimizer id) of the last advance: one per forward

    #: the bookkeeping a step changes (:meth:`snapshot` / :meth:`restore`)
    _BOOKKEEPING = ("pending", "pending_ok", "generation", "superseded", "advanced_by")

    def snapshot(self) -> dict:
        """A copy of the bookkeeping forwards and steps change (pending refreshes, forward
        generations, the last advance), for :meth:`restore`."""
        return {key: copy.copy(getattr(self, key)) for key in self._BOOKKEEPING}

    def restore(self, snapshot: dict) -> None:
        """Put back what :meth:`snapshot` copied."""
        for key in self._BOOKKEEPING:
            setattr(self, key, snapshot[key])

    @property
    def model(self):
        return self._model()

    @property
    def config(self):
        return self.model.grass_config

    @property
    def sites(self):
        return self.model.sites

    @property
    def forwards(self) -> int:
        """Forwards with gradients on since the last optimizer step."""
        return self.generation - (self.advanced_by[0] if self.advanced_by is not None else 0)

    @property
    def step(self) -> int:
        return int(self.model.grass_step)

    def due(self) -> bool:
        model = self.model
        step = int(model.grass_step)
        return step % model.grass_config.update_freq == 0 and int(model.grass_refreshed_at) != step

    # -- the optimizer's side --------------------------------------------------------------
    def advance(self) -> None:
        """One optimizer step has been applied."""
        self.model.grass_step.add_(1)

    def refresh_seen(self) -> None:
        """The optimizer is about to step with rows committed by a refresh."""
        for callback in self.on_refresh_seen:
            callback()

    # -- the forward's side ------------------------------------------------------------------
    def begin_if_due(self):
        """``None`` or, per site, ``None`` or ``(probe, noise, age)`` for a refresh forward."""
        model = self.model
        if self.pending:  # that forward or its backward failed (or was abandoned): start over
            self.superseded.add(self.generation)
            self.pending.clear()
        self.generation += 1
        if not self.due():
            return None
        step = int(model.grass_step)
        seed = model.grass_config.seed
        plan = [None] * len(model.sites)
        for i, site in enumerate(model.sites):
            if site.full or not site.trainable:  # frozen by the user: keeps its rows
                continue
            gen = _select.site_generator(seed, site.index, step)
            if site.method == "uniform":
                site.commit(*_select.draw_uniform(site.rows, site.rank, gen, site.block_labels, site.blocks), step)
                continue
            noise, age, probe = _refresh_inputs(site, gen, step)
            probe.register_post_accumulate_grad_hook(self._commit_hook(i, self.generation))
            plan[i] = (probe, noise, age)
            self.pending.add(i)
        self.pending_ok = True
        if not self.pending:
            model.grass_refreshed_at.fill_(step)
            return None
        return plan

    def _commit_hook(self, i: int, generation: int):
        def hook(probe: torch.Tensor) -> None:
            record = probe.grad
            probe.grad = None
            commit(record)
            for callback in self.on_commit:  # an optimizer updating inside backward waits for it
                callback(self, i)

        def commit(record: torch.Tensor) -> None:
            if generation in self.superseded:
                raise GrassError(
                    "backward() of a refresh step's forward that a later forward superseded: at a "
                    f"refresh step (every update_freq={self.config.update_freq} optimizer steps) "
                    "call backward() on one forward's loss before the next forward with gradients "
                    "on (a forward that failed or was abandoned is simply redone)"
                )
            if generation != self.generation or i not in self.pending:
                return  # cancelled refresh
            self.pending.discard(i)
            model = self.model
            site = model.sites[i]
            if not self.pending_ok:
                return
            if not bool(torch.isfinite(record).all()) or not bool((record[1] > 0).all()):
                # NaN/Inf gradient: keep the old rows and refresh again on the next forward
                # (the optimizer refuses this step's non-finite compressed gradient).
                self.pending_ok = False
                return
            site.commit(record[0].round().long().clamp_(0, site.rows - 1), record[1].float(), int(model.grass_step))
            if not self.pending and self.pending_ok:
                model.grass_refreshed_at.fill_(int(model.grass_step))

        return hook

    def cancel(self) -> None:
        """Discard a refresh whose forward ran but whose backward will not run."""
        self.pending.clear()


def _refresh_inputs(site, gen: torch.Generator, step: int):
    """``(noise, age, probe)`` of one site's refresh forward (an expert stack makes its own)."""
    if hasattr(site, "refresh_inputs"):
        return site.refresh_inputs(gen, step)
    noise = _select.draw_noise(site.method, site.rows, site.rank, gen).to(site.idx.device)
    age = site.ages(step) if site.explore else torch.zeros(0, dtype=torch.float64, device=site.idx.device)
    probe = torch.zeros(2, site.rank, dtype=torch.float64, device=site.idx.device, requires_grad=True)
    return noise, age, probe
