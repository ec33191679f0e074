"""The command line of ``grassfx train``: flags, per-optimizer settings and the runs they ask for.

``--lr``, ``--scale`` and ``--update-freq`` take one value for every optimizer or
``OPTIMIZER=VALUE`` (repeatable, ``--lr 2e-3 --lr grass=5e-3``); :func:`setting` reads
them, falling back to each optimizer's tuned defaults in :data:`RECOMMENDED`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from . import presets as presets_mod

__all__ = ["OPTIMIZERS", "PROJECTED", "DEMO_OPTIMIZERS", "SELECTIONS", "BACKENDS", "RECOMMENDED", "DEMO_DEFAULTS", "RunSpec", "setting",
           "grass_setting", "projection_rank", "apollo_settings", "grass_compile_settings", "grass_optimizer_settings", "check_run_settings",
           "training_settings", "build_parser", "parse_args", "run_optimizers", "run_specs"]

OPTIMIZERS = ("adamw", "galore", "grass", "muon", "apollo", "apollo-mini")
# the runs with a projection (a rank and a refresh interval)
PROJECTED = ("galore", "grass", "apollo", "apollo-mini")
# what --demo compares (--compare runs every optimizer)
DEMO_OPTIMIZERS = ("adamw", "galore", "grass", "muon")
SELECTIONS = ("top_r", "multinorm", "multinorm_nr", "uniform")
BACKENDS = ("eager", "aot_eager", "inductor")

# Each optimizer's settings when the command line does not name them: the best point of
# each method's grid in benchmarks/quality.py (tiny preset, Shakespeare, 300 steps, tuning
# seed 100; benchmarks/RESULTS.md section 3). ``lr`` is the rate of what the method trains
# densely (embeddings, norms) and ``scale`` multiplies it for the attention/MLP weights
# (for AdamW too), so every method got the same two-dimensional grid: each preferred a
# high rate for the embeddings and a lower one for the matrices (AdamW 16e-3 / 2.5e-4,
# after the tiny-matrix-probe plan walked its matrix step down; GaLore 16e-3 / 4e-3;
# grassfx 64e-3 / 4e-3, plan tiny-defaults). grassfx's selected rows train with
# grassfx.optim.Muon (0.34 nats better than row-wise AdamW at the same seeds), with the
# momentum reset at each refresh and the whole rank on top_r (each better under Muon than
# keeping the overlap's momentum and giving a quarter of the rank to coverage: -0.035 nats
# together, 3 seeds), without re-warmup (worse with Muon: +0.014 nats at the tuning seed).
RECOMMENDED = {
    "adamw": dict(lr=16e-3, scale=0.015625),
    "galore": dict(lr=16e-3, scale=0.25, windows=25),
    "grass": dict(lr=64e-3, scale=0.0625, windows=25, moments="reset", explore=0.0, rewarmup=0,
                  optimizer="muon"),
    # dense Muon (torch.optim.Muon on the attention/MLP matrices, AdamW on the rest;
    # recipes/muon.py): ``lr`` for AdamW, ``lr * scale`` for Muon with torch's
    # adjust_lr_fn="match_rms_adamw", the step size convention of grassfx.optim.Muon.
    # Tuned on the same grid style (plan tiny-dense-muon): matrix step 4e-3 as grassfx's,
    # dense lr half of grassfx's
    "muon": dict(lr=32e-3, scale=0.125),
    # APOLLO / APOLLO-Mini (recipes/optimizers.py): ``scale`` multiplies the matrices' step
    # (the package's own ``scale`` is its square). Tuned along the matrix step at GaLore's
    # dense lr (plan tiny-apollo; the dense lr not tuned): both best points interior
    "apollo": dict(lr=16e-3, scale=0.125, windows=25),
    "apollo-mini": dict(lr=16e-3, scale=1.0, windows=25),
}

# What --demo stands for; flags given next to --demo override these. The run of the
# quality harness's tiny plan (300 steps of 4 x 128 tokens, where RECOMMENDED was tuned),
# sized to finish with its set-up in under 10 minutes on 2 CPU cores.
DEMO_DEFAULTS = dict(
    preset="tiny",
    compare=True,
    steps=300,
    batch_size=4,
    seq_len=128,
    eval_every=50,
)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison: a name, an optimizer and (for grass) a selection."""

    name: str
    optimizer: str
    selection: str | None = None


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _rank(text: str) -> int | float:
    """argparse type: rows kept per weight (an integer >= 1) or a fraction of each weight's rows
    (a float in (0, 1), e.g. 0.25: the same share of every weight, as ``grassfx.compile`` takes it)."""
    try:
        return _positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or a fraction in (0, 1), got {text}")
    return value


