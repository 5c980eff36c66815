"""Best-of-N selection and voting over candidate answers (docs/reference.md section 2).

Pure functions of host-side lists: ``answers`` are the extracted final answers of N
candidates (``None`` for a candidate without one), ``scores`` their response-level
confidences (higher = more confident; negate an uncertainty first). Ties go to the
earliest candidate, so results are deterministic.

Example:
    >>> select(["4", "5", "4"], [0.2, 0.9, 0.3], method="argmax")
    1
    >>> vote(["4", "5", "4"], [0.2, 0.9, 0.3], method="majority")
    '4'
    >>> vote(["4", "5", "4"], [0.2, 0.9, 0.3], method="weighted")
    '5'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["METHODS", "choose", "select", "top_eta", "vote"]

#: Selection methods: argmax picks a candidate; the others vote over answers.
METHODS = ("argmax", "majority", "weighted", "weighted-softmax")


def _check(answers: Sequence, scores: Sequence[float] | None) -> None:
    if not answers:
        raise ValueError("answers: at least one candidate is required")
    if scores is not None:
        if len(scores) != len(answers):
            raise ValueError(f"scores: {len(scores)} scores for {len(answers)} answers")
        if not all(math.isfinite(float(s)) for s in scores):
            raise ValueError("scores: must be finite")


def select(answers: Sequence, scores: Sequence[float], method: str = "argmax") -> int:
    """Index of the chosen candidate: the most confident (``argmax``), or for a voting
    method the most confident candidate among those with the winning answer."""
    _check(answers, scores)
    if method == "argmax":
        return int(np.argmax(np.asarray(scores, dtype=np.float64)))
    winner = vote(answers, scores, method)
    best = max((i for i, a in enumerate(answers) if a == winner), key=lambda i: (scores[i], -i))
    return best


def vote(answers: Sequence, scores: Sequence[float] | None = None, method: str = "majority"):
    """The winning answer (``None`` answers never win unless all are ``None``).

    ``majority``: most frequent. ``weighted``: largest sum of scores (scores must be
    >= 0). ``weighted-softmax``: largest sum of ``softmax(scores)``. ``argmax``: the
    answer of the most confident candidate.
    """
    _check(answers, scores)
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose from {METHODS}")
    if method == "argmax":
        return answers[select(answers, scores, "argmax")]
    if method == "majority":
        weights = np.ones(len(answers))
    else:
        if scores is None:
            raise ValueError(f"scores: required for {method!r} voting")
        s = np.asarray(scores, dtype=np.float64)
        if method == "weighted":
            if np.any(s < 0):
                raise ValueError("scores: weighted voting needs scores >= 0 (use weighted-softmax)")
            weights = s
        else:
            weights = np.exp(s - s.max())
            weights /= weights.sum()
    totals: dict = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    if not totals:
        return None
    return max(totals, key=lambda a: (totals[a], -answers.index(a)))


def top_eta(scores: Sequence[float], eta: float) -> list[int]:
    """Indices of the ``max(1, ceil(eta * N))`` most confident candidates (DeepConf's
    top-eta filter, eta = 0.1 or 0.9), most confident first."""
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    _check(list(range(len(scores))), scores)
    keep = max(1, math.ceil(eta * len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order[:keep]


def choose(
    answers: Sequence, scores: Sequence[float], method: str = "argmax", eta: float = 1.0
) -> int:
    """Index of the final candidate: filter to the top ``eta`` by score, then
    :func:`select` with ``method`` among the kept candidates.

    Example:
        >>> choose(["a", "b", "b", "c"], [0.9, 0.1, 0.2, 0.8], method="majority", eta=0.5)
        0
    """
    kept = top_eta(scores, eta)
    inner = select([answers[i] for i in kept], [scores[i] for i in kept], method)
    return kept[inner]
