"""Detection metrics for "is this answer wrong?", with bootstrap intervals.

Convention throughout: ``correct`` is a boolean per item, ``uncertainty`` a float per
item where **higher means more likely wrong** (negate a confidence first). The task is
to detect WRONG answers, so the positive class is *wrong*:

* ``auroc``: ``roc_auc_score(wrong, uncertainty)`` (scikit-learn). Flipping both the
  labels and the score leaves AUROC unchanged, so this equals TokUR's
  ``roc_auc_score(correct, confidence)``.
* ``auprc``: average precision of detecting wrong answers,
  ``average_precision_score(wrong, uncertainty)`` (scikit-learn's step-wise sum, not
  the trapezoid rule; its chance level is the error rate).
* ``top_p_accuracy``: accuracy of the ``max(1, floor(p * N))`` least uncertain answers.
* ``prr``: prediction rejection ratio (LM-Polygraph):
  ``(AUC_method - AUC_random) / (AUC_oracle - AUC_random)``, where the AUC is the mean
  accuracy of the kept answers over rejection counts ``0 .. N-1`` (most uncertain
  rejected first), ``AUC_random`` is the plain accuracy and the oracle rejects wrong
  answers first. 1 = oracle, 0 = random.
* selective prediction (:func:`selective_metrics`): ``risk@c``, the error rate of the
  ``max(1, floor(c * N))`` least uncertain answers; ``coverage@r``, the largest
  fraction of answers (least uncertain first) whose error rate is at most ``r``;
  ``aurc``, the area under the risk-coverage curve (mean error rate of the ``k`` least
  uncertain answers over ``k = 1 .. N``; lower is better).
* ``ece``: expected calibration error of a confidence in [0, 1] (10 equal-width bins):
  ``sum_b n_b / N * |accuracy_b - mean confidence_b|``.

Tied uncertainties are broken at random *in expectation*: the ranking-based metrics
(top-p accuracy, PRR, the risk-coverage curve) use, within a group of tied scores, the
group's mean correctness, so a constant score gets exactly the random baseline.
Metrics that are undefined (one class only) are ``nan``.

Example:
    >>> correct = [True, True, False, False]
    >>> uncertainty = [0.1, 0.2, 0.9, 0.3]
    >>> auroc(correct, uncertainty), prr(correct, uncertainty)
    (1.0, 1.0)
    >>> top_p_accuracy(correct, uncertainty, 0.5)
    1.0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DETECTION_METRICS",
    "TOP_P",
    "Interval",
    "auprc",
    "auroc",
    "aurc",
    "bootstrap",
    "detection_metrics",
    "detection_values",
    "ece",
    "prr",
    "reliability",
    "risk_coverage",
    "selective_metrics",
    "top_p_accuracy",
]

#: Fractions for the Top-p accuracy columns.
TOP_P = (0.1, 0.25, 0.5, 0.75)
#: Coverages of the ``risk@c`` columns and risks of the ``coverage@r`` columns.
COVERAGES = (0.25, 0.5, 0.75)
RISKS = (0.1, 0.2, 0.3)


def _arrays(correct, uncertainty) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(correct, dtype=bool)
    u = np.asarray(uncertainty, dtype=np.float64)
    if c.shape != u.shape or c.ndim != 1:
        raise ValueError(f"correct and uncertainty must be 1-D of one length: {c.shape}, {u.shape}")
    if c.size == 0:
        raise ValueError("correct: at least one item is required")
    if not np.all(np.isfinite(u)):
        raise ValueError("uncertainty: must be finite")
    return c, u


def auroc(correct, uncertainty) -> float:
    """Area under the ROC curve for detecting wrong answers (``nan`` with one class)."""
    from sklearn.metrics import roc_auc_score

    c, u = _arrays(correct, uncertainty)
    if c.all() or not c.any():
        return math.nan
    return float(roc_auc_score(~c, u))


def auprc(correct, uncertainty) -> float:
    """Average precision for detecting wrong answers (``nan`` when all are correct)."""
    from sklearn.metrics import average_precision_score

    c, u = _arrays(correct, uncertainty)
    if c.all():
        return math.nan
    return float(average_precision_score(~c, u))


def _ranked(correct, uncertainty) -> np.ndarray:
    """Correctness ordered from least to most uncertain, ties replaced by their mean."""
    c, u = _arrays(correct, uncertainty)
    order = np.argsort(u, kind="stable")
    us, cs = u[order], c[order].astype(np.float64)
    _, start, counts = np.unique(us, return_index=True, return_counts=True)
    means = np.add.reduceat(cs, start) / counts
    return np.repeat(means, counts)


def _top_p(ranked: np.ndarray, p: float) -> float:
    return float(ranked[: max(1, math.floor(p * ranked.size))].mean())


def top_p_accuracy(correct, uncertainty, p: float) -> float:
    """Accuracy of the ``max(1, floor(p * N))`` least uncertain answers."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    return _top_p(_ranked(correct, uncertainty), p)


