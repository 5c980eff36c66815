"""Best-of-N selection and voting over candidate answers (docs/reference.md section 2).

Pure functions of host-side lists: ``answers`` are the extracted final answers of N
candidates (``None`` for a candidate without one), ``scores`` their response-level
confidences (higher = more confident; negate an uncertainty first). Ties go to the
earliest candidate, so results are deterministic.

Example:
    >>> choose(["4", "5", "4"], [0.2, 0.9, 0.3], method="argmax")
    1
    >>> vote(["4", "5", "4"], [0.2, 0.9, 0.3], method="majority")
    '4'
    >>> vote(["4", "5", "4"], [0.2, 0.9, 0.3], method="weighted")
    '5'
    >>> vote(["4", "5", "4"], [0.2, 0.9, 0.3], method="borda")   # 3^0.5 < 2^0.5 + 1^0.5
    '4'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["ETA_RULES", "METHODS", "choose", "top_eta", "vote"]

#: Selection methods: argmax picks a candidate; the others vote over answers.
METHODS = ("argmax", "majority", "weighted", "weighted-softmax", "borda")
#: How many candidates a top-``eta`` filter keeps (see :func:`top_eta`).
ETA_RULES = ("deepconf", "tokur", "ceil")


def _check(answers: Sequence, scores: Sequence[float] | None) -> None:
    if not answers:
        raise ValueError("answers: at least one candidate is required")
    if scores is not None:
        if len(scores) != len(answers):
            raise ValueError(f"scores: {len(scores)} scores for {len(answers)} answers")
        if not all(math.isfinite(float(s)) for s in scores):
            raise ValueError("scores: must be finite")


def _pick(
    answers: Sequence, scores: Sequence[float], method: str = "argmax", *, borda_p: float = 0.5
) -> int:
    """Index of the chosen candidate: the most confident (``argmax``), or for a voting
    method the most confident candidate among those with the winning answer."""
    _check(answers, scores)
    if method == "argmax":
        return int(np.argmax(np.asarray(scores, dtype=np.float64)))
    winner = vote(answers, scores, method, borda_p=borda_p)
    best = max((i for i, a in enumerate(answers) if a == winner), key=lambda i: (scores[i], -i))
    return best


def vote(
    answers: Sequence,
    scores: Sequence[float] | None = None,
    method: str = "majority",
    *,
    borda_p: float = 0.5,
):
    """The winning answer (``None`` answers never win unless all are ``None``).

    ``majority``: most frequent. ``weighted``: largest sum of scores (scores must be
    >= 0). ``weighted-softmax``: largest sum of ``softmax(scores)``. ``borda``:
    Self-Certainty's Borda vote (Kang et al. 2025): the candidate ranked ``r`` by score
    (1 = most confident, ties to the earlier) casts ``(N - r + 1) ** borda_p`` votes
    (``borda_p`` > 0; the paper tunes it per ``N``). ``argmax``: the answer of the most
    confident candidate.
    """
    _check(answers, scores)
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose from {METHODS}")
    if not (math.isfinite(borda_p) and borda_p > 0):
        raise ValueError(f"borda_p: must be > 0, got {borda_p}")
    if method == "majority":
        weights = np.ones(len(answers))
    elif scores is None:
        raise ValueError(f"scores: required for {method!r} voting")
    elif method == "argmax":
        return answers[_pick(answers, scores, "argmax")]
    else:
        s = np.asarray(scores, dtype=np.float64)
        if method == "borda":
            order = sorted(range(len(s)), key=lambda i: (-s[i], i))
            weights = np.empty(len(s))
            weights[order] = (len(s) - np.arange(len(s))) ** borda_p  # rank r = 1 + position
        elif method == "weighted":
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


def top_eta(scores: Sequence[float], eta: float, rule: str = "deepconf") -> list[int]:
    """Indices of the most confident candidates, most confident first (ties: the
    earlier first), as the top-``eta`` filter of ``rule`` keeps them:

    * ``"deepconf"`` (DeepConf, Fu et al. 2025, eta = 0.1 or 0.9): every candidate with
      ``score >= percentile(scores, (1 - eta) * 100)`` (numpy's linear percentile; ties
      at the threshold all kept);
    * ``"tokur"`` (TokUR's evaluation): the ``max(1, int(eta * N))`` best;
    * ``"ceil"``: the ``max(1, ceil(eta * N))`` best.

    Example:
        >>> top_eta([0.1, 0.5, 0.5, 0.9], 0.5), top_eta([0.1, 0.5, 0.5, 0.9], 0.3, "tokur")
        ([3, 1, 2], [3])
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    if rule not in ETA_RULES:
        raise ValueError(f"rule: unknown {rule!r}; choose from {ETA_RULES}")
    _check(list(range(len(scores))), scores)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if rule == "deepconf":
        threshold = np.percentile(np.asarray(scores, dtype=np.float64), (1 - eta) * 100)
        return [i for i in order if scores[i] >= threshold]
    n = len(scores)
    keep = max(1, int(eta * n) if rule == "tokur" else math.ceil(eta * n))
    return order[:keep]


def choose(
    answers: Sequence,
    scores: Sequence[float],
    method: str = "argmax",
    eta: float = 1.0,
    *,
    eta_rule: str = "deepconf",
    borda_p: float = 0.5,
) -> int:
    """Index of the final candidate: filter to the top ``eta`` by score
    (:func:`top_eta` with ``eta_rule``; ``eta = 1`` keeps all), then the most confident
    (``argmax``), or for a voting method the most confident candidate among those with
    the winning answer (:func:`vote`).

    Example:
        >>> choose(["a", "b", "b", "c"], [0.9, 0.1, 0.2, 0.8], method="majority", eta=0.5)
        0
    """
    _check(answers, scores)
    kept = top_eta(scores, eta, eta_rule)
    inner = _pick([answers[i] for i in kept], [scores[i] for i in kept], method, borda_p=borda_p)
    return kept[inner]
