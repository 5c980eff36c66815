"""``tokur-decode score``: every signal of saved generations, without generating again.

    tokur-decode score --data generations.jsonl --out runs/scored
    tokur-decode calibrate runs/scored --risk 0.2 --out rule.toml

The file has one ``{"prompt": ..., "response": ..., "answer" | "correct": ...}`` per line
(:mod:`tokur_decode.experiments.saved`); the run folder has ``eval``'s format.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from ..core.limits import MAX_BATCH, MAX_BOOTSTRAP
from .common import SEED, integer, tokur_args, tokur_options

__all__ = ["add_parser", "run"]


def add_parser(sub, model_args: Callable) -> None:
    """``tokur-decode score``."""
    p = sub.add_parser(
        "score",
        help="every signal of saved generations (teacher-forced), in eval's format",
        description="Teacher-force each saved response through the model (transformers) and "
        "record every signal per token, TokUR included, as during generation; write "
        "results.jsonl and, when every response is graded, the detection report.",
    )
    p.add_argument("--data", required=True, help="a JSONL file of prompt / response lines")
    p.add_argument("--out", required=True, help="run folder (results, report); resumable")
    p.add_argument("--signals", default="all,tokur", help="signals to record (all,tokur)")
    p.add_argument("--grader", choices=("numeric", "string", "math"), help="the file's grader")
    p.add_argument(
        "--batch-size", type=integer(1, MAX_BATCH), default=8, help="responses per pass (8)"
    )
    p.add_argument(
        "--bootstrap", type=integer(1, MAX_BOOTSTRAP), default=1000, help="bootstrap resamples"
    )
    p.add_argument("--seed", type=SEED, default=0, help="bootstrap seed (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (default: when the tokenizer has one)",
    )
    model_args(p)
    tokur_args(p, "TokUR (when 'tokur' is among the signals)")


def run(args, load: Callable, argv=None) -> int:
    from ..experiments import report
    from ..experiments.saved import load_generations, run_scoring
    from ..hf import HFBackend

    saved = load_generations(args.data, grader=args.grader)
    tokur = tokur_options(args)
    backend = HFBackend.deferred(
        lambda: load(args),
        model_name=args.model or "embedded:SmolLM2-135M-Instruct",
        dtype=args.dtype,
        chat=args.chat,
        batch_size=args.batch_size,
        tokur=tokur,
    )
    result = run_scoring(
        saved,
        backend,
        out=args.out,
        signals=args.signals,
        batch_size=args.batch_size,
        n_resamples=args.bootstrap,
        seed=args.seed,
        progress=not args.no_progress,
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if result.summary:
        command = "tokur-decode " + " ".join(shlex.quote(a) for a in argv)
        report.write_detection(args.out, result.records, result.summary, command)
        report.print_detection(result.summary)
    else:
        print(
            f"scored {len(result.records)} responses into {args.out}/results.jsonl; "
            "no metrics: not every response has an answer or a correct flag",
            file=sys.stderr,
        )
    return 0
