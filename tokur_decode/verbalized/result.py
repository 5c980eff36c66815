"""The result of a verbalized-confidence question, its response-level scores, and the
combination of verbalized and token-level confidence (backend-agnostic).

Example:
    >>> import numpy as np
    >>> logprobs = np.full(101, -np.inf)
    >>> logprobs[[80, 90]] = np.log([0.25, 0.75])
    >>> dist, expected = confidence_expectation(logprobs)
    >>> round(expected, 4)
    0.875
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..core import aggregate
from ..core.select import choose
from ..core.signals import parse_signals, wants_samples
from ..core.trace import Trace
from .format import Located, format_regex, is_abstention

__all__ = [
    "MASK_ORDERS",
    "SCORES",
    "VERBALIZED_SIGNALS",
    "VerbalizedResult",
    "combined_confidence",
    "confidence_expectation",
    "constraint_meta",
    "select_best",
    "signal_names",
]

#: Where the monitor sits relative to the format's mask (``trace.meta["mask_order"]``),
#: and what its signals then describe (``trace.meta["measured_on"]``).
#: ``monitor-first``: the model's raw distribution (transformers' default);
#: ``mask-first``: the distribution the constrained decoder draws from (masked tokens
#: have probability 0; the only order vLLM has, whose structured-output bitmask is
#: applied before any logits processor).
MASK_ORDERS = {
    "monitor-first": "raw logits (the monitor runs before the format's mask)",
    "mask-first": "logits after the format's mask (masked tokens have probability 0)",
}

#: What the monitor records by default: the answer-span scores need chosen_logprob,
#: max_prob and entropy; chosen_prob and LogTokU feed the CLI table.
VERBALIZED_SIGNALS = ("max_prob", "chosen_prob", "chosen_logprob", "entropy", "logtoku")
_REQUIRED = ("max_prob", "chosen_logprob", "entropy")

#: Response-level scores of a :class:`VerbalizedResult` (``result.scores``), with their
#: direction. ``answer_*`` scores aggregate token signals over the answer span only.
SCORES = {
    "verbalized": "confidence: the stated confidence / 100",
    "expected_verbalized": "confidence: probability-weighted confidence over 0..100, / 100",
    "answer_mean_logprob": "confidence: mean log-probability of the answer's tokens",
    "answer_geomean_prob": "confidence: exp(answer_mean_logprob)",
    "answer_mean_max_prob": "confidence: mean max-probability over the answer's tokens",
    "answer_mean_entropy": "uncertainty: mean entropy (nats) over the answer's tokens",
    "combined": "confidence: combined_confidence(result) (defaults)",
}

_TOKEN_SCORES = ("answer_geomean_prob", "answer_mean_max_prob")
_VERBALIZED = ("expected", "stated")


def constraint_meta(constrained: bool, mask_order: str, max_answer_chars: int) -> dict:
    """What a verbalized trace records about the constraint (``trace.meta``): the mask
    order and what the signals describe, whether the output was constrained, the regex.

    Example:
        >>> constraint_meta(False, "monitor-first", 10)["measured_on"]
        'raw logits (no constraint)'
    """
    return {
        "mask_order": mask_order if constrained else None,
        "measured_on": MASK_ORDERS[mask_order] if constrained else "raw logits (no constraint)",
        "constrained": constrained,
        "format": format_regex(max_answer_chars) if constrained else None,
    }


def signal_names(signals: Iterable[str] | str | None) -> tuple[str, ...]:
    """The signals to record: ``signals`` (default :data:`VERBALIZED_SIGNALS`) plus those
    the answer-span scores need.

    Example:
        >>> signal_names("margin")
        ('margin', 'max_prob', 'chosen_logprob', 'entropy')
    """
    if signals is None:
        return VERBALIZED_SIGNALS
    names = parse_signals(signals)
    if wants_samples(names):
        raise ValueError("signals: 'tokur' is not supported with verbalized questions")
    return names + tuple(n for n in _REQUIRED if n not in names)


def confidence_expectation(logprobs: np.ndarray) -> tuple[np.ndarray, float]:
    """The distribution over confidences 0..100 and its expectation divided by 100.

    ``logprobs[n]`` is the log-probability (up to a common offset) of stating ``n``; the
    distribution is their softmax in float64.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.shape != (101,):
        raise ValueError(f"logprobs: expected 101 values (confidence 0..100), got {lp.shape}")
    top = lp.max()
    if not np.isfinite(top):
        raise ValueError("logprobs: no completion has a finite log-probability")
    p = np.exp(lp - top)
    p /= p.sum()
    return p, float(p @ np.arange(101)) / 100.0


