"""The ``tokur-decode`` command line, one module per command.

tokur-decode generate "What is the capital of France?"      # table of per-token signals
tokur-decode generate --json --signals all "What is 2+2?"   # the same as JSON
tokur-decode strategies                                    # the shipped recipes
tokur-decode bench overhead                                # monitor cost, ratio to plain generate
tokur-decode eval --data tasks:capitals --out runs/detect  # wrong-answer detection metrics
tokur-decode scale --data tasks:legs --out runs/scale      # accuracy vs N candidates
tokur-decode calibrate runs/detect --risk 0.2 --out r.toml # abstention with a guarantee
tokur-decode score --data gens.jsonl --out runs/scored     # signals of saved generations
tokur-decode serve --port 8000                             # OpenAI server, traces in responses
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import bench, calibrate, experiments, generate, score, serve, strategies
from .common import load, model_args
from .engine_log import EngineLog, start_failure

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser (and its subcommands') refusing in one line: the error and where
    the options are listed, without the usage block (19 lines for ``generate``) that
    argparse prints in front of it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokur-decode",
        description="Uncertainty-guided decoding: measure token-level uncertainty while an LLM "
        "generates, and act on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(sub)
    strategies.add_parser(sub)
    bench.add_parser(sub)
    experiments.add_parsers(sub, model_args)  # eval, scale
    calibrate.add_parser(sub)
    score.add_parser(sub, model_args)
    serve.add_parser(sub)
    return parser


_NEGATIVE_LIST = re.compile(r"-\d[\d.]*(,-?[\d.]+)+")


def _negative_values_attached(argv: Sequence[str] | None) -> list[str]:
    """``--flag -1,2`` as ``--flag=-1,2``: argparse reads a value that starts with ``-``
    and is not one number as a flag ("expected one argument"); attached, the flag's own
    check names the bad value.

    Example:
        >>> _negative_values_attached(["eval", "--tokur-seeds", "-1,2", "--limit", "-3"])
        ['eval', '--tokur-seeds=-1,2', '--limit', '-3']
    """
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    for arg in args:
        if (
            out
            and out[-1].startswith("--")
            and "=" not in out[-1]
            and _NEGATIVE_LIST.fullmatch(arg)
        ):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokur-decode`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: results only
    parser = build_parser()
    try:  # a refused flag: argparse's message (naming it) and status 2, returned
        args, rest = parser.parse_known_args(_negative_values_attached(argv))
        if rest and args.command != "serve":  # only serve passes arguments on (to vLLM)
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if _starts_vllm(args) and args.command != "serve":
        # vLLM's INFO lines (about 65 per run) are not this command's output; its warnings
        # and errors stay. VLLM_LOGGING_LEVEL=INFO brings them back; serve keeps vLLM's.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    log = EngineLog() if _starts_vllm(args) else contextlib.nullcontext()
    try:
        with log:
            if args.command == "serve":
                return serve.run(args, rest)
            return _run(args, argv)
    except (ValueError, ModuleNotFoundError, FileNotFoundError, ConnectionError) as exc:
        print(f"tokur-decode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (a run folder keeps every finished item: the same command resumes)"
        print(f"tokur-decode: interrupted{resume}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        message = start_failure(exc, log if isinstance(log, EngineLog) else None)
        if message is None:
            raise
        print(f"tokur-decode: error: {message}", file=sys.stderr)
        return 2


def _run(args, argv) -> int:
    if args.command == "generate":
        return generate.run(args)
    if args.command == "strategies":
        return strategies.run(args)
    if args.command in ("eval", "scale"):
        return experiments.run(args, load, argv)
    if args.command == "calibrate":
        return calibrate.run(args)
    if args.command == "score":
        return score.run(args, load, argv)
    return bench.run(args)


def _starts_vllm(args) -> bool:
    """Whether the command starts a vLLM engine (its log is kept for a failed start)."""
    return getattr(args, "backend", None) == "vllm" or str(getattr(args, "bench", "")).startswith(
        "vllm"
    )
