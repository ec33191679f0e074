"""The ``grassfx`` command line.

::

    grassfx explain --demo llama-tiny                     # table: what was rewritten, FLOPs, bytes
    grassfx explain mypkg.models:make --rank 64 --json report.json
    grassfx diff --demo gpt2-tiny --html diff.html --dot diff.dot
    grassfx train --demo                                  # see grassfx train --help

``MODULE:FACTORY`` names an importable callable (``MODULE`` may also be a path to a
``.py`` file) returning ``(model, example_inputs)``: ``model`` a plain ``nn.Module`` (or
one already returned by ``grassfx.compile``) and ``example_inputs`` a dict of keyword
arguments or a tuple of positional ones for one training step.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Optional

__all__ = ["main", "build_parser"]


def _rank(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rank: give rows kept per weight (an int >= 1) or a fraction in (0, 1]"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grassfx`` (``explain``, ``diff`` and ``train``).

    Example:
        >>> build_parser().parse_args(["explain", "--demo", "mlp"]).demo
        'mlp'
    """
    from .config import BACKENDS
    from .recipes.demos import DEMOS
    from .select import SELECTORS

    parser = argparse.ArgumentParser(prog="grassfx", description="Grass training as a torch.compile pass: debugging tools.")
    sub = parser.add_subparsers(dest="command", metavar="{explain,diff,train}")
    sub.required = True
    helps = {
        "explain": "compile one training step of a copy and report, per projected weight, what was rewritten",
        "diff": "show what each pass did to each compiled graph (text, --html, --dot)",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("target", nargs="?", metavar="MODULE:FACTORY",
                       help="a callable returning (model, example_inputs)")
        p.add_argument("--demo", choices=sorted(DEMOS), help="use a built-in tiny model instead of MODULE:FACTORY")
        p.add_argument("--rank", type=_rank, default=None,
                       help="rows kept per weight, or a fraction in (0, 1] (default: the demo's, else 256)")
        p.add_argument("--selection", choices=SELECTORS, default=None, help="row selector (default: top_r)")
        p.add_argument("--backend", choices=BACKENDS, default=None, help="compile backend (default: inductor)")
        p.add_argument("--html", metavar="PATH", help="write the side-by-side graph diff as one HTML page")
        p.add_argument("--dot", metavar="PATH", help="write the changed region of the graphs as DOT")
        if name == "explain":
            p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    sub.add_parser("train", help="pretrain a small LLaMA and compare optimizers (grassfx train --help)",
                   add_help=False)
    return parser


def main(argv: Optional[list] = None) -> int:
    """Run the ``grassfx`` command line; returns the exit status.

    Example:
        >>> main(["explain", "--demo", "mlp", "--backend", "aot_eager"])  # doctest: +SKIP
        grassfx explain: Sequential (backend=aot_eager, rank=16, ...)
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .recipes import train  # imported only when asked for: it pulls in the training stack

        train.main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import GrassError

    try:
        return _run(parser, args)
    except GrassError as exc:
        parser.error(str(exc))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import grassfx

    model, inputs = _model_and_inputs(parser, args)
    pos, kw = _split_inputs(parser, inputs)
    report = grassfx.explain(model, *pos, **kw)
    if args.command == "explain":
        print(report)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=2)
            print(f"wrote {args.json}")
    needs_graphs = args.command == "diff" or args.html or args.dot
    if needs_graphs and report.stats is None:
        parser.error("no compiled graphs to diff with --backend eager; use aot_eager or inductor")
    if needs_graphs:
        d = grassfx.diff(report)
        if args.command == "diff":
            print(d)
        _write_outputs(d, args)
    return 0


def _write_outputs(d, args: argparse.Namespace) -> None:
    if args.html:
        d.to_html(args.html)
        print(f"wrote {args.html}")
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write(d.to_dot())
        print(f"wrote {args.dot}")


def _model_and_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """Build (or load) the model, compile it with the command's options, and its inputs."""
    import grassfx

    from .recipes.demos import get_demo

    if (args.target is None) == (args.demo is None):
        parser.error("give exactly one of MODULE:FACTORY or --demo NAME")
    if args.demo is not None:
        demo = get_demo(args.demo)
        model, inputs = demo.factory()
        rank = demo.rank if args.rank is None else args.rank
    else:
        model, inputs = _call_factory(parser, args.target)
        rank = args.rank
    if isinstance(model, grassfx.GrassModel):
        if any(v is not None for v in (args.rank, args.selection, args.backend)):
            parser.error(f"{args.target} returned a model already compiled by grassfx: "
                         "--rank/--selection/--backend apply only to plain modules")
        return model, inputs
    options = {"rank": rank, "selection": args.selection, "backend": args.backend}
    return grassfx.compile(model, **{k: v for k, v in options.items() if v is not None}), inputs


def _call_factory(parser: argparse.ArgumentParser, target: str) -> tuple:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        parser.error(f"{target!r}: expected MODULE:FACTORY, e.g. mypkg.models:make_model or models.py:make_model")
    module = _import(parser, module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        parser.error(f"{module_name!r} has no callable {attr!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        parser.error(f"{target} must return (model, example_inputs), got {type(result).__name__}")
    from torch import nn

    if not isinstance(result[0], nn.Module):
        parser.error(f"{target} returned {type(result[0]).__name__} as the model; expected a torch.nn.Module")
    return result


def _import(parser: argparse.ArgumentParser, name: str):
    if name.endswith(".py"):
        if not os.path.isfile(name):
            parser.error(f"no such file: {name}")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: modules next to the caller import
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        parser.error(f"cannot import {name!r}: {exc}")


def _split_inputs(parser: argparse.ArgumentParser, inputs) -> tuple:
    """``(args, kwargs)`` from a dict (keywords), a tuple/list (positional) or one tensor."""
    import torch

    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    parser.error(f"example_inputs must be a dict of keyword arguments or a tuple of positional ones, "
                 f"got {type(inputs).__name__}")


if __name__ == "__main__":
    sys.exit(main())