@dataclass
class VerbalizedResult:
    """One answered question.

    Attributes:
        question: as asked.
        text: the generated response (special tokens removed).
        answer: the parsed answer line (``None`` when an unconstrained parse failed).
        confidence: the stated confidence / 100, in ``[0, 1]`` (``None`` likewise).
        abstained: the answer is ``NO ANSWER`` (any case).
        trace: token signals of the whole generation (one row; ``trace.meta`` records
            ``mask_order``, ``constrained`` and the ``format`` regex).
        answer_span: token indices (into ``trace``) of the answer text only: not
            ``Answer:``, not the newline, not ``Confidence:``, not the digits. It decodes
            to the answer, preceded by the format's space when the tokenizer glues it to
            the first word (SmolLM2: ``" Paris"``, but ``" "`` + ``"2"`` before digits).
        confidence_span: token indices of the confidence number.
        confidence_logprobs: ``[101]`` log-probabilities that the constrained decoder,
            sampling from the raw model at temperature 1 where the number starts, states
            confidence 0..100 (see :func:`tokur_decode.verbalized.hf.confidence_logprobs`);
            ``None`` when not computed.
        parse_error: why the parse failed (unconstrained output only), else ``None``.
    """

    question: str
    text: str
    answer: str | None
    confidence: float | None
    abstained: bool
    trace: Trace
    answer_span: range
    confidence_span: range
    confidence_logprobs: np.ndarray | None = None
    parse_error: str | None = None

    @classmethod
    def located(
        cls,
        question: str,
        found: Located,
        trace: Trace,
        confidence_logprobs: np.ndarray | None = None,
    ) -> VerbalizedResult:
        """The result for a response that :func:`~tokur_decode.verbalized.format.locate`
        parsed, with its one-row ``trace``."""
        return cls(
            question=question,
            text=found.text,
            answer=found.parsed.answer,
            confidence=found.parsed.confidence,
            abstained=is_abstention(found.parsed.answer),
            trace=trace,
            answer_span=found.answer_span,
            confidence_span=found.confidence_span,
            confidence_logprobs=confidence_logprobs,
            parse_error=found.parsed.error,
        )

    @property
    def confidence_distribution(self) -> np.ndarray | None:
        """``[101]`` probabilities of stating confidence 0..100 (sums to 1)."""
        if self.confidence_logprobs is None:
            return None
        return confidence_expectation(self.confidence_logprobs)[0]

    @property
    def expected_confidence(self) -> float | None:
        """``sum_n p(n) n / 100``, ``p`` = :attr:`confidence_distribution`: the mean
        confidence the constrained decoder would state when sampling the number at
        temperature 1 (the stated one is its greedy or sampled draw); in ``[0, 1]``."""
        if self.confidence_logprobs is None:
            return None
        return confidence_expectation(self.confidence_logprobs)[1]

    def answer_signal(self, name: str, reducer: str = "mean", **params) -> float:
        """Token signal ``name`` aggregated over the answer span by ``reducer`` (see
        :data:`tokur_decode.core.aggregate.REDUCERS`); NaN when there is no answer span."""
        if name not in self.trace.signals:
            raise KeyError(f"signal {name!r} not recorded; have {list(self.trace.signals)}")
        if not self.answer_span:
            return math.nan
        span = self.answer_span
        values = self.trace.signals[name][:, span.start : span.stop]
        return float(aggregate.reduce(reducer, values, None, **params)[0])

    @cached_property
    def scores(self) -> dict[str, float]:
        """Every score of :data:`SCORES` by name (NaN where unavailable)."""
        nan = math.nan

        def span_mean(name: str) -> float:
            return self.answer_signal(name) if name in self.trace.signals else nan

        mean_logprob = span_mean("chosen_logprob")
        return {
            "verbalized": nan if self.confidence is None else self.confidence,
            "expected_verbalized": (
                nan if self.expected_confidence is None else self.expected_confidence
            ),
            "answer_mean_logprob": mean_logprob,
            "answer_geomean_prob": math.exp(mean_logprob),
            "answer_mean_max_prob": span_mean("max_prob"),
            "answer_mean_entropy": span_mean("entropy"),
            "combined": combined_confidence(self),
        }


