"""Training-quality harness: each method at its tuned learning rate, several seeds, paired.

Every run is one ``grassfx train`` process (same code path as the main job): a LLaMA
preset trained from scratch on a real corpus, scored at the end on **every**
non-overlapping window of the fixed evaluation split (independent of seed and batch
size; see ``grassfx.recipes.data.eval_windows``). A *seed* fixes the initial weights, the batch
order and grassfx's selection noise, and every arm sees the same seeds, so differences
between arms are paired.

Procedure (per corpus and preset):

1. **Tune**: each arm with a grid runs every grid point at the tuning seed(s)
   (``--tune-seeds``, by default one seed that is *not* among the evaluation seeds);
   the point with the lowest final eval loss is the arm's tuned setting. Arms may take
   their tuned setting from another arm instead (``"like": "grass"``: ablations of one
   option run at the base arm's learning rate).
2. **Evaluate**: each arm at its tuned setting on ``--seeds`` (3 by default; an arm may
   ask for only the first few, ``"seeds": 2``, as the ablations do).
3. **Report**: mean eval loss in nats +- standard error over seeds, the paired difference
   against the reference arm (AdamW) per seed (mean +- standard error), perplexity,
   optimizer-state bytes, tokens/s; eval curves with seed bands (PNG); every run's raw
   summary (JSON). Finished runs are kept and reused when the same command runs again.

Usage::

    python benchmarks/quality.py --plan tiny --jobs 2 --out benchmarks/results/quality/tiny_shakespeare
    python benchmarks/quality.py --plan tiny --data movies --out benchmarks/results/quality/tiny_movies
    python benchmarks/quality.py --plan smoke --out /tmp/q     # a few steps, for tests

The plans live in :data:`PLANS` below: arms, grids and run lengths, in one place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# An arm: the ``grassfx train`` flags that define it, and either a grid (flag lists, one
# per point; the best point is its tuned setting) or ``like`` (reuse that arm's tuned point).
_LR = lambda *values: [["--lr", str(v)] for v in values]  # noqa: E731
# row-wise AdamW on the selected rows: what every grass arm ran before Muon became
# ``grassfx train``'s default row update (pinned, so these arms stay reproducible)
_GRASS_ADAM = ["--optimizer", "grass", "--grass-optimizer", "adamw"]
_GRASS_BASE = ["--update-freq", "12", "--moments", "keep_overlap", "--explore", "0.25", "--rewarmup", "10"]
_ADAMW = ["--optimizer", "adamw"]
_GALORE = ["--optimizer", "galore", "--update-freq", "12"]
_MUON_ROWS = ["--optimizer", "grass", "--grass-optimizer", "muon"] + _GRASS_BASE
_MUON = _MUON_ROWS + ["--rewarmup", "0"]  # grassfx train's grass run: Muon rows, no re-warmup
_DEFAULTS = ["--moments", "reset", "--explore", "0"]  # and its refresh options since tiny-defaults


def _scales(lr: str, *scales: str) -> list:
    """Grid points at one dense ``lr`` and several ``scale`` values (matrix step lr x scale)."""
    return [["--lr", lr, "--scale", sc] for sc in scales]


def _core_arms(adamw: dict, galore: dict, muon: dict) -> dict:
    """The three methods compared in every quality table, each with its grid (or point)."""
    return {"adamw": dict(flags=_ADAMW, **adamw), "galore": dict(flags=_GALORE, **galore),
            "grass-muon": dict(flags=_MUON, **muon)}


def _dense_lr_probes(lr: str, scale: str) -> list:
    """Two grid points with the matrix step ``lr * scale`` kept and the dense lr halved / doubled."""
    lr_f, sc_f = float(lr), float(scale)
    return [["--lr", f"{lr_f * k:g}", "--scale", f"{sc_f / k:g}"] for k in (0.5, 2.0)]

PLANS = {
    # 300 steps of 4 x 128 tokens on the tiny preset (5.3M parameters), 25 refresh windows
    # for grassfx (GaLore updates its projection as often). Each method tunes the learning
    # rate of everything it trains densely (embeddings, norms) and the step of its
    # projected weights (``--scale``) separately.
    "tiny": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            # --scale is, for AdamW, the lr multiplier of the attention/MLP weights (the ones
            # the other methods project): the last two points give embeddings and norms a
            # higher rate than the matrices, as the other methods' best points do
            "adamw": dict(flags=_ADAMW,
                          grid=_LR(5e-4, 1e-3, 2e-3) + [["--lr", lr, "--scale", sc] for lr, sc in
                                                       (("4e-3", "0.25"), ("8e-3", "0.125"),
                                                        ("16e-3", "0.0625"))]),
            "galore": dict(flags=_GALORE,
                           grid=[["--lr", lr, "--scale", sc] for lr, sc in
                                 (("1e-3", "1"), ("2e-3", "1"), ("1e-3", "2"), ("4e-3", "1"), ("8e-3", "1"),
                                  ("8e-3", "0.5"), ("16e-3", "0.25"), ("32e-3", "0.125"))]),
            # the candidate default: kept moments, a quarter of the rank for coverage, new
            # rows re-warmed over 10 steps
            "grass": dict(flags=_GRASS_ADAM + _GRASS_BASE,
                          grid=[["--lr", lr, "--scale", sc] for lr, sc in
                                (("1e-3", "1"), ("1e-3", "2"), ("2e-3", "2"), ("2e-3", "1"), ("4e-3", "1"),
                                 ("4e-3", "0.5"))]),
            # equal optimizer memory to GaLore: select along the smaller side, as GaLore projects
            "grass-smaller": dict(flags=_GRASS_ADAM + ["--proj-dim", "smaller"] + _GRASS_BASE, like="grass",
                                  seeds=1),
            # ablations of the candidate, one option each, on the first seed (paired with it)
            "grass-no-explore": dict(flags=_GRASS_ADAM + _GRASS_BASE + ["--explore", "0"],
                                     like="grass", seeds=1),
            "grass-no-rewarmup": dict(flags=_GRASS_ADAM + _GRASS_BASE + ["--rewarmup", "0"],
                                      like="grass", seeds=1),
            "grass-reset": dict(flags=_GRASS_ADAM + _GRASS_BASE + ["--moments", "reset"],
                                like="grass", seeds=1),
            # the selected rows trained by grassfx.optim.Muon (orthogonalized momentum, half the
            # state) instead of AdamW; everything else AdamW at the same lr. No re-warmup: the
            # orthogonalization sets each row's step size (its ablation below puts it back)
            "grass-muon": dict(flags=_MUON,
                               grid=[["--lr", lr, "--scale", sc] for lr, sc in
                                     (("4e-3", "1"), ("8e-3", "1"), ("4e-3", "2"), ("8e-3", "0.5"),
                                      ("16e-3", "1"), ("16e-3", "0.25"), ("32e-3", "0.125"))]),
            # single-option ablations of the default (grass-muon), 3 seeds each, paired with it:
            # no coverage rows, and moments reset at every refresh instead of kept
            "grass-muon-no-explore": dict(flags=_MUON + ["--explore", "0"], like="grass-muon"),
            "grass-muon-reset": dict(flags=_MUON + ["--moments", "reset"], like="grass-muon"),
            "grass-muon-reset-no-explore": dict(flags=_MUON + ["--moments", "reset", "--explore", "0"],
                                                like="grass-muon"),
            # reference: the same optimizer with every row of every weight (rank >= rows: no
            # selection), i.e. Muon on full matrices; how much of its gain row selection keeps.
            # It and the re-warmup ablation ran at grass-muon's tuned point of the grid's first
            # four points (8e-3 / 0.5), before the grid was widened to larger lr
            "muon-full": dict(flags=_MUON + ["--rank", "688"], point=["--lr", "8e-3", "--scale", "0.5"],
                              seeds=1),
            "grass-muon-rewarmup": dict(flags=_MUON_ROWS,
                                        point=["--lr", "8e-3", "--scale", "0.5"], seeds=1),
            # the previous defaults (one refresh per 200 steps, reset, no coverage, no re-warmup)
            "grass-before": dict(flags=_GRASS_ADAM + ["--update-freq", "200", "--moments", "reset",
                                        "--explore", "0", "--rewarmup", "0"], like="grass", seeds=1),
        },
        reference="adamw",
        second="galore",
    ),
    # Fused q|k|v weights (GPT-2's c_attn): row selection per block (q, k, v each get a third
    # of the rank) against selection over the whole fused weight, with the tiny plan's
    # settings and the grass arm's tuned point (no tuning: ``point``). Run with --model gpt2.
    "tiny-blocks": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            "grass-blocks": dict(flags=_GRASS_ADAM + _GRASS_BASE, point=["--lr", "2e-3", "--scale", "1"]),
            "grass-no-blocks": dict(flags=_GRASS_ADAM + _GRASS_BASE + ["--blocks", "none"],
                                    like="grass-blocks"),
            # without coverage rows, top_r alone decides which block trains
            "grass-blocks-no-explore": dict(flags=_GRASS_ADAM + _GRASS_BASE + ["--explore", "0"],
                                            like="grass-blocks"),
            "grass-no-blocks-no-explore": dict(flags=_GRASS_ADAM + _GRASS_BASE
                                               + ["--explore", "0", "--blocks", "none"], like="grass-blocks"),
        },
        reference="grass-no-blocks",
    ),
    # The `small` preset (20.5M parameters, 8 layers, d 384, rank 128) at the tiny plan's
    # run length, each method at its point tuned on the tiny preset (no grid: CPU time),
    # grassfx with Muon rows as `grass train` runs it by default.
    "small-transfer": dict(
        preset="small", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=128,
        arms=_core_arms(dict(point=["--lr", "16e-3", "--scale", "0.0625"]),
                        dict(point=["--lr", "16e-3", "--scale", "0.25"]),
                        dict(point=["--lr", "32e-3", "--scale", "0.125"])),
        reference="adamw",
        second="galore",
    ),
    # The `small` preset (20.5M parameters, 8 layers, d 384, rank 128), tuned: each method's
    # matrix step at 1/2, 1 and 2 times its point tuned on the tiny preset, the dense lr
    # (embeddings, norms) kept at that point's; extended where the best point was at an
    # edge (GaLore and grassfx: 1/4), then the dense lr halved and doubled at the best
    # matrix step (_dense_lr_probes), and quadrupled where doubling won (GaLore, grassfx;
    # GaLore also at the lower matrix step, where its two best steps had tied).
    # 25 refresh windows, 3 evaluation seeds.
    "small": dict(
        preset="small", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=128,
        arms=_core_arms(
            dict(grid=_scales("16e-3", "0.03125", "0.0625", "0.125") + _dense_lr_probes("16e-3", "0.0625")),
            dict(grid=_scales("16e-3", "0.125", "0.25", "0.5", "0.0625") + _dense_lr_probes("16e-3", "0.125")
                 + _scales("0.064", "0.03125") + _scales("0.032", "0.03125")),
            dict(grid=_scales("32e-3", "0.0625", "0.125", "0.25", "0.03125") + _dense_lr_probes("32e-3", "0.0625")
                 + _scales("0.128", "0.015625"))),
        reference="adamw",
        second="galore",
    ),
    # The tiny plan's tuned points against the matrix step halved (the tiny grids probed
    # AdamW's and grassfx's matrix step only at other dense lrs; on `small` and on movies the
    # best matrix steps were lower than on tiny): a check of the Shakespeare table.
    "tiny-matrix-probe": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms=_core_arms(dict(grid=_scales("16e-3", "0.0625", "0.03125", "0.015625", "0.0078125")),
                        dict(grid=_scales("16e-3", "0.25", "0.125")),
                        dict(grid=_scales("32e-3", "0.125", "0.0625"))),
        reference="adamw",
        second="galore",
    ),
    # A second corpus at the tiny preset: each method's point tuned on Shakespeare and its
    # matrix step halved and doubled (the dense lr kept), tuned again on this corpus; every
    # method's best was the halved step, so the grids go one halving further and probe the
    # dense lr x0.5 and x2 there; a second round then walked each method's best point one
    # more step along the axes where it still sat on an edge.
    "tiny-second-corpus": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms=_core_arms(
            dict(grid=_scales("16e-3", "0.0625", "0.03125", "0.125", "0.015625") + _dense_lr_probes("16e-3", "0.03125")
                 + [p for lr in ("16e-3", "0.032", "0.064") for p in _scales(lr, "0.0078125")]),
            dict(grid=_scales("16e-3", "0.25", "0.125", "0.5", "0.0625") + _dense_lr_probes("16e-3", "0.125")
                 + [p for lr in ("16e-3", "0.032", "0.064") for p in _scales(lr, "0.03125")]),
            dict(grid=_scales("32e-3", "0.125", "0.0625", "0.25", "0.03125") + _dense_lr_probes("32e-3", "0.0625")
                 + _scales("0.128", "0.015625") + _scales("0.064", "0.015625"))),
        reference="adamw",
        second="galore",
    ),
    # grassfx train's grass defaults switched to moments="reset", explore=0 (both better under
    # Muon at the old tuned point, tiny plan's ablations): the new setting re-tuned around
    # that point (matrix step x0.5, x2; dense lr x0.5, x2 at the matrix step kept), paired
    # against the old setting and AdamW at its re-checked point (tiny-matrix-probe). The
    # doubled dense lr won at the grid's edge, so a second round walked one step further
    # along each axis from it (dense lr x2 again; matrix step x0.5, x2).
    "tiny-defaults": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            "adamw": dict(flags=_ADAMW, point=["--lr", "16e-3", "--scale", "0.015625"]),
            "grass-muon": dict(flags=_MUON, point=["--lr", "32e-3", "--scale", "0.125"]),
            "grass-muon-reset-no-explore": dict(
                flags=_MUON + ["--moments", "reset", "--explore", "0"],
                grid=_scales("32e-3", "0.125", "0.0625", "0.25") + _dense_lr_probes("32e-3", "0.125")
                + _scales("0.064", "0.125", "0.03125") + _scales("0.128", "0.03125")),
        },
        reference="adamw",
        second="grass-muon",
    ),
    # The state of the matrices grassfx trains in full (the tiny preset's tied embedding and
    # head: 2.1M of its 5.3M parameters) factored, grassfx.optim.AdamW(full_state=...): the first
    # moment kept and the second factored, or the factored second moment alone, each at the
    # default's point and with the dense lr halved and doubled (matrix step kept), paired
    # against the default (both moments in full) and AdamW. Both preferred the halved lr, at
    # the grid's edge, so a second round halved it again, and a third (still the edge) again;
    # the factored second moment alone kept improving there, so a fourth round went two more
    # halvings down for it.
    "tiny-full-state": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            "grass-muon": dict(flags=_MUON + _DEFAULTS, point=["--lr", "64e-3", "--scale", "0.0625"]),
            "grass-factored": dict(flags=_MUON + _DEFAULTS + ["--full-state", "factored"],
                                   grid=_scales("0.064", "0.0625") + _dense_lr_probes("0.064", "0.0625")
                                   + _scales("0.016", "0.25") + _scales("0.008", "0.5")),
            "grass-factored-nomomentum": dict(flags=_MUON + _DEFAULTS + ["--full-state", "factored_nomomentum"],
                                              grid=_scales("0.064", "0.0625") + _dense_lr_probes("0.064", "0.0625")
                                              + _scales("0.016", "0.25") + _scales("0.008", "0.5")
                                              + _scales("0.004", "1") + _scales("0.002", "2")),
            "adamw": dict(flags=_ADAMW, point=["--lr", "16e-3", "--scale", "0.015625"]),
        },
        reference="grass-muon",
        second="adamw",
    ),
    # The factored second moment alone (full_state="factored_nomomentum", the better of the two
    # on tiny) on the `small` preset, whose embedding and head are untied (2 x 8192 x 384, 6.3M
    # of 20.5M parameters), as in the 444M model of benchmarks/memory_check.py: its dense lr
    # tuned around tiny's ratio to the default's (1/8), the matrix step kept at the default's
    # point on `small` (plan small); paired against that default. The lowest lr won, so the
    # grid went one halving further; the first moment kept (full_state="factored") was added
    # around tiny's tuned ratio (1/4), and walked up to the default's dense lr after its
    # highest point (0.032) won; 0.064 lost to it.
    "small-full-state": dict(
        preset="small", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=128,
        arms={
            "grass-muon": dict(flags=_MUON + _DEFAULTS, point=["--lr", "0.064", "--scale", "0.03125"]),
            "grass-factored-nomomentum": dict(flags=_MUON + _DEFAULTS + ["--full-state", "factored_nomomentum"],
                                              grid=_scales("0.008", "0.25") + _scales("0.004", "0.5")
                                              + _scales("0.016", "0.125") + _scales("0.002", "1")),
            "grass-factored": dict(flags=_MUON + _DEFAULTS + ["--full-state", "factored"],
                                   grid=_scales("0.016", "0.125") + _scales("0.008", "0.25")
                                   + _scales("0.032", "0.0625") + _scales("0.064", "0.03125")),
            # the input embedding without the first moment, the head with it (both factored):
            # at grass-factored's tuned point
            "grass-factored-split": dict(flags=_MUON + _DEFAULTS + ["--full-state", "factored",
                                                                    "--embedding-full-state", "factored_nomomentum"],
                                         like="grass-factored"),
        },
        reference="grass-muon",
    ),
    # Dense Muon (grassfx train --optimizer muon: torch.optim.Muon on the attention/MLP matrices,
    # one (m x n) momentum each, AdamW on the rest) against grassfx's Muon rows and AdamW at
    # their tuned points (plan tiny-defaults): what row selection costs. Its grid is the
    # others' style around grassfx's point (same lr / scale meaning: torch's
    # adjust_lr_fn="match_rms_adamw" is grassfx.optim.Muon's step size): matrix step x0.5 and
    # x2, dense lr x0.5 and x2 at the matrix step kept; the halved dense lr won, at the edge,
    # so a second round walked one step further from it (dense lr x0.5 again; matrix step
    # x0.5). Then single-option ablations of grass at its point, paired with it: twice the
    # rank, twice as many refreshes.
    "tiny-dense-muon": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            "muon": dict(flags=["--optimizer", "muon"],
                         grid=_scales("64e-3", "0.0625", "0.03125", "0.125") + _dense_lr_probes("64e-3", "0.0625")
                         + _scales("0.016", "0.25") + _scales("0.032", "0.0625")),
            "grass": dict(flags=_MUON + _DEFAULTS, point=["--lr", "64e-3", "--scale", "0.0625"]),
            "adamw": dict(flags=_ADAMW, point=["--lr", "16e-3", "--scale", "0.015625"]),
            "grass-rank128": dict(flags=_MUON + _DEFAULTS + ["--rank", "128"], like="grass"),
            "grass-freq6": dict(flags=_MUON + _DEFAULTS + ["--update-freq", "6"], like="grass"),
        },
        reference="muon",
        second="adamw",
    ),
    # Closing the gap to dense Muon at a quarter of its matrix state (tiny preset): dense Muon's
    # 28 momenta hold 12.06 MiB, so grassfx may keep 3.01 MiB, i.e. 108 rows of 256 per matrix
    # (2.98 MiB with the row indices) against the default's 64 (1.76 MiB). grass-r108 is tuned
    # around the default's point (matrix step x0.5, x2; dense lr x0.5 at the step kept, which
    # won at the edge, so a second round halved the dense lr again); then
    # single-option ablations at its point, paired with it: the same budget spread as one
    # fraction of every weight's rows (--rank 0.245: 63 rows of each 256-row attention matrix,
    # 169 of each 688-row MLP matrix, 2.99 MiB) and windows twice as long. Dense Muon, the
    # default (rank 64) and AdamW rerun at their tuned points for pairing.
    "tiny-muon-gap": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            "muon": dict(flags=["--optimizer", "muon"], point=["--lr", "32e-3", "--scale", "0.125"]),
            "grass": dict(flags=_MUON + _DEFAULTS, point=["--lr", "64e-3", "--scale", "0.0625"]),
            "grass-r108": dict(flags=_MUON + _DEFAULTS + ["--rank", "108"],
                               grid=_scales("64e-3", "0.0625", "0.03125", "0.125") + _scales("32e-3", "0.125")
                               + _scales("16e-3", "0.25")),
            "grass-r108-fraction": dict(flags=_MUON + _DEFAULTS + ["--rank", "0.245"], like="grass-r108"),
            "grass-r108-freq24": dict(flags=_MUON + _DEFAULTS + ["--rank", "108", "--update-freq", "24"],
                                      like="grass-r108"),
        },
        reference="muon",
        second="grass",
    ),
    # Dense Muon on the `small` preset (20.5M parameters; rank 128 puts grassfx's matrix state at
    # 0.19 of dense Muon's: 56 (128 x 384) momenta against 56 full ones), tuned on the tiny
    # plan's style, lightly (a dense-Muon run on `small` takes ~11 minutes on a core): matrix
    # step 2e-3 (grassfx's on small) and 4e-3 (dense Muon's on tiny) at dense lr 32e-3 (dense
    # Muon's on tiny); 3 seeds, paired with grassfx at its point on small (plan
    # small-full-state's grass-muon: the same flags and seeds, whose runs repeat exactly
    # between processes).
    "small-dense-muon": dict(
        preset="small", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=128,
        arms={
            "muon": dict(flags=["--optimizer", "muon"],
                         grid=_scales("32e-3", "0.0625", "0.125")),
            "grass": dict(flags=_MUON + _DEFAULTS, point=["--lr", "0.064", "--scale", "0.03125"]),
        },
        reference="muon",
    ),
    # APOLLO and APOLLO-Mini (grassfx train --optimizer apollo / apollo-mini: the apollo-torch
    # package, random projection, channel- / tensor-wise scaling; recipes/optimizers.py), tuned
    # on one axis of the others' grid: the dense lr at GaLore's 16e-3, the matrix step (--scale,
    # whose square is the package's ``scale``) in doublings: for APOLLO (rank 64, as GaLore's and
    # grassfx's) from GaLore's point, and downward after it lost at 0.25; for APOLLO-Mini around
    # the package README's setting (its scale 128 at lr 1e-2 is a matrix step of ~0.11; here
    # 0.032-0.128), and downward after 4 lost to 2. The dense lr is not tuned (CPU time). 3 seeds, paired by hand with grassfx's
    # default and AdamW, whose runs at the same seeds repeat exactly between processes.
    "tiny-apollo": dict(
        preset="tiny", steps=300, batch_size=4, seq_len=128, eval_every=50, eval_windows=32, rank=64,
        arms={
            "apollo": dict(flags=["--optimizer", "apollo", "--update-freq", "12"],
                           grid=_scales("16e-3", "0.0625", "0.125", "0.25")),
            "apollo-mini": dict(flags=["--optimizer", "apollo-mini", "--update-freq", "12"],
                                grid=_scales("16e-3", "2", "4", "8", "1", "0.5")),
            "grass": dict(flags=_MUON + _DEFAULTS, point=["--lr", "64e-3", "--scale", "0.0625"]),
            "adamw": dict(flags=_ADAMW, point=["--lr", "16e-3", "--scale", "0.015625"]),
        },
        reference="grass",
        second="adamw",
    ),
    # CI smoke: the whole procedure on the test preset in a few steps.
    "smoke": dict(
        preset="test", steps=4, batch_size=2, seq_len=32, eval_every=2, eval_windows=2, rank=8,
        arms={
            "adamw": dict(flags=_ADAMW, grid=_LR(1e-3, 3e-3)),
            "grass": dict(flags=["--optimizer", "grass"], grid=_LR(3e-3)),
            "grass-cover": dict(flags=["--optimizer", "grass", "--explore", "0.25"], like="grass"),
            "grass-adamw-rows": dict(flags=["--optimizer", "grass", "--grass-optimizer", "adamw"], like="grass"),
            "muon": dict(flags=["--optimizer", "muon"], grid=_LR(3e-3)),
        },
        reference="adamw",
        second="grass",
    ),
}


# ----------------------------------------------------------------------------- running


def run_dir(out: Path, arm: str, point: list[str], seed: int) -> Path:
    """Folder of one run: arm, grid point and seed in a readable name."""
    tag = "_".join(p.lstrip("-").replace("/", "-") for p in point) or "base"
    return out / "runs" / f"{arm}__{tag}__seed{seed}"


def train_argv(plan: dict, args, flags: list[str], seed: int, folder: Path) -> list[str]:
    """The ``grassfx train`` command line of one run."""
    argv = ["--preset", plan["preset"], "--steps", str(plan["steps"]), "--batch-size", str(plan["batch_size"]),
            "--seq-len", str(plan["seq_len"]), "--eval-every", str(plan["eval_every"]),
            "--eval-windows", str(plan["eval_windows"]),
            "--rank", str(plan["rank"]), "--seed", str(seed), "--threads", str(args.threads),
            "--backend", args.backend, "--no-progress", "--out", str(folder)]
    if args.data:
        argv += ["--data", args.data]
    if args.model != "llama":
        argv += ["--arch", args.model]
    return argv + flags


def run_one(plan: dict, args, arm: str, flags: list[str], point: list[str], seed: int) -> dict:
    """Train one run in its own process (or reuse its finished result); returns its record."""
    folder = run_dir(Path(args.out), arm, point, seed)
    argv = train_argv(plan, args, flags + point, seed, folder)
    if not args.report_only:
        _wait_for_other(folder)
    if (folder / "summary.json").is_file():  # finished before (summary.json is written at the end)
        return _record(folder, arm, point, seed, argv, wall_s=float("nan"))
    if args.report_only:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.inprocess:  # tests: no process start-up per run (memory figures then mix runs)
        from grassfx.recipes import train

        train.run(argv)
    else:
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "grassfx.train", *argv], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, text=True)
            (folder / "pid").write_text(str(proc.pid))  # another harness on this folder waits for it
            proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"run {folder.name} failed (exit {proc.returncode}); see {folder / 'log.txt'}:\n"
                               + (folder / "log.txt").read_text()[-2000:])
    return _record(folder, arm, point, seed, argv, wall_s=time.perf_counter() - t0)


def _wait_for_other(folder: Path) -> None:
    """If another harness process is training this run right now, wait for it to finish."""
    try:
        pid = int((folder / "pid").read_text())
    except (OSError, ValueError):
        return
    while not (folder / "summary.json").is_file():
        try:
            os.kill(pid, 0)
        except OSError:  # that process is gone without finishing: train the run here
            return
        time.sleep(10)


def _record(folder: Path, arm: str, point: list[str], seed: int, argv: list[str], wall_s: float) -> dict:
    """The record of a finished run, read from its ``summary.json`` and ``metrics.jsonl``."""
    config = json.loads((folder / "config.json").read_text())
    for flag, key in (("--seed", "seed"), ("--steps", "steps"), ("--preset", "preset")):
        if str(config[key]) != argv[argv.index(flag) + 1]:
            raise RuntimeError(f"{folder} holds a run with {key}={config[key]}, not this command's; "
                               "use another --out or delete it")
    summary = json.loads((folder / "summary.json").read_text())
    (_, result), = summary.items()
    with open(folder / "metrics.jsonl") as f:
        curve = [(r["step"], r["eval_curve"]) for r in map(json.loads, f) if "eval_curve" in r]
    return dict(arm=arm, point=point, seed=seed, argv=argv, wall_s=wall_s,
                eval_loss=result["eval_loss"], train_loss=result["train_loss"],
                tokens_per_s=result["tokens_per_s"], optimizer_state_bytes=result["optimizer_state_bytes"],
                peak_mem_bytes=result["peak_mem_bytes"], curve=curve, summary=result)


def run_many(jobs: list, plan: dict, args) -> list[dict]:
    """Run ``(arm, flags, point, seed)`` jobs, ``--jobs`` at a time; prints one line per run."""
    results = []

    def one(job):
        rec = run_one(plan, args, *job)
        if rec is None:
            print(f"  {job[0]:<16} {' '.join(job[2]):<24} seed {job[3]:<4} not finished: left out", flush=True)
            return None
        print(f"  {rec['arm']:<16} {' '.join(rec['point']) or '-':<24} seed {rec['seed']:<4} "
              f"eval {rec['eval_loss']:.4f}  ({rec['wall_s']:.0f} s)", flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = [r for r in pool.map(one, jobs) if r is not None]
    return results


# ----------------------------------------------------------------------------- statistics


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, se


def tune(plan: dict, args) -> dict:
    """Stage 1: every grid point of every arm at the tuning seeds; returns {arm: best point}."""
    jobs = [(arm, spec["flags"], point, seed) for arm, spec in plan["arms"].items() if "grid" in spec
            for point in spec["grid"] for seed in args.tune_seeds]
    print(f"tuning: {len(jobs)} runs", flush=True)
    records = run_many(jobs, plan, args)
    best, table = {}, {}
    for arm, spec in plan["arms"].items():
        if "grid" not in spec:
            continue
        scores = []
        for point in spec["grid"]:
            losses = [r["eval_loss"] for r in records if r["arm"] == arm and r["point"] == point]
            if losses:
                scores.append((statistics.fmean(losses), point))
        if not scores:
            raise SystemExit(f"no finished tuning run of {arm!r}")
        table[arm] = [dict(point=p, eval_loss=v) for v, p in scores]
        best[arm] = min(scores, key=lambda x: x[0])[1]
        if best[arm] in (spec["grid"][0], spec["grid"][-1]) and len(spec["grid"]) > 2:
            print(f"  note: {arm}'s best point {best[arm]} is at the edge of its grid", flush=True)
    for arm, spec in plan["arms"].items():
        if "point" in spec:  # a fixed setting: not tuned
            best[arm] = spec["point"]
    for arm, spec in plan["arms"].items():
        if "like" in spec:
            best[arm] = best[spec["like"]]
    return dict(best=best, grid=table, runs=records)


def evaluate_arms(plan: dict, args, best: dict) -> list[dict]:
    """Stage 2: each arm at its tuned point on every evaluation seed."""
    jobs = [(arm, spec["flags"], best[arm], seed) for arm, spec in plan["arms"].items()
            for seed in args.seeds[: spec.get("seeds", len(args.seeds))]]
    print(f"evaluating: {len(jobs)} runs", flush=True)
    return run_many(jobs, plan, args)


def summarize(plan: dict, records: list[dict], best: dict) -> dict:
    """Per arm: mean +- s.e. of eval loss, paired differences against the reference arm."""
    ref = plan["reference"]
    by_arm: dict = {}
    for r in records:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    out = {}
    for arm, runs in by_arm.items():
        seeds = sorted(runs)
        losses = [runs[s]["eval_loss"] for s in seeds]
        m, se = mean_se(losses)
        row = dict(point=best[arm], seeds=seeds, eval_loss=losses, mean=m, se=se, ppl=math.exp(m),
                   optimizer_state_bytes=statistics.fmean(runs[s]["optimizer_state_bytes"] for s in seeds),
                   tokens_per_s=statistics.fmean(runs[s]["tokens_per_s"] for s in seeds))
        if ref in by_arm and arm != ref:
            row.update(_paired(runs, by_arm[ref]))
        second = plan.get("second")
        if second in by_arm and arm != second:  # e.g. GaLore: the other method grassfx must match
            row["vs_second"] = dict(_paired(runs, by_arm[second]), base=second)
        base = plan["arms"].get(arm, {}).get("like")
        if base in by_arm:  # an ablation: also paired against the arm it varies
            row["vs_base"] = dict(_paired(runs, by_arm[base]), base=base)
        out[arm] = row
    return out


def _paired(runs: dict, ref: dict) -> dict:
    """Per-seed differences ``runs - ref`` of eval loss over the seeds both have."""
    diffs = [runs[s]["eval_loss"] - ref[s]["eval_loss"] for s in sorted(runs) if s in ref]
    if not diffs:
        return {}
    dm, dse = mean_se(diffs)
    return dict(diff=diffs, diff_mean=dm, diff_se=dse, ppl_ratio=math.exp(dm))


def _vs(row: dict, key: str) -> str:
    vs = row.get(key)
    return f"{vs['base']}: {vs['diff_mean']:+.4f} ± {vs['diff_se']:.4f}" if vs and "diff_mean" in vs else "—"


def table(summary: dict, ref: str, second: str | None = None) -> str:
    """Markdown table of :func:`summarize`'s result (a ``second`` reference adds its paired column)."""
    extra = f" Δ vs {second} (paired, nats) |" if second else ""
    lines = [f"| arm | tuned setting | seeds | eval loss (nats), mean ± s.e. | ppl | Δ vs {ref} (paired, nats) | "
             f"ppl ratio |{extra} Δ vs the arm it varies | optimizer state | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if second else "")]
    for arm, row in summary.items():
        diff = (f"{row['diff_mean']:+.4f} ± {row['diff_se']:.4f}" if "diff_mean" in row else "—")
        ratio = f"{row['ppl_ratio']:.3f}" if "ppl_ratio" in row else "—"
        col = f" {_vs(row, 'vs_second')} |" if second else ""
        lines.append(f"| {arm} | `{' '.join(row['point'])}` | {len(row['seeds'])} | {row['mean']:.4f} ± {row['se']:.4f} | "
                     f"{row['ppl']:.1f} | {diff} | {ratio} |{col} {_vs(row, 'vs_base')} | "
                     f"{row['optimizer_state_bytes'] / 2**20:.1f} MiB | {row['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> bool:
    """Eval-loss curves, mean over seeds with a min-max band per arm (PNG); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    arms = list(dict.fromkeys(r["arm"] for r in records))
    for i, arm in enumerate(arms):
        curves = [dict(r["curve"]) for r in records if r["arm"] == arm]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        lo = [min(c[s] for c in curves) for s in steps]
        hi = [max(c[s] for c in curves) for s in steps]
        ax.plot(steps, mean, color=f"C{i}", label=arm)
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tail = [v for r in records for s, v in r["curve"] if s >= records[0]["curve"][-1][0] // 3]
    if tail:
        ax.set_ylim(min(tail) - 0.05, max(tail) + 0.1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- entry point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="tiny", choices=list(PLANS), help="arms, grids and run length")
    p.add_argument("--model", default="llama", choices=["llama", "gpt2"],
                   help="architecture of every run at the plan's preset size (grassfx train --arch)")
    p.add_argument("--data", default=None, help="corpus (grassfx train --data): shakespeare (default), movies, a path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[100], help="seeds of the tuning runs")
    p.add_argument("--arms", nargs="+", default=None, help="run only these arms of the plan (and what they are like)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--backend", default="eager", help="grassfx train --backend (same numbers; eager is fastest to start)")
    p.add_argument("--out", required=True, help="output folder (finished runs in it are reused)")
    p.add_argument("--inprocess", action="store_true", help="train in this process, one run at a time (tests)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the runs in --out that have finished (others are listed as left out)")
    p.add_argument("--tuned-from", default=None,
                   help="a quality.json of an earlier run: use its tuned points instead of tuning again "
                        "(e.g. evaluate on a second corpus at the settings tuned on the first)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = dict(PLANS[args.plan])
    if args.arms:
        keep = set(args.arms)
        keep |= {plan["arms"][a]["like"] for a in args.arms if "like" in plan["arms"].get(a, {})}
        unknown = keep - set(plan["arms"])
        if unknown:
            raise SystemExit(f"unknown arm(s) {sorted(unknown)}; the plan has {sorted(plan['arms'])}")
        plan["arms"] = {a: s for a, s in plan["arms"].items() if a in keep}
    if args.tuned_from:
        tuned = json.loads(Path(args.tuned_from).read_text())["tuned"]
        missing = [a for a, spec in plan["arms"].items() if "grid" in spec and a not in tuned]
        if missing:
            raise SystemExit(f"{args.tuned_from} has no tuned point for {missing}")
        plan["arms"] = {a: dict(spec, grid=[tuned[a]]) if "grid" in spec else spec
                        for a, spec in plan["arms"].items()}
    if args.inprocess:
        args.jobs = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tuned = tune(plan, args)
    records = evaluate_arms(plan, args, tuned["best"])
    summary = summarize(plan, records, tuned["best"])
    result = dict(plan=args.plan, preset=plan["preset"], model=args.model, steps=plan["steps"], data=args.data or "shakespeare",
                  seeds=args.seeds, tune_seeds=args.tune_seeds, backend=args.backend,
                  command="python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=time.strftime("%Y-%m-%d"), machine=f"{os.cpu_count()} CPUs, {sys.platform}",
                  tuned=tuned["best"], grid=tuned["grid"], summary=summary,
                  runs=tuned["runs"] + records, wall_s=time.perf_counter() - t0)
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(summary, plan["reference"], plan.get("second"))
    (out / "quality.md").write_text(text + "\n")
    arch_name = "GPT-2" if args.model == "gpt2" else "LLaMA"
    plot(records, out / "curves.png", f"{plan['preset']} {arch_name}, {plan['steps']} steps, {result['data']}: "
                                      f"eval loss, mean and range over seeds {args.seeds}")
    print("\n" + text)
    print(f"\nwrote {out}/quality.json, quality.md, curves.png ({time.perf_counter() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
