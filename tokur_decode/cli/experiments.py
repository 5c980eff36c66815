"""``tokur-decode eval`` and ``tokur-decode scale``: the experiment runners from the
command line (the runners: :mod:`tokur_decode.experiments`).

    tokur-decode eval  --data tasks:capitals,tasks:arithmetic --signals all --out runs/detect
    tokur-decode scale --data my.jsonl --n 1,2,4,8 --strategies tokur-best-of-n,deepconf-online \\
                       --out runs/scale
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from ..core.limits import MAX_BATCH, MAX_BOOTSTRAP, MAX_CANDIDATES, MAX_REPEATS
from ..experiments.prompts import TEMPLATES
from .common import (
    SEED,
    flags,
    integer,
    integers_from,
    number,
    tokur_args,
    tokur_options,
    verbalized_engine,
)

__all__ = ["add_parsers", "run"]

DEFAULT_STRATEGIES = "tokur-best-of-n,deepconf-online,self-certainty-best-of-n"
#: What ``scale --live`` runs when given no list: the baselines, then the methods that
#: decide while decoding.
LIVE_DEFAULT = (
    "greedy,self-consistency,self-certainty-best-of-n,deepconf-online,esc,"
    "adaptive-consistency,particle-filter,mur"
)


def _common(p: argparse.ArgumentParser, model_args: Callable, *, batch: int, tokens: int) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="comma-separated: tasks:arithmetic, tasks:legs, tasks:capitals, or .jsonl files",
    )
    p.add_argument("--out", required=True, help="run folder (results, report, plots); resumable")
    p.add_argument(
        "--backend",
        choices=("hf", "vllm", "openai"),
        default="hf",
        help="hf: transformers (default); vllm: a vLLM engine with the UncertaintyProcessor; "
        "openai: a server started with tokur-decode serve (--base-url)",
    )
    server = p.add_argument_group("a server (--backend openai)")
    server.add_argument("--base-url", help="the server, e.g. http://127.0.0.1:8000")
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="the server's --api-key (default: $OPENAI_API_KEY)",
    )
    server.add_argument(
        "--concurrency", type=integer(1, 256), default=8, help="requests in flight at once (8)"
    )
    p.add_argument(
        "--verbalized",
        action="store_true",
        help="ask for 'Answer: ...' and 'Confidence: NN' (Outlines-constrained); the "
        "verbalized, expected and combined confidences become extra scores",
    )
    p.add_argument("--limit", type=integer(1), help="first N items of each dataset")
    p.add_argument(
        "--max-new-tokens", type=integer(1), default=tokens, help=f"answer budget ({tokens})"
    )
    p.add_argument("--seed", type=SEED, default=0, help="generation and bootstrap seed (0)")
    p.add_argument("--data-seed", type=SEED, default=0, help="seed of the built-in tasks (0)")
    p.add_argument("--grader", choices=("numeric", "string", "math"), help="JSONL files' grader")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--prompt-suffix",
        metavar="TEXT",
        help="append TEXT to each JSONL question (default: questions are sent as written)",
    )
    shape.add_argument(
        "--prompt-template",
        choices=sorted(TEMPLATES),
        help="shape each JSONL question with a named template (TokUR's evaluation prompts)",
    )
    p.add_argument(
        "--batch-size",
        type=integer(1, MAX_BATCH),
        default=batch,
        help=f"items per generate call, 1 to {MAX_BATCH} ({batch})",
    )
    p.add_argument(
        "--bootstrap",
        type=integer(1, MAX_BOOTSTRAP),
        default=1000,
        help=f"bootstrap resamples for intervals, 1 to {MAX_BOOTSTRAP} (1000)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (default: when the tokenizer has one)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    model_args(p)
    tokur_args(p, "TokUR (when 'tokur' is among the signals)")


def add_parsers(sub, model_args: Callable) -> None:
    """Add ``eval`` and ``scale`` to the ``tokur-decode`` subcommands."""
    ev = sub.add_parser(
        "eval",
        help="wrong-answer detection: AUROC/AUPRC/PRR/Top-p of every signal and aggregate",
        description="One greedy answer per item with every requested signal recorded in the same "
        "pass; every aggregate scored; detection metrics with 95% bootstrap intervals. Writes "
        "results.jsonl, metrics.json, report.md and PNG plots to --out; a rerun skips done items.",
    )
    _common(ev, model_args, batch=8, tokens=64)
    ev.add_argument(
        "--tokur-seeds",
        type=integers_from(0, 2**32 - 1),
        metavar="S1,S2,...",
        help="TokUR's evaluation: generate once, measure TokUR with each noise seed, report "
        "every TokUR score's metrics as mean +- std over the seeds (e.g. 96,89,64)",
    )
    ev.add_argument(
        "--signals",
        help="comma-separated signals; all is every signal from the logits, tokur adds "
        "TokUR (all,tokur); default: all,tokur on the transformers backend, all with "
        "--backend vllm or openai or --verbalized",
    )
    sc = sub.add_parser(
        "scale",
        help="test-time scaling: accuracy vs N candidates and tokens, per selection method",
        description="N_max sampled candidates and one greedy answer per item, generated once; "
        "then accuracy versus N (repeated random subsets) for greedy, majority, each recipe, "
        "best-of-N / weighted / top-eta votes by each recipe's score, and DeepConf online "
        "simulated from the traces.",
    )
    _common(sc, model_args, batch=2, tokens=64)
    sc.add_argument(
        "--n",
        type=integers_from(1, MAX_CANDIDATES),
        default=[1, 2, 4, 8],
        help=f"candidate counts N, 1 to {MAX_CANDIDATES} (default 1,2,4,8)",
    )
    sc.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help=f"best-of-n / deepconf-online recipes, names or .toml (default {DEFAULT_STRATEGIES})",
    )
    sc.add_argument("--signals", help="signals to record (default: what the recipes need)")
    sc.add_argument(
        "--temperature", type=number(), help="sampling temperature (default: the recipes')"
    )
    sc.add_argument("--top-p", type=number(0, 1), default=1.0, help="nucleus sampling (1.0)")
    sc.add_argument(
        "--repeats",
        type=integer(1, MAX_REPEATS),
        default=20,
        help=f"random subsets per item and N, 1 to {MAX_REPEATS} (20)",
    )
    sc.add_argument("--eta", type=number(0, 1), default=0.5, help="top-eta vote fraction (0.5)")
    sc.add_argument(
        "--live",
        nargs="?",
        const=LIVE_DEFAULT,
        metavar="RECIPES",
        help="also run these recipes (or greedy) for real, timed: accuracy, tokens and seconds "
        f"per item (default {LIVE_DEFAULT})",
    )


def _tokur(args, strategies: Sequence[str] = ()) -> dict:
    from ..strategies.recipe import Strategy

    tables = [t for t in (Strategy.load(s).tokur for s in strategies) if t]
    if any(t != tables[0] for t in tables):
        raise ValueError("strategies: the recipes' [tokur] tables differ; give --tokur-* options")
    return {**(tables[0] if tables else {}), **(tokur_options(args) or {})}


def _backend(args, load: Callable, tokur: dict):
    from ..hf import HFBackend
    from ..verbalized import VerbalizedBackend

    explicit = tokur_options(args)
    if args.backend == "openai":
        if explicit:
            raise ValueError("--tokur-*: the server's tokur-decode serve --tokur-* set them")
        if args.verbalized:
            raise ValueError("--verbalized: runs in-process (--backend hf or vllm)")
        if not args.base_url:
            raise ValueError("--base-url: needed with --backend openai")
        from ..vllm.remote import RemoteBackend

        return RemoteBackend(
            args.base_url,
            api_key=args.api_key,
            model=args.model,
            chat=args.chat,
            concurrency=args.concurrency,
        )
    if args.base_url:
        raise ValueError("--base-url: only with --backend openai")
    name = args.model or "embedded:SmolLM2-135M-Instruct"
    if args.backend == "vllm":
        if explicit:
            raise ValueError("--tokur-*: TokUR options apply to the transformers backend")
        from ..vllm.backend import VLLMBackend

        backend = VLLMBackend.deferred(
            lambda: verbalized_engine(args),
            model_name=name,
            dtype=args.dtype,
            chat=args.chat,
        )
    else:
        backend = HFBackend.deferred(
            lambda: load(args),
            model_name=name,
            dtype=args.dtype,
            chat=args.chat,
            batch_size=args.batch_size,
            tokur=tokur,
        )
    return VerbalizedBackend(backend) if args.verbalized else backend


def _eval_signals(args) -> str:
    """``--signals``, by default every logit signal (``all``), and TokUR too on the
    transformers backend."""
    if args.signals is not None:
        return args.signals
    return "all,tokur" if args.backend == "hf" and not args.verbalized else "all"


def run(args, load: Callable, argv: Sequence[str] | None = None) -> int:
    """Run ``eval`` or ``scale`` from parsed ``args``; ``load(args)`` loads the model."""
    from ..experiments import data, detection, report, scaling

    argv = sys.argv[1:] if argv is None else list(argv)
    command = "tokur-decode " + " ".join(shlex.quote(a) for a in argv)
    items = data.load_many(
        args.data,
        seed=args.data_seed,
        limit=args.limit,
        grader=args.grader,
        prompt_suffix=args.prompt_suffix,
        prompt_template=args.prompt_template,
    )
    progress = not args.no_progress
    if args.command == "eval":
        signals = _eval_signals(args)
        seeds = args.tokur_seeds
        tokur = _tokur(args)
        if seeds is not None:
            if tokur.get("seed", seeds[0]) != seeds[0]:
                raise ValueError("--tokur-seed: with --tokur-seeds the first seed is used")
            tokur["seed"] = seeds[0]
        backend = _backend(args, load, tokur)
        result = detection.run_detection(
            items,
            backend,
            signals=signals,
            n_resamples=args.bootstrap,
            progress=progress,
            tokur_seeds=seeds,
            **flags(args, "out", "max_new_tokens", "seed", "batch_size"),
        )
        files = report.write_detection(args.out, result.records, result.summary, command)
        report.print_detection(result.summary)
    else:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        backend = _backend(args, load, _tokur(args, strategies))
        result = scaling.run_scaling(
            items,
            backend,
            out=args.out,
            ns=args.n,
            strategies=strategies,
            signals=args.signals,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            repeats=args.repeats,
            eta=args.eta,
            batch_size=args.batch_size,
            n_resamples=args.bootstrap,
            progress=progress,
            live=[s.strip() for s in (args.live or "").split(",") if s.strip()],
        )
        files = report.write_scaling(args.out, result.summary, command)
        report.print_scaling(result.summary)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
