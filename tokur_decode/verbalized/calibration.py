"""Calibration of confidence scores: expected calibration error, reliability-diagram
data, and a small built-in question set with known answers.

Binning (both functions): ``n_bins`` equal-width bins over ``[0, 1]``; bin ``b`` holds
the confidences in ``[b / n_bins, (b + 1) / n_bins)``, the last bin also holds 1.0
(confidence ``c`` goes to bin ``min(floor(c * n_bins), n_bins - 1)``).
``ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b|`` over the non-empty bins.

Example:
    >>> conf = [0.95, 0.9, 0.3, 0.35]
    >>> correct = [True, False, False, True]
    >>> round(expected_calibration_error(conf, correct, n_bins=10), 4)   # (2*0.425 + 2*0.175)/4
    0.3
    >>> reliability_diagram(conf, correct, n_bins=2).count.tolist()
    [2, 2]
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CAPITALS",
    "ReliabilityDiagram",
    "expected_calibration_error",
    "is_correct",
    "reliability_diagram",
]

#: A small built-in set: (question, accepted answers). Answers are matched by
#: :func:`is_correct`.
CAPITALS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Kenya?", ("Nairobi",)),
    ("What is the capital of Brazil?", ("Brasilia", "Brasília")),
)


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin data of a reliability diagram (``n_bins`` entries each; empty bins have
    ``count`` 0 and NaN means).

    Attributes:
        edges: ``[n_bins + 1]`` bin edges.
        mean_confidence: mean confidence of each bin.
        accuracy: fraction correct in each bin.
        count: number of answers in each bin.
    """

    edges: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def _inputs(confidences, correct, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"correct: {hit.size} labels for {conf.size} confidences")
    if conf.size == 0:
        raise ValueError("confidences: at least one is required")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must be in [0, 1] (no NaN)")
    if not np.all((hit == 0) | (hit == 1)):
        raise ValueError("correct must be booleans (or 0/1)")
    return conf, hit


def reliability_diagram(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> ReliabilityDiagram:
    """Mean confidence, accuracy and count per bin (binning in the module docstring)."""
    conf, hit = _inputs(confidences, correct, n_bins)
    index = np.minimum(np.floor(conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=hit, minlength=n_bins) / count
    return ReliabilityDiagram(np.linspace(0.0, 1.0, n_bins + 1), mean_conf, accuracy, count)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> float:
    """ECE with ``n_bins`` equal-width bins (docs/reference.md: 10 for verbalized confidence)."""
    d = reliability_diagram(confidences, correct, n_bins)
    full = d.count > 0
    gaps = np.abs(d.accuracy[full] - d.mean_confidence[full])
    return float(np.sum(d.count[full] * gaps) / d.count.sum())


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def is_correct(answer: str | None, accepted: Sequence[str]) -> bool:
    """Whether an accepted answer occurs in ``answer`` as a whole word (case and accents
    ignored); an abstention or a missing answer is never correct.

    Example:
        >>> is_correct("The capital of Brazil is Brasília.", ("Brasilia",))
        True
        >>> is_correct("Parisian", ("Paris",))
        False
    """
    if not answer:
        return False
    words = _fold(answer)
    for gold in accepted:
        g = _fold(gold)
        start = words.find(g)
        while start >= 0:
            end = start + len(g)
            before = words[start - 1] if start else " "
            after = words[end] if end < len(words) else " "
            if not before.isalnum() and not after.isalnum():
                return True
            start = words.find(g, start + 1)
    return False
