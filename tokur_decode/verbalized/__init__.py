"""Verbalized confidence (Yang et al. 2024): ask for ``Answer: ...`` and
``Confidence: NN``, constrain the output with Outlines so that the parse cannot fail,
and put the stated confidence beside the token-level signals of the same generation.

``ask(model, tokenizer, question)`` returns a :class:`VerbalizedResult`: ``answer``,
``confidence`` (stated, in [0, 1]), ``expected_confidence`` (probability-weighted over
0..100), ``abstained``, the whole generation's ``trace``, the token spans of the answer
and of the number, and ``scores`` by name (:data:`SCORES`), among them
:func:`combined_confidence`. :mod:`~tokur_decode.verbalized.calibration` has the ECE,
reliability-diagram data and a small built-in question set.

Layout: ``format`` (prompt, regex, parser, token spans, the confidence completions'
tree) and ``result`` (scores, combination, best-of-N) and ``calibration`` know no
backend; ``hf`` (Outlines' logits processor beside the monitor) and ``vllm_backend``
(structured outputs beside :class:`tokur_decode.vllm.UncertaintyProcessor`) generate.

Example:
    >>> from tokur_decode.verbalized import ask
    >>> from tokur_decode.models import load_default
    >>> model, tok = load_default()                                          # doctest: +SKIP
    >>> r = ask(model, tok, "What is the capital of France?")                # doctest: +SKIP
    >>> r.answer, r.confidence, r.abstained                                  # doctest: +SKIP
    ('Paris', 1.0, False)
    >>> r.trace.meta["mask_order"], r.scores["combined"]                     # doctest: +SKIP
    ('monitor-first', 0.85...)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .asking import Asking
from .backend import VERBALIZED_SCORES, VerbalizedBackend
from .calibration import (
    CAPITALS,
    ReliabilityDiagram,
    expected_calibration_error,
    is_correct,
    reliability_diagram,
)
from .format import (
    DEFAULT_TEMPLATE,
    MAX_ANSWER_CHARS,
    Parsed,
    build_prompt,
    format_regex,
    is_abstention,
    max_format_tokens,
    parse_response,
    validate_template,
)
from .result import (
    MASK_ORDERS,
    SCORES,
    VERBALIZED_SIGNALS,
    VerbalizedResult,
    combined_confidence,
    confidence_expectation,
    select_best,
    signal_names,
)

__all__ = [
    "CAPITALS",
    "DEFAULT_TEMPLATE",
    "MAX_ANSWER_CHARS",
    "MASK_ORDERS",
    "SCORES",
    "VERBALIZED_SCORES",
    "VERBALIZED_SIGNALS",
    "Asking",
    "Parsed",
    "ReliabilityDiagram",
    "VerbalizedBackend",
    "VerbalizedResult",
    "ask",
    "build_prompt",
    "combined_confidence",
    "confidence_expectation",
    "expected_calibration_error",
    "format_regex",
    "is_abstention",
    "is_correct",
    "max_format_tokens",
    "parse_response",
    "reliability_diagram",
    "select_best",
    "signal_names",
    "validate_template",
]


def ask(
    model,
    tokenizer,
    questions: str | Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    constrained: bool = True,
    mask_order: str | None = None,
    signals: Iterable[str] | str | None = None,
    max_answer_chars: int = 100,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    chat: bool | None = None,
    expected: bool = True,
    **signal_params,
) -> VerbalizedResult | list[VerbalizedResult]:
    """Ask ``questions`` (one string, or a list answered in one batch) for an answer and a
    verbalized confidence, recording token-level signals of the whole generation.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer, or a vLLM ``LLM``
            built with :func:`tokur_decode.vllm.llm` (tokenizer ``None``: the engine's;
            see :mod:`~tokur_decode.verbalized.vllm_backend`).
        template: the prompt; ``{question}`` is replaced by the question
            (:func:`validate_template`). The chat template wraps it when the tokenizer
            has one (``chat``, as in :func:`tokur_decode.hf.encode_prompts`).
        constrained: constrain the output to :func:`format_regex` then EOS with
            Outlines (transformers: Outlines' logits processor; vLLM: structured outputs,
            the engine's backend, ``outlines`` for :func:`tokur_decode.vllm.llm` engines
            built by the CLI); the parse cannot fail. ``False`` generates freely and
            reports parse failures in ``result.parse_error``.
        mask_order: where the signals are measured, recorded in
            ``trace.meta["mask_order"]`` (:data:`MASK_ORDERS`). ``"monitor-first"``
            (transformers' default): the model's raw distribution, before Outlines'
            mask; ``"mask-first"`` (vLLM's only order): the masked distribution the
            constrained decoder draws from.
        signals: what the monitor records (default :data:`VERBALIZED_SIGNALS`;
            ``max_prob``, ``chosen_logprob`` and ``entropy`` are always added).
        max_answer_chars: bound on the answer line's length under the constraint (1 to
            :data:`MAX_ANSWER_CHARS`).
        max_new_tokens: default (and, constrained, minimum) :func:`max_format_tokens`.
        temperature, top_p, seed: ``0`` decodes greedily; otherwise samples,
            reproducibly under ``seed``.
        expected: score the 101 confidence completions for ``expected_confidence``
            (transformers: one extra forward per batch; vLLM: 11 one-token requests per
            answer, on the prefix cache).
        signal_params: ``logtoku_k``, ``deepconf_k``, ... for the monitor.

    Raises:
        ValueError: naming the parameter, for invalid values.
    """
    single = isinstance(questions, str)
    question_list = [questions] if single else list(questions)
    if not question_list:
        raise ValueError("questions: at least one question is required")
    if not all(isinstance(q, str) for q in question_list):
        raise ValueError("questions: each question must be a string")
    on_vllm = type(model).__module__.split(".")[0] == "vllm"
    if on_vllm and mask_order not in (None, "mask-first"):
        raise ValueError(
            "mask_order: vLLM applies the structured-output mask before any logits "
            "processor, so only 'mask-first' is available there"
        )
    asking = Asking(
        template=template,
        constrained=constrained,
        mask_order=mask_order or ("mask-first" if on_vllm else "monitor-first"),
        signals=signals,
        max_answer_chars=max_answer_chars,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        chat=chat,
        expected=expected,
        signal_params=signal_params,
    )
    for question in question_list:
        build_prompt(question, template)  # validates each before any work
    if on_vllm:
        from .vllm_backend import ask_vllm

        results = ask_vllm(model, tokenizer, question_list, asking)
    else:
        from .hf import ask_transformers

        results = ask_transformers(model, tokenizer, question_list, asking)
    return results[0] if single else results