def _seq_len(text: str) -> int:
    """argparse type: an integer >= 2 (a 1-token sequence has no next token to predict)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (each token is trained to predict the next), got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _per_optimizer(kind):
    """argparse type: ``VALUE`` (every optimizer) or ``OPTIMIZER=VALUE`` -> ``{name: value}``."""

    def parse(text: str) -> dict:
        name, sep, value = text.rpartition("=")
        if not sep:
            return {"*": kind(text)}
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {name!r} is not an optimizer; expected VALUE or OPTIMIZER=VALUE with "
                f"OPTIMIZER one of {', '.join(OPTIMIZERS)}")
        return {name: kind(value)}

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


class _MergeDicts(argparse.Action):
    """Repeated ``--lr grass=3e-3 --lr adamw=1e-3`` flags merge into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


def setting(args: argparse.Namespace, key: str, optimizer: str):
    """The value of a per-optimizer flag (``--lr``, ``--scale``, ``--update-freq``) for ``optimizer``.

    An ``OPTIMIZER=VALUE`` entry wins over a plain ``VALUE``; with neither, the
    optimizer's recommended default (:data:`RECOMMENDED`) applies. The default
    ``update_freq`` splits the run into ``RECOMMENDED[...]["windows"]`` projection windows.
    """
    given = getattr(args, key) or {}
    if optimizer in given:
        return given[optimizer]
    if "*" in given:
        return given["*"]
    if key == "update_freq":  # a number of windows per run, not of steps per window
        return max(1, args.steps // RECOMMENDED[optimizer]["windows"])
    return RECOMMENDED[optimizer][key]


def grass_setting(args: argparse.Namespace, key: str):
    """A grass-only flag (``--moments``, ``--explore``, ``--rewarmup``, ``--grass-optimizer``), or its
    recommended value."""
    value = getattr(args, "grass_optimizer" if key == "optimizer" else key)
    return RECOMMENDED["grass"][key] if value is None else value


def projection_rank(optimizer: str, args: argparse.Namespace):
    """The rank of a projected run: 1 for APOLLO-Mini (a rank-1 space, by definition), else
    ``--rank`` or the preset's."""
    if optimizer == "apollo-mini":
        return 1
    return presets_mod.get_preset(args.preset).rank if args.rank is None else args.rank


def apollo_settings(args: argparse.Namespace, optimizer: str) -> dict:
    """The keyword arguments of ``baselines.apollo_param_groups`` for an apollo / apollo-mini run."""
    return dict(rank=projection_rank(optimizer, args), update_freq=setting(args, "update_freq", optimizer),
                scale=setting(args, "scale", optimizer), mini=optimizer == "apollo-mini")


def grass_compile_settings(args: argparse.Namespace, spec: RunSpec) -> dict:
    """The ``grassfx.compile`` keyword arguments of the grass run ``spec``."""
    return dict(rank=projection_rank("grass", args), selection=spec.selection, update_freq=setting(args, "update_freq", "grass"),
                scale=setting(args, "scale", "grass"), proj_dim=args.proj_dim, moments=grass_setting(args, "moments"),
                explore=grass_setting(args, "explore"), seed=args.seed, backend=args.backend,
                blocks=None if args.blocks == "auto" else False, refresh=args.refresh)


def grass_optimizer_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of a grass run's ``grassfx.optim.AdamW`` / ``Muon`` (parameters aside)."""
    return dict(lr=setting(args, "lr", "grass"), betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                rewarmup=grass_setting(args, "rewarmup"), full_state=args.full_state)


def check_run_settings(args: argparse.Namespace) -> None:
    """Build every run's settings through the checks of the code that will use them, before any
    run starts: ``grassfx.config.GrassConfig`` (what ``grassfx.compile`` checks) and the grass
    optimizer (``grassfx.optim``) on a stand-in parameter; ``torch.optim.AdamW`` / ``Muon`` for the baselines.
    Raises ``ValueError`` (``grassfx.ConfigError`` for grass) naming the run and the setting."""
    import torch

    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    for spec in run_specs(args):
        try:
            if spec.optimizer == "grass":
                import grassfx.optim
                from grassfx.config import GrassConfig

                GrassConfig(**grass_compile_settings(args, spec))
                optimizer = grassfx.optim.Muon if grass_setting(args, "optimizer") == "muon" else grassfx.optim.AdamW
                optimizer(stand_in, **grass_optimizer_settings(args))
            elif spec.optimizer == "adamw":
                torch.optim.AdamW(stand_in, lr=setting(args, "lr", "adamw") * setting(args, "scale", "adamw"),
                                  weight_decay=args.weight_decay)
            elif spec.optimizer in ("apollo", "apollo-mini"):
                from .baselines import apollo_param_groups, import_apollo

                groups = apollo_param_groups([torch.nn.Parameter(torch.zeros(2, 2))], stand_in,
                                             **apollo_settings(args, spec.optimizer))
                import_apollo()(groups, lr=setting(args, "lr", spec.optimizer))
            elif spec.optimizer == "muon":
                from .muon import MuonAdamW

                MuonAdamW([torch.nn.Parameter(torch.zeros(1, 1))], stand_in, lr=setting(args, "lr", "muon"),
                          scale=setting(args, "scale", "muon"), weight_decay=args.weight_decay)
        except ValueError as exc:
            raise ValueError(f"the {spec.name} run: {exc}") from None


def _out_problem(out: str | None) -> str | None:
    """Why ``--out`` cannot be the output folder (a file there or above it), or None."""
    if out is None:
        return None
    path = Path(out)
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else f"--out {out}: {part} is a file, not a folder; name a folder"
    return None


def _device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot run here (a bad name, an absent accelerator), or None."""
    import torch

    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        return f"bad --device {name!r}: {exc}"
    if device.type == "cpu":
        return None
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        available = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        return f"--device {name}: no {device.type} device is available to this torch ({torch.__version__}); " \
               "use --device cpu (or auto)"
    if device.index is not None and device.index >= count:
        return f"--device {name}: only {count} {device.type} device(s) here (indices 0 to {count - 1})"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grassfx train``."""
    p = argparse.ArgumentParser(
        prog="grassfx train",
        description="Pretrain a LLaMA-architecture causal LM from scratch and compare optimizers "
                    "(same data, same init, same schedule).",
        epilog="Every setting of every run is checked before the first run starts. Ctrl-C stops after the step "
               "in progress: OUT/checkpoint.pt, summary.json with the run marked interrupted, exit code 130; "
               "'grassfx train --resume OUT' then goes on where it stopped (finished runs kept), with the "
               "losses of a run never stopped. See --save-every and --resume.")
    p.add_argument("--demo", action="store_true",
                   help="adamw vs galore vs grass vs muon on the tiny preset, sized to finish in under "
                        "10 minutes on 2 CPU cores (other flags override its settings)")
    p.add_argument("--optimizer", action="append", choices=OPTIMIZERS, dest="optimizers",
                   help="optimizer to run (repeatable; default: grass)")
    p.add_argument("--compare", action="store_true",
                   help="run every optimizer: adamw, galore, grass, muon (dense torch.optim.Muon on the "
                        "attention/MLP matrices, AdamW on the rest), apollo and apollo-mini (APOLLO and "
                        "APOLLO-Mini, package apollo-torch); --demo --compare runs the first four")
    p.add_argument("--preset", default="tiny", choices=list(presets_mod.PRESETS),
                   help="model size (default: tiny)")
    p.add_argument("--arch", default="llama", choices=list(presets_mod.ARCHS),
                   help="architecture built at the preset's size (default: llama; gpt2: fused c_attn, 4x MLP)")
    p.add_argument("--rank", type=_rank, default=None,
                   help="projection rank of galore, apollo and grass (default: the preset's, 64 for tiny); for grass "
                        "also a fraction of each weight's rows (e.g. 0.25: a quarter of every weight's rows)")
    p.add_argument("--selection", action="append", choices=SELECTIONS, dest="selections",
                   help="grass row selection (repeatable: one grass run per selection; default: top_r)")
    p.add_argument("--update-freq", type=_per_optimizer(_positive_int), action=_MergeDicts, default=None,
                   help="steps between projection updates of galore and grass: N, or OPTIMIZER=N "
                        "(repeatable; default: --steps / 25, i.e. 25 projection windows per run)")
    p.add_argument("--proj-dim", default="auto", choices=["auto", "rows", "cols", "smaller"],
                   help="grass: which dim of each weight is sampled (default: auto, the larger; "
                        "smaller: the smaller, as GaLore projects)")
    p.add_argument("--scale", type=_per_optimizer(_positive_float), action=_MergeDicts, default=None,
                   help="update scale alpha of the projected weights of galore and grass (for adamw and "
                        "muon: the learning-rate multiplier of the same attention/MLP weights): X, or "
                        "OPTIMIZER=X (repeatable; default: each optimizer's recommended value)")
    p.add_argument("--moments", default=None, choices=["reset", "keep_overlap"],
                   help="grass: Adam moments at a refresh (default: the recommended one)")
    p.add_argument("--explore", type=float, default=None,
                   help="grass: share of each rank given at a refresh to the rows unselected longest "
                        "(0: off; default: the recommended value)")
    p.add_argument("--blocks", default="auto", choices=["auto", "none"],
                   help="grass: per-block row selection of fused weights (q|k|v, gate|up; default: auto, "
                        "detected; none: select over the whole weight)")
    p.add_argument("--grass-optimizer", default=None, choices=["adamw", "muon"],
                   help="grass: how the selected rows are updated: adamw (per-element Adam moments) or "
                        "muon (orthogonalized momentum, grassfx.optim.Muon; half the state); every other "
                        "parameter is trained by AdamW either way (default: the recommended one)")
    p.add_argument("--full-state", default=None, choices=["adam", "factored", "factored_nomomentum"],
                   help="grass: optimizer state of the embeddings and an untied LM head (the matrices trained "
                        "in full): adam (default: both moments), factored (first moment; second moment as row "
                        "and column means) or factored_nomomentum (the factored second moment only)")
    p.add_argument("--embedding-full-state", default=None, choices=["adam", "factored", "factored_nomomentum"],
                   help="grass: the input embedding's state, when it should differ from --full-state (an untied "
                        "head keeps --full-state)")
    p.add_argument("--lean", action="store_true",
                   help="grass: least optimizer memory, i.e. --full-state factored --embedding-full-state "
                        "factored_nomomentum (444M LLaMA: 0.21x of dense AdamW's peak above the weights in "
                        "fp32 against 0.34x by default, 0.24x in pure bf16; +0.034 nats on the small preset; "
                        "benchmarks/RESULTS.md)")
    p.add_argument("--rewarmup", type=int, default=None,
                   help="grass: steps over which a newly selected row's update ramps up from 0 "
                        "(0: off; default: the recommended value)")
    p.add_argument("--refresh", default="auto", choices=["auto", "eager", "compiled"],
                   help="grass: how refresh steps run (grassfx.compile(refresh=)): compiled (a refresh graph "
                        "of its own: more compile time, faster refresh steps), eager (one training graph to "
                        "compile; an eager refresh step costs ~1.3 steady steps, 25 per run) or auto "
                        "(default: eager; benchmarks/RESULTS.md, the main job's compile)")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--lr", type=_per_optimizer(_positive_float), action=_MergeDicts, default=None,
                   help="peak learning rate: X (every optimizer) or OPTIMIZER=X (repeatable; default: "
                        "each optimizer's tuned value, see benchmarks/RESULTS.md)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.0, help="decoupled weight decay (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=_seq_len, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--eval-every", type=_positive_int, default=100, help="steps between evaluations (default: %(default)s)")
    p.add_argument("--eval-windows", type=_positive_int, default=64,
                   help="evaluation windows (of --seq-len tokens, spread evenly over the evaluation split) "
                        "scored at each periodic evaluation; the final evaluation scores every window "
                        "of the split (default: %(default)s)")
    p.add_argument("--backend", default="inductor", choices=BACKENDS,
                   help="compiler backend (default: %(default)s; grass: passed to grassfx.compile, the "
                        "baselines go through torch.compile with it; eager: nothing compiled, the "
                        "reference). The table's compile s column is the time spent compiling, left "
                        "out of tokens/s")
    p.add_argument("--speed-steps", type=_nonnegative_int, default=None,
                   help="with two or more runs: after training, fresh copies of every run take their "
                        "training steps side by side, one step of each in turn, and the table's tokens/s "
                        "comes from N such steps per run (each run's own training tokens/s stays in "
                        "summary.json), so drift of the machine between runs does not favour one. "
                        "0: off; N: N steps (even for one run). Default: 48 rounded up to whole projection "
                        "windows of every run (refresh steps counted in their share); off for one run, for "
                        "several processes, or when whole windows of every run would take more than "
                        "max(192, --steps / 10) steps")
    p.add_argument("--data", default=None,
                   help="text file or folder of .txt/.md files, or a built-in corpus: shakespeare "
                        "(default: Shakespeare's plays) or movies (Rotten Tomatoes plots and reviews)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init weights and the batches (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--malloc", default="keep", choices=["keep", "system"],
                   help="CPU runs on Linux with glibc: keep (default: freed memory stays in the process, "
                        "so a step does not page-fault its activations back in; every run of the "
                        "process alike) or system (glibc's own thresholds)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--save-every", type=_nonnegative_int, default=0, metavar="N",
                   help="write a checkpoint of the run in progress to OUT/checkpoint.pt every N steps "
                        "(atomically: a kill while saving keeps the last one; 0: only when stopped by Ctrl-C, "
                        "the default). A first Ctrl-C stops after the step in progress, with a checkpoint, "
                        "summary.json (the run marked interrupted) and exit code 130; a second one stops at once")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="go on with the comparison in DIR (an earlier --out) where it stopped, with its settings: "
                        "finished runs are kept, the interrupted one continues from its checkpoint (the same "
                        "losses as a run never stopped) and the rest follow. Flags given with it must match "
                        "the settings of DIR (a differing one is refused)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="data-parallel processes on this machine (launches torchrun; gloo on CPU, NCCL "
                        "on GPU); --batch-size is per process. Multi-node: run torchrun yourself with "
                        "-m grassfx.train")
    return p


# flags that change nothing a run computes: free to differ between a run and its --resume
# (the runs themselves are compared as "runs": --compare, --optimizer and --selection)
NOT_SETTINGS = ("demo", "compare", "optimizers", "selections", "out", "resume", "save_every", "no_progress",
                "threads", "malloc", "speed_steps", "nproc", "argv")


def training_settings(args: argparse.Namespace) -> dict:
    """The settings that decide what a comparison computes (``--resume`` refuses others)."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings["runs"] = [spec.name for spec in run_specs(args)]
    return settings


def _flag(key: str) -> str:
    return "--optimizer/--selection/--compare" if key == "runs" else "--" + key.replace("_", "-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``--demo`` supplies defaults that explicit flags still override.

    With ``--resume DIR``, the command line of DIR's comparison (``DIR/config.json``) comes
    first and ``argv`` after it; a setting that then differs from DIR's is an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    if not first.resume:
        args = _parse(argv)
        args.argv = argv
        return args
    config = Path(first.resume) / "config.json"
    if not config.is_file():
        parser.error(f"--resume {first.resume}: no config.json there (not the --out folder of a grassfx train run)")
    saved_argv = json.loads(config.read_text()).get("argv")
    if saved_argv is None:
        parser.error(f"--resume {first.resume}: its config.json has no command line (written by an older grassfx)")
    saved, args = _parse(saved_argv), _parse(saved_argv + argv)
    before, now = training_settings(saved), training_settings(args)
    for key in before.keys() | now.keys():
        if before.get(key) != now.get(key):
            parser.error(f"--resume {first.resume}: {_flag(key)} is {now.get(key)!r} here but "
                         f"{before.get(key)!r} in the run being resumed; resume with its settings "
                         f"(or start a new run with another --out)")
    if args.nproc > 1:
        parser.error("--resume: one process only (--nproc 1)")
    args.out, args.argv = first.resume, saved_argv + _without_resume(argv)
    return args


def _without_resume(argv: list[str]) -> list[str]:
    """``argv`` less its ``--resume DIR`` (``--resume=DIR``)."""
    kept, skip = [], False
    for a in argv:
        if skip or a.startswith("--resume="):
            skip = False
            continue
        skip = a == "--resume"
        if not skip:
            kept.append(a)
    return kept


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse and check ``argv`` (``--demo`` first supplies defaults)."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.demo:
        demo = dict(DEMO_DEFAULTS)
        if first.optimizers:  # --demo --optimizer X runs just the optimizers named
            demo["compare"] = False
        parser.set_defaults(**demo)
        args = parser.parse_args(argv)
    else:
        args = first
    if args.selections and not ({"grass"} & set(run_optimizers(args))):
        parser.error("--selection only applies to grass runs (add --optimizer grass or --compare)")
    if args.refresh == "compiled" and args.backend == "eager":
        parser.error("--refresh compiled needs a compiled backend (--backend inductor or aot_eager)")
    if args.refresh == "auto":  # one training graph: a refresh graph costs ~2x the compile for ~1.3% faster steps
        args.refresh = "eager"
    if args.lean:
        if args.full_state is not None or args.embedding_full_state is not None:
            parser.error("--lean sets --full-state and --embedding-full-state: give either --lean or those")
        args.full_state, args.embedding_full_state = "factored", "factored_nomomentum"
    elif args.full_state is None:
        args.full_state = "adam"
    fixed_rank = [o for o in run_optimizers(args) if o in PROJECTED and o != "grass"]
    if isinstance(args.rank, float) and fixed_rank:
        parser.error(f"--rank {args.rank}: a fraction of the rows is a grass setting; {', '.join(fixed_rank)} "
                     "take an integer rank")
    if args.seq_len > presets_mod.get_preset(args.preset).max_position_embeddings:
        parser.error(f"--seq-len {args.seq_len} is too long for preset {args.preset!r}")
    if args.save_every and args.nproc > 1:
        parser.error("--save-every: one process only (--nproc 1)")
    for problem in (_out_problem(args.out), _device_problem(args.device)):
        if problem:
            parser.error(problem)
    try:  # every run's settings, before the first run trains for minutes
        check_run_settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run_optimizers(args: argparse.Namespace) -> list[str]:
    """The optimizers to run, in order, without repeats."""
    chosen = list(DEMO_OPTIMIZERS if args.demo and args.compare else OPTIMIZERS) if args.compare else []
    chosen += args.optimizers or []
    chosen = chosen or ["grass"]
    return list(dict.fromkeys(chosen))


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Expand the optimizers and grass selections into the list of runs."""
    selections = list(dict.fromkeys(args.selections or ["top_r"]))
    specs = []
    for opt in run_optimizers(args):
        if opt != "grass":
            specs.append(RunSpec(opt, opt))
        elif len(selections) == 1:
            specs.append(RunSpec("grass", "grass", selections[0]))
        else:
            specs.extend(RunSpec(f"grass-{s}", "grass", s) for s in selections)
    return specs
