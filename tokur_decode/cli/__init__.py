"""The ``tokur-decode`` command line, one module per command.

tokur-decode generate "What is the capital of France?"      # table of per-token signals
tokur-decode generate --json --signals all "What is 2+2?"   # the same as JSON
tokur-decode strategies                                    # the shipped recipes
tokur-decode bench overhead                                # monitor cost, ratio to plain generate
tokur-decode eval --data tasks:capitals --out runs/detect  # wrong-answer detection metrics
tokur-decode scale --data tasks:legs --out runs/scale      # accuracy vs N candidates
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import bench, experiments, generate, strategies
from .common import load, model_args

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokur-decode",
        description="Uncertainty-guided decoding: measure token-level uncertainty while an LLM "
        "generates, and act on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(sub)
    strategies.add_parser(sub)
    bench.add_parser(sub)
    experiments.add_parsers(sub, model_args)  # eval, scale
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokur-decode`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: results only
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate.run(args)
        if args.command == "strategies":
            return strategies.run(args)
        if args.command in ("eval", "scale"):
            return experiments.run(args, load, argv)
        return bench.run(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as exc:
        print(f"tokur-decode: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "Engine core initialization failed" not in str(exc):
            raise
        print(
            "tokur-decode: error: the vLLM engine did not start (its log above says why); on "
            "CPU the usual cause is memory held elsewhere: --kv-cache-gib bounds what it "
            "reserves",
            file=sys.stderr,
        )
        return 2