def risk_coverage(correct, uncertainty) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, accuracy)``: accuracy of the ``k`` least uncertain answers at
    coverage ``k / N``, ``k = 1 .. N``.

    Example:
        >>> risk_coverage([True, False], [0.0, 1.0])
        (array([0.5, 1. ]), array([1. , 0.5]))
    """
    ranked = _ranked(correct, uncertainty)
    k = np.arange(1, ranked.size + 1)
    return k / ranked.size, np.cumsum(ranked) / k


def _prr(c: np.ndarray, ranked: np.ndarray) -> float:
    if c.all() or not c.any():
        return math.nan
    k = np.arange(1, c.size + 1)
    method = (np.cumsum(ranked) / k).mean()
    oracle = (np.minimum(k, c.sum()) / k).mean()  # correct answers kept first
    random = c.mean()
    return float((method - random) / (oracle - random))


def prr(correct, uncertainty) -> float:
    """Prediction rejection ratio (``nan`` when all answers are right or all wrong)."""
    c, _ = _arrays(correct, uncertainty)
    return _prr(c, _ranked(correct, uncertainty))


def reliability(correct, confidence, bins: int = 10):
    """Per equal-width bin of ``confidence`` in [0, 1]: ``(count, mean confidence,
    accuracy)`` arrays (``nan`` for empty bins)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    c, conf = _arrays(correct, confidence)
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence: must be in [0, 1]")
    index = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(index, conf, minlength=bins) / count
        accuracy = np.bincount(index, c.astype(np.float64), minlength=bins) / count
    return count, mean_conf, accuracy


def ece(correct, confidence, bins: int = 10) -> float:
    """Expected calibration error of ``confidence`` (in [0, 1]) with ``bins`` bins.

    Example:
        >>> ece([True, False], [0.9, 0.9])
        0.4
    """
    count, mean_conf, accuracy = reliability(correct, confidence, bins)
    used = count > 0
    return float(np.sum(count[used] / count.sum() * np.abs(accuracy[used] - mean_conf[used])))


