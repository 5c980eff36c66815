"""Verbalized confidence as a :class:`~tokur_decode.strategies.Backend`: every answer
is asked with :func:`~tokur_decode.verbalized.ask` (constrained ``Answer:`` /
``Confidence:`` format) on an in-process transformers or vLLM backend.

What a row answers (``Decoded.texts``) is the answer line; the stated, expected and
combined confidences and the answer span's geometric-mean probability are its
response-level scores (``Decoded.scores``, named by :data:`VERBALIZED_SCORES`; a score
that is unavailable for an answer, e.g. the expected confidence of a number not
starting at a token boundary, is left out).

Example:
    >>> from tokur_decode.hf import HFBackend
    >>> from tokur_decode.models import load_default
    >>> backend = VerbalizedBackend(HFBackend(*load_default()))              # doctest: +SKIP
    >>> out = backend.decode(["What is 2 + 2?"], Request(("entropy",)))      # doctest: +SKIP
    >>> out.texts, sorted(out.scores[0])                                     # doctest: +SKIP
    (['4'], ['answer_geomean_prob', 'verbalized_combined', ...])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

from ..core.trace import Trace
from ..strategies.backend import Backend, Decoded, Request

__all__ = ["VERBALIZED_SCORES", "VerbalizedBackend"]

#: The response-level scores of :class:`VerbalizedBackend` (confidences, higher = more
#: likely right), from :attr:`~tokur_decode.verbalized.VerbalizedResult.scores`.
VERBALIZED_SCORES = {
    "verbalized_confidence": "verbalized",
    "verbalized_expected": "expected_verbalized",
    "verbalized_combined": "combined",
    "answer_geomean_prob": "answer_geomean_prob",
}


class VerbalizedBackend:
    """Verbalized confidence on top of an in-process backend.

    The answer's length is bounded by ``max_answer_chars``, so the request's
    ``max_new_tokens`` is not used. ``n`` answers per prompt are ``n`` batched asks with
    seeds ``seed, seed + 1, ...``. Acts inside decoding are not offered (the format's
    constraint is the only logits edit).

    Args:
        inner: a :class:`~tokur_decode.hf.HFBackend` or
            :class:`~tokur_decode.vllm.VLLMBackend` (or a deferred one): its model,
            tokenizer, chat setting and signal parameters are used.
        ask_options: :func:`~tokur_decode.verbalized.ask` options (``template``,
            ``max_answer_chars``, ``mask_order``, ...).
    """

    acts: tuple[type, ...] = ()

    def __init__(self, inner: Backend, **ask_options) -> None:
        if inner.describe()["backend"] not in ("hf", "vllm"):
            raise ValueError("inner: verbalized confidence runs in-process (hf or vllm)")
        self.inner: Any = inner  # its engine's attributes are read (model or engine, ...)
        self.ask_options = ask_options

    def describe(self) -> dict:
        return {**self.inner.describe(), "verbalized": self.ask_options}

    def particles(self, prompts: Sequence[str], request: Request):
        raise ValueError("act: verbalized confidence does not advance in steps")

    def decode(self, prompts: Sequence[str], request: Request) -> Decoded:
        from . import ask

        if request.act is not None:
            raise ValueError("act: verbalized confidence does not act inside decoding")
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompt_template: a system prompt does not go with --verbalized")
        inner = self.inner
        if inner.describe()["backend"] == "hf":
            model, tokenizer = inner.model, inner.tokenizer
        else:
            model, tokenizer = inner.engine, None
        sampling, n = request.sampling, request.n
        seed = 0 if sampling.seed is None else sampling.seed
        options = dict(
            signals=list(request.signals),
            chat=inner.chat,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            **inner.signal_params,
            **self.ask_options,
        )
        draws = [
            cast(list, ask(model, tokenizer, list(prompts), seed=seed + j, **options))
            for j in range(n)
        ]
        results = [draw[i] for i in range(len(prompts)) for draw in draws]  # prompt-major
        trace = Trace.concat([r.trace for r in results])
        return Decoded(
            trace=trace,
            prompt_of=[i for i in range(len(prompts)) for _ in range(n)],
            events=[[] for _ in results],
            tokens=int(trace.lengths.sum()),
            scores=[_scores(r) for r in results],
            texts=[r.answer or "" for r in results],
        )


def _scores(result) -> dict[str, float]:
    return {
        name: result.scores[key]
        for name, key in VERBALIZED_SCORES.items()
        if math.isfinite(result.scores[key])
    }
