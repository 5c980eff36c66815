"""The vLLM backend of :func:`tokur_decode.verbalized.ask`: structured outputs constrain
the format, :class:`tokur_decode.vllm.UncertaintyProcessor` records the signals, and
one-token scoring requests give the confidence number's distribution.

The engine must carry the processor and the trace extension
(:func:`tokur_decode.vllm.llm`). The structured-output backend is the engine's
(``structured_outputs_config``; vLLM has no per-request choice); ``tokur-decode generate
--verbalized --backend vllm`` builds its engine with ``outlines``, and the trace records
which one ran in ``meta["structured_outputs_backend"]``. vLLM applies the structured
output bitmask to the logits before any logits processor, so the signals are measured
on the masked distribution (``mask_order="mask-first"``).

Example:
    >>> from tokur_decode.verbalized import ask
    >>> from tokur_decode.verbalized.vllm_backend import engine
    >>> llm = engine(enforce_eager=True)                                     # doctest: +SKIP
    >>> r = ask(llm, None, "What is the capital of France?")                 # doctest: +SKIP
    >>> r.answer, r.trace.meta["mask_order"]                                 # doctest: +SKIP
    ('Paris', 'mask-first')
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .asking import Asking
from .format import build_prompt, confidence_tree, format_regex, locate
from .result import VerbalizedResult, constraint_meta

__all__ = ["REGEX_TIMEOUT_S", "ask_vllm", "confidence_logprobs", "engine"]

#: Seconds vLLM may take to compile the format's regex (its default, 5 s, is too
#: short for a 100-character answer on a busy CPU: SmolLM2's vocabulary, 2 cores).
REGEX_TIMEOUT_S = 60


def engine(model: str | None = None, **kwargs):
    """A :func:`tokur_decode.vllm.llm` engine for verbalized questions: the ``outlines``
    structured-output backend (unless ``structured_outputs_config`` says otherwise) and
    ``VLLM_REGEX_COMPILATION_TIMEOUT_S`` raised to :data:`REGEX_TIMEOUT_S` unless set."""
    from .. import vllm as tv

    os.environ.setdefault("VLLM_REGEX_COMPILATION_TIMEOUT_S", str(REGEX_TIMEOUT_S))
    kwargs.setdefault("structured_outputs_config", {"backend": "outlines"})
    return tv.llm(model=model, **kwargs)


def ask_vllm(
    engine,
    tokenizer,
    questions: Sequence[str],
    asking: Asking,
) -> list[VerbalizedResult]:
    """One batch of requests for all ``questions``, as ``asking`` says."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from ..vllm import prompt_token_ids, read_traces, uncertainty_args

    tokenizer = tokenizer if tokenizer is not None else engine.get_tokenizer()
    prompts = prompt_token_ids(
        tokenizer, [build_prompt(q, asking.template) for q in questions], asking.chat
    )
    sampled = asking.temperature > 0
    params = SamplingParams(
        max_tokens=asking.max_new_tokens,
        temperature=asking.temperature,
        top_p=asking.top_p if sampled else 1.0,
        seed=asking.seed if sampled else None,
        structured_outputs=(
            StructuredOutputsParams(regex=format_regex(asking.max_answer_chars))
            if asking.constrained
            else None
        ),
        extra_args=uncertainty_args(list(asking.signals), **asking.signal_params),
    )
    outputs = engine.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
    )
    traces = read_traces(engine, outputs, tokenizer)
    if any(trace is None for trace in traces):
        raise ValueError("engine: no trace came back (build it with tokur_decode.vllm.llm)")
    backend = engine.llm_engine.vllm_config.structured_outputs_config.backend
    rows = []
    for trace in traces:
        trace.meta.update(
            constraint_meta(asking.constrained, asking.mask_order, asking.max_answer_chars),
            structured_outputs_backend=backend if asking.constrained else None,
        )
        rows.append(locate(tokenizer, trace.token_ids[0, : int(trace.lengths[0])].tolist()))
    contexts = [
        prompt + trace.token_ids[0, : r.confidence_span.start].tolist()
        if asking.expected and r.number_aligned
        else None
        for prompt, trace, r in zip(prompts, traces, rows, strict=True)
    ]
    logprobs = confidence_logprobs(engine, tokenizer, contexts)
    return [
        VerbalizedResult.located(question, found, trace, lp)
        for question, trace, found, lp in zip(questions, traces, rows, logprobs, strict=True)
    ]


def confidence_logprobs(
    engine, tokenizer, contexts: Sequence[list[int] | None]
) -> list[np.ndarray | None]:
    """Per context (the prompt and the response up to the confidence number, as token
    ids), ``[101]`` float64 log-probabilities that the constrained decoder, sampling at
    temperature 1 from the raw model, states ``n = 0..100`` (``None`` where the context is
    ``None``); the same law as :func:`tokur_decode.verbalized.hf.confidence_logprobs`.

    One request per context and branching prefix of the
    :class:`~tokur_decode.verbalized.format.ConfidenceTree` (SmolLM2: 11), each
    generating one token with ``logprob_token_ids`` set to the tokens the format allows
    there: vLLM returns their raw log-probabilities, and the prefix cache serves the
    shared context.
    """
    from vllm import SamplingParams, TokensPrompt

    wanted = [i for i, c in enumerate(contexts) if c is not None]
    if not wanted:
        return [None] * len(contexts)
    tree = confidence_tree(tokenizer)
    requests = [(i, prefix) for i in wanted for prefix in tree.branching]
    outputs = engine.generate(
        [TokensPrompt(prompt_token_ids=contexts[i] + list(prefix)) for i, prefix in requests],
        [
            SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=list(tree.allowed[p]))
            for _, p in requests
        ],
        use_tqdm=False,
    )
    scores: dict[tuple, list[list[float]]] = {prefix: [] for prefix in tree.branching}
    for (_, prefix), out in zip(requests, outputs, strict=True):
        step = out.outputs[0].logprobs[0]
        scores[prefix].append([step[t].logprob for t in tree.allowed[prefix]])
    total = tree.completion_logprobs({p: np.array(v) for p, v in scores.items()})
    found = dict(zip(wanted, total, strict=True))
    return [found.get(i) for i in range(len(contexts))]
