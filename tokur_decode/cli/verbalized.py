"""``tokur-decode generate --verbalized``: ask for ``Answer:`` and ``Confidence:``
(:func:`tokur_decode.verbalized.ask`) and show the answer, the stated confidence and
every token's signals."""

from __future__ import annotations

import json
import math

from .common import load, signal_list, verbalized_engine
from .render import print_report, token_rows

__all__ = ["run"]


def run(args) -> int:
    from ..verbalized import ask

    if args.strategy:
        raise ValueError("--verbalized: cannot be combined with --strategy")
    if args.backend == "vllm":
        model, tokenizer = verbalized_engine(args), None
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
        "tokens": token_rows(row),
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
    print_report({**report, "answer": r.text, "actions": [], "summary": summary})
    return 0
