"""Calibrated abstention: a threshold on a score with a finite-sample guarantee on the
error rate among the answers kept (Learn then Test; Angelopoulos et al. 2021, see
docs/reference.md section 5).

The rule keeps an answer when its uncertainty ``u`` (a score oriented so that higher
means "more likely wrong", :func:`tokur_decode.experiments.scoring.uncertainty`) is at
most ``lambda``. For a target ``risk`` (alpha) and ``delta``, :func:`calibrate` returns a
``lambda`` such that, with probability at least ``1 - delta`` over the calibration
data, ``P(wrong | kept) <= alpha`` for new answers from the same distribution.

How (every step that looks at labels is accounted for):

1. The labelled items are split at random (stratified on right/wrong) into a
   *selection* part (``holdout``, 30% by default) and a *calibration* part.
2. On the selection part only: the score is chosen (the largest coverage at empirical
   risk <= alpha, ties by the area under the risk-coverage curve; or the score the
   caller names), the grid of thresholds is its quantiles there, and the order in which
   the thresholds are tested is learned from their p-values there (MAPIE's
   ``learn_fixed_sequence_order``).
3. On the calibration part: each threshold's null hypothesis ``P(wrong | kept) >
   alpha`` gets the binary Hoeffding-Bentkus p-value with the number of answers kept
   as sample size; fixed-sequence testing in the learned order controls the
   family-wise error at ``delta`` (MAPIE's ``BinaryClassificationController`` with
   ``fwer_method="split_fixed_sequence"``); the threshold kept is the valid one that
   keeps the most answers.

Too few calibration items for (alpha, delta) is refused before any fitting: even a rule
whose kept answers were all right needs ``n >= log(delta) / log(1 - alpha)`` of them.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u = rng.random(600)
    >>> correct = rng.random(600) > u            # the more uncertain, the more often wrong
    >>> rule = calibrate(correct, {"u": u}, risk=0.2, delta=0.1)
    >>> rule.score, rule.calibration_risk <= 0.2, 0.2 < rule.coverage < 0.6
    ('u', True, True)
    >>> calibrate(correct[:10], {"u": u[:10]}, risk=0.05, delta=0.1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: risk: ... needs at least 45 calibration items (65 labelled items, ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AbstentionRule", "calibrate", "min_calibration_items"]

#: Thresholds tested (quantiles of the chosen score on the selection part).
GRID = 100


@dataclass(frozen=True)
class AbstentionRule:
    """A calibrated rule: keep an answer when its uncertainty ``score`` is at most
    ``threshold`` (see the module docstring for the guarantee).

    Attributes:
        score: the score's name.
        threshold: ``lambda``, on the uncertainty scale.
        risk, delta: the guarantee's alpha and delta.
        coverage: the fraction of calibration items kept (an estimate of the fraction
            of new answers kept).
        calibration_risk: the error rate among the calibration items kept.
        p_value: the threshold's p-value on the calibration part.
        n_items, n_selection, n_calibration: labelled items, and how they were split.
        candidates: per candidate score, its selection-part coverage at the target risk
            and its area under the risk-coverage curve there.
        skipped: candidate scores left out, with why (non-finite values).
    """

    score: str
    threshold: float
    risk: float
    delta: float
    coverage: float
    calibration_risk: float
    p_value: float
    n_items: int
    n_selection: int
    n_calibration: int
    candidates: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def keeps(self, uncertainty) -> np.ndarray:
        """Which answers the rule keeps, from their uncertainties."""
        return np.asarray(uncertainty, dtype=np.float64) <= self.threshold

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def min_calibration_items(risk: float, delta: float) -> int:
    """The fewest calibration items with which any rule can be certified: even if all
    ``n`` were kept and right, the p-value ``(1 - risk) ** n`` must reach ``delta``.

    Example:
        >>> min_calibration_items(0.1, 0.1), min_calibration_items(0.05, 0.05)
        (22, 59)
    """
    return math.ceil(math.log(delta) / math.log1p(-risk))


def _check(risk: float, delta: float, holdout: float) -> None:
    for name, value in (("risk", risk), ("delta", delta), ("holdout", holdout)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: a number in (0, 1), got {value!r}")
        if not 0 < value < 1:
            raise ValueError(f"{name}: must be in (0, 1), got {value}")


def _coverage_at_risk(correct: np.ndarray, u: np.ndarray, risk: float) -> tuple[float, float]:
    """``(largest coverage with empirical risk <= risk, area under the risk-coverage
    curve)``, thresholds only between distinct values."""
    order = np.argsort(u, kind="stable")
    wrong = (~correct[order]).astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(u[order])), u.size - 1] + 1  # kept counts
    risks = np.cumsum(wrong)[ends - 1] / ends
    ok = ends[risks <= risk]
    k = np.arange(1, u.size + 1)
    return (float(ok.max() / u.size) if ok.size else 0.0), float(np.mean(np.cumsum(wrong) / k))


def calibrate(
    correct: Sequence[bool],
    scores: Mapping[str, Sequence[float]],
    *,
    risk: float,
    delta: float = 0.1,
    score: str | None = None,
    holdout: float = 0.3,
    seed: int = 0,
) -> AbstentionRule:
    """The calibrated abstention rule for labelled answers (see the module docstring).

    Args:
        correct: whether each answer is right.
        scores: uncertainty per answer (higher = more likely wrong), by score name.
        risk: the error rate allowed among the answers kept (alpha).
        delta: the probability that the guarantee fails.
        score: the score to use (default: chosen on the selection part).
        holdout: the fraction of items held back to choose the score and the thresholds.
        seed: the split's seed.

    Raises:
        ValueError: an invalid parameter, too few items for (risk, delta) (saying how
            many are needed), a single class, an unknown score, a named score with
            non-finite values, or no threshold that can be certified.
    """
    from mapie.risk_control import BinaryClassificationController, precision
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
    from sklearn.model_selection import train_test_split

    _check(risk, delta, holdout)
    c = np.asarray(correct, dtype=bool)
    n = c.size
    needed = min_calibration_items(risk, delta)
    n_cal = n - math.ceil(holdout * n)
    if n_cal < needed:
        looser = 2 * risk if 2 * risk < 1 else None
        hint = ""
        if looser is not None:
            need = min_calibration_items(looser, delta)
            hint = (
                f"; risk {looser:g} needs {need} calibration items "
                f"({math.ceil(need / (1 - holdout))} in all)"
            )
        raise ValueError(
            f"risk: holding the error among kept answers at {risk:g} with delta {delta:g} "
            f"needs at least {needed} calibration items ({math.ceil(needed / (1 - holdout))} "
            f"labelled items, with {holdout:.0%} held back to choose the rule); this run "
            f"has {n} ({n_cal} for calibration){hint}"
        )
    if c.all() or not c.any():
        which = "right" if c.all() else "wrong"
        raise ValueError(
            f"correct: every answer is {which}; calibration needs both right and wrong "
            "answers (a run on harder or easier items)"
        )
    if score is not None and score not in scores:
        raise ValueError(f"score: {score!r} was not recorded; recorded: {sorted(scores)}")
    table = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    for name, values in table.items():
        if values.shape != (n,):
            raise ValueError(f"scores: {name!r} has {values.size} values for {n} answers")
    skipped = {
        name: f"{int(np.sum(~np.isfinite(v)))} non-finite values"
        for name, v in table.items()
        if not np.all(np.isfinite(v))
    }
    if score is not None and score in skipped:
        raise ValueError(f"score: {score!r} has {skipped[score]}")
    names = [score] if score is not None else [k for k in table if k not in skipped]
    if not names:
        raise ValueError(f"scores: no score with finite values ({skipped})")

    select, cal = train_test_split(
        np.arange(n), test_size=n_cal, random_state=seed, stratify=c if _stratifiable(c) else None
    )
    candidates = {}
    for name in names:
        cov, aurc = _coverage_at_risk(c[select], table[name][select], risk)
        candidates[name] = {"selection_coverage": cov, "selection_aurc": aurc}
    chosen = max(
        names, key=lambda k: (candidates[k]["selection_coverage"], -candidates[k]["selection_aurc"])
    )
    u = table[chosen]
    grid = np.unique(np.quantile(u[select], np.linspace(0, 1, GRID)))

    def predict(x):  # MAPIE keeps an item when column 1 >= the parameter: use -u >= -lambda
        x = np.asarray(x, dtype=np.float64)
        return np.column_stack([x, -x])

    controller = BinaryClassificationController(
        predict_function=predict,
        risk=precision,  # precision of "kept" = accuracy among the answers kept
        target_level=1 - risk,
        confidence_level=1 - delta,
        list_predict_params=-grid,
        fwer_method="split_fixed_sequence",
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MAPIE warns when the risk is not monotone in lambda
        controller.learn_fixed_sequence_order(u[select], c[select].astype(int), binary=True)
        controller.calibrate(u[cal], c[cal].astype(int))
    if controller.best_predict_param is None:
        raise ValueError(
            f"risk: no threshold on {chosen!r} keeps the error among kept answers at "
            f"{risk:g} with confidence {1 - delta:g} on these {n_cal} calibration items "
            "(allow a larger --risk or --delta, or label more items)"
        )
    threshold = -float(controller.best_predict_param)
    kept = u[cal] <= threshold
    calibration_risk = float(np.mean(~c[cal][kept]))
    p_value = compute_hoeffding_bentkus_p_value(
        np.array([calibration_risk]), np.array([float(kept.sum())]), risk, binary=True
    )
    return AbstentionRule(
        score=chosen,
        threshold=threshold,
        risk=float(risk),
        delta=float(delta),
        coverage=float(kept.mean()),
        calibration_risk=calibration_risk,
        p_value=float(p_value.ravel()[0]),
        n_items=n,
        n_selection=int(select.size),
        n_calibration=int(cal.size),
        candidates=candidates,
        skipped=skipped,
    )


def _stratifiable(c: np.ndarray) -> bool:
    return min(int(c.sum()), int((~c).sum())) >= 2