def combined_confidence(
    result: VerbalizedResult,
    *,
    verbalized: str = "expected",
    token: str = "answer_geomean_prob",
    weight: float = 0.5,
) -> float:
    """Verbalized confidence combined with the token-level confidence of the answer span:
    the weighted geometric mean ``v ** weight * t ** (1 - weight)``.

    ``v`` is the expected verbalized confidence (``verbalized="expected"``) or the stated
    one (``"stated"``); ``t`` is ``answer_geomean_prob`` (the geometric mean of the answer
    tokens' probabilities, i.e. ``exp`` of their mean log-probability: the format tokens
    and the digits are excluded) or ``answer_mean_max_prob``. With ``weight = 0.5`` it is
    the square root of ``v * t``: it ranks like the product and stays on the inputs'
    scale. NaN when ``v`` or ``t`` is unavailable (a failed unconstrained parse, or the
    expected confidence not computed).

    Example:
        >>> import torch
        >>> from tokur_decode.core.trace import Trace
        >>> trace = Trace({"chosen_logprob": torch.log(torch.tensor([[0.5, 0.9, 0.4]]))},
        ...               torch.tensor([[5, 6, 7]]), torch.tensor([3]))
        >>> r = VerbalizedResult("q", "Answer: x\\nConfidence: 64", "x", 0.64, False, trace,
        ...                      answer_span=range(1, 3), confidence_span=range(0))
        >>> round(combined_confidence(r, verbalized="stated"), 4)    # sqrt(0.64 * 0.6)
        0.6197
    """
    if verbalized not in _VERBALIZED:
        raise ValueError(f"verbalized: choose from {_VERBALIZED}, got {verbalized!r}")
    if token not in _TOKEN_SCORES:
        raise ValueError(f"token: choose from {_TOKEN_SCORES}, got {token!r}")
    if not 0 <= weight <= 1:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    v = result.expected_confidence if verbalized == "expected" else result.confidence
    signal = "chosen_logprob" if token == "answer_geomean_prob" else "max_prob"
    if v is None or signal not in result.trace.signals:
        return math.nan
    t = result.answer_signal(signal)
    if token == "answer_geomean_prob":
        t = math.exp(t)
    return float(v**weight * t ** (1 - weight))


def select_best(
    results: Sequence[VerbalizedResult],
    score: str = "combined",
    *,
    method: str = "argmax",
    eta: float = 1.0,
    higher_is_better: bool | None = None,
) -> int:
    """Best-of-N over candidate answers to one question: the index of the chosen result
    by ``score`` (a key of :data:`SCORES`) with :func:`tokur_decode.core.select.choose`
    (``argmax``, or a vote over answers after the top-``eta`` filter). Candidates whose
    score is NaN (no answer parsed) are left out. ``higher_is_better`` defaults to the
    score's direction in :data:`SCORES`.
    """
    if score not in SCORES:
        raise ValueError(f"score: unknown {score!r}; choose from {list(SCORES)}")
    if higher_is_better is None:
        higher_is_better = SCORES[score].startswith("confidence")
    values = [r.scores[score] for r in results]
    kept = [i for i, v in enumerate(values) if math.isfinite(v)]
    if not kept:
        raise ValueError(f"results: no candidate has a finite {score!r} score")
    sign = 1.0 if higher_is_better else -1.0
    answers = [(results[i].answer or "").strip().rstrip(".").lower() for i in kept]
    return kept[choose(answers, [sign * values[i] for i in kept], method, eta)]