# --------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% bootstrap interval (``nan`` bounds when undefined)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        """JSON-able (``nan`` as ``None``)."""
        return {k: None if math.isnan(v) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Interval:
        return cls(*(math.nan if d[k] is None else d[k] for k in ("value", "low", "high")))

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return format(self.value, spec)
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def bootstrap(
    statistic: Callable[..., np.ndarray | float],
    *data: Sequence,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[Interval]:
    """Point values and 95% percentile intervals of a (vector-valued) ``statistic`` of
    paired ``data`` (items resampled with replacement, ``scipy.stats.bootstrap``).

    Resamples where a metric is undefined (``nan``, e.g. AUROC of a one-class resample)
    are left out of that metric's interval.

    Example:
        >>> [iv.value for iv in bootstrap(np.mean, [1.0, 2.0, 3.0], n_resamples=50)]
        [2.0]
    """
    from scipy import stats

    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    arrays = [np.asarray(d) for d in data]
    point = np.atleast_1d(np.asarray(statistic(*arrays), dtype=np.float64))
    if arrays[0].size < 2:
        return [Interval(float(v), math.nan, math.nan) for v in point]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            arrays,
            lambda *a: np.asarray(statistic(*a), dtype=np.float64),
            paired=True,
            vectorized=False,
            n_resamples=n_resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(point.size, -1)
    out = []
    for value, row in zip(point, dist, strict=True):
        row = row[np.isfinite(row)]
        low, high = np.percentile(row, [2.5, 97.5]) if row.size else (math.nan, math.nan)
        out.append(Interval(float(value), float(low), float(high)))
    return out


def detection_metrics(
    correct, uncertainty, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Interval]:
    """AUROC, AUPRC, PRR and Top-p accuracy (:data:`TOP_P`) with 95% intervals.

    Example:
        >>> m = detection_metrics([True, False, True, False], [0.1, 0.9, 0.2, 0.8],
        ...                       n_resamples=50)
        >>> sorted(m), m["auroc"].value
        (['auprc', 'auroc', 'prr', 'top_0.1', 'top_0.25', 'top_0.5', 'top_0.75'], 1.0)
    """
    intervals = bootstrap(_detection, correct, uncertainty, n_resamples=n_resamples, seed=seed)
    return dict(zip(DETECTION_METRICS, intervals, strict=True))


#: The names of :func:`detection_metrics` and :func:`detection_values`, in order.
DETECTION_METRICS = ("auroc", "auprc", "prr", *(f"top_{p}" for p in TOP_P))


def detection_values(correct, uncertainty) -> dict[str, float]:
    """The point values of :func:`detection_metrics` (no bootstrap).

    Example:
        >>> detection_values([True, False, True, False], [0.1, 0.9, 0.2, 0.8])["auroc"]
        1.0
    """
    c, u = _arrays(correct, uncertainty)
    return dict(zip(DETECTION_METRICS, _detection(c, u), strict=True))


def _detection(c, u) -> list[float]:
    ranked = _ranked(c, u)
    return [auroc(c, u), auprc(c, u), _prr(c, ranked), *(_top_p(ranked, p) for p in TOP_P)]


def _risks(ranked: np.ndarray) -> np.ndarray:
    """Error rate of the ``k`` least uncertain answers, ``k = 1 .. N``."""
    return 1 - np.cumsum(ranked) / np.arange(1, ranked.size + 1)


def aurc(correct, uncertainty) -> float:
    """Area under the risk-coverage curve (ties in random order, in expectation).

    Example:
        >>> aurc([True, False], [0.0, 1.0]), aurc([True, False], [0.5, 0.5])
        (0.25, 0.5)
    """
    return float(_risks(_ranked(correct, uncertainty)).mean())


def _selective(ranked: np.ndarray) -> list[float]:
    k = np.arange(1, ranked.size + 1)
    risk = _risks(ranked)
    ok = [k[risk <= r + 1e-12] for r in RISKS]
    return [
        float(risk.mean()),
        *(1 - _top_p(ranked, c) for c in COVERAGES),
        *(float(x.max() / ranked.size) if x.size else 0.0 for x in ok),
    ]


def selective_metrics(
    correct, uncertainty, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Interval]:
    """AURC, risk at :data:`COVERAGES` and coverage at :data:`RISKS`, with 95% intervals.

    Example:
        >>> m = selective_metrics([True, True, False, False], [0.1, 0.2, 0.9, 0.3],
        ...                       n_resamples=50)
        >>> round(m["aurc"].value, 4), m["risk@0.5"].value, m["coverage@0.3"].value
        (0.2083, 0.0, 0.5)
    """
    names = ["aurc", *(f"risk@{c}" for c in COVERAGES), *(f"coverage@{r}" for r in RISKS)]
    intervals = bootstrap(
        lambda c, u: _selective(_ranked(c, u)),
        correct,
        uncertainty,
        n_resamples=n_resamples,
        seed=seed,
    )
    return dict(zip(names, intervals, strict=True))
