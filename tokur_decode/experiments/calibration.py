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
2. On the selection part only: a probe is fitted when ``features`` are given (its
   cross-fitted scores there, :func:`~tokur_decode.experiments.probe.fit_probe`; the
   calibration part is scored by the probe fitted on the whole selection part), the
   score is chosen (the largest coverage that the same test certifies there, ties by
   the area under the risk-coverage curve; or the score the caller names) and the
   thresholds to test are its quantiles there, from the strictest one at which the
   test can still pass with two wrong answers among those kept (:func:`first_tested`,
   so that one unlucky error among the most confident answers does not end the
   sequence; one or none when that would keep more than half the calibration items)
   to keeping every answer.
3. On the calibration part: each threshold's null hypothesis ``P(wrong | kept) >
   alpha`` gets the binary Hoeffding-Bentkus p-value with the number of answers kept
   as sample size (MAPIE's ``compute_hoeffding_bentkus_p_value``), and the thresholds
   are tested in that fixed order, strictest first, until one fails (MAPIE's
   ``control_fwer(..., "fixed_sequence")``), which controls the family-wise error at
   ``delta`` whatever the risk curve looks like: the order was fixed without the
   calibration part. The rule is the loosest threshold certified.

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

from ..core.probe import PROBE, Probe
from .metrics import aurc
from .probe import fit_probe

__all__ = [
    "AbstentionRule",
    "calibrate",
    "first_tested",
    "fixed_sequence_test",
    "min_calibration_items",
]

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
        candidates: per candidate score, the coverage the test certifies on the
            selection part and its area under the risk-coverage curve there.
        skipped: candidate scores left out, with why (non-finite values, a probe that
            could not be fitted).
        probe: the probe the rule's score is, when it is ``"probe"``.
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
    probe: Probe | None = None

    def keeps(self, uncertainty) -> np.ndarray:
        """Which answers the rule keeps, from their uncertainties."""
        return np.asarray(uncertainty, dtype=np.float64) <= self.threshold

    def to_dict(self) -> dict:
        """JSON-able (the probe as its numbers)."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["probe"] = self.probe.to_dict() if self.probe is not None else None
        return data


def min_calibration_items(risk: float, delta: float) -> int:
    """The fewest calibration items with which any rule can be certified: even if all
    ``n`` were kept and right, the p-value ``(1 - risk) ** n`` must reach ``delta``.

    Example:
        >>> min_calibration_items(0.1, 0.1), min_calibration_items(0.05, 0.05)
        (22, 59)
    """
    return math.ceil(math.log(delta) / math.log1p(-risk))


def first_tested(risk: float, delta: float, errors: int = 2) -> int:
    """How many answers the first threshold tested should keep: the fewest with which
    the test passes when ``errors`` of them are wrong.

    Example:
        >>> first_tested(0.2, 0.1), first_tested(0.5, 0.2)
        (25, 8)
    """
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    n = np.arange(errors + 1, 100_000, dtype=np.float64)
    p = compute_hoeffding_bentkus_p_value(errors / n, n, risk, binary=True)[:, 0]
    return int(n[np.argmax(p <= delta)])


def _check(risk: float, delta: float, holdout: float) -> None:
    for name, value in (("risk", risk), ("delta", delta), ("holdout", holdout)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: a number in (0, 1), got {value!r}")
        if not 0 < value < 1:
            raise ValueError(f"{name}: must be in (0, 1), got {value}")


def fixed_sequence_test(
    correct: np.ndarray, u: np.ndarray, grid: np.ndarray, risk: float, delta: float
) -> tuple[int | None, np.ndarray, np.ndarray]:
    """Learn-then-Test with a fixed order: test "``P(wrong | u <= grid[i]) > risk``" for
    ``i = 0, 1, ...`` until one is not rejected at level ``delta`` (binary
    Hoeffding-Bentkus p-values, MAPIE). The order must not depend on these answers.

    Returns:
        ``(index of the last threshold certified, or None; p-values; answers kept)``.

    Example:
        >>> correct = np.array([True] * 30 + [False] * 10)
        >>> u = np.arange(40.0)
        >>> best, p, kept = fixed_sequence_test(correct, u, np.array([19, 29, 31, 39.0]),
        ...                                      risk=0.2, delta=0.1)
        >>> best, kept.tolist()                # 32 kept with 2 wrong is certified; 40, 10 not
        (2, [20.0, 30.0, 32.0, 40.0])
    """
    from mapie.risk_control.fwer_control import control_fwer
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    kept = u[None, :] <= grid[:, None]
    n_kept = kept.sum(axis=1).astype(np.float64)
    errors = (kept & ~correct[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_hat = np.where(n_kept > 0, errors / np.maximum(n_kept, 1), 1.0)
    p = compute_hoeffding_bentkus_p_value(r_hat, n_kept, risk, binary=True)[:, 0]
    p = np.where(n_kept > 0, p, 1.0)
    valid = control_fwer(p, delta, fwer_method="fixed_sequence")
    return (int(valid.max()) if valid.size else None), p, n_kept


def _grid(u_select: np.ndarray, start: float) -> np.ndarray:
    """Thresholds at the selection part's quantiles from coverage ``start`` to 1."""
    return np.unique(np.quantile(u_select, np.linspace(min(start, 1.0), 1.0, GRID)))


def calibrate(
    correct: Sequence[bool],
    scores: Mapping[str, Sequence[float]],
    *,
    risk: float,
    delta: float = 0.1,
    score: str | None = None,
    features: Mapping[str, Sequence[float]] | None = None,
    holdout: float = 0.3,
    seed: int = 0,
) -> AbstentionRule:
    """The calibrated abstention rule for labelled answers (see the module docstring).

    Args:
        correct: whether each answer is right.
        scores: uncertainty per answer (higher = more likely wrong), by score name.
        risk: the error rate allowed among the answers kept (alpha).
        delta: the probability that the guarantee fails.
        score: the score to use (default: chosen on the selection part); ``"probe"``
            for a probe fitted on ``features``.
        features: response scores by name (:mod:`tokur_decode.core.scores`) for a
            probe candidate, fitted on the selection part.
        holdout: the fraction of items held back to choose the score and the thresholds.
        seed: the split's seed.

    Raises:
        ValueError: an invalid parameter, too few items for (risk, delta) (saying how
            many are needed), a single class, an unknown score, a named score with
            non-finite values, or no threshold that can be certified.
    """
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
    known = [*scores, *([PROBE] if features is not None else [])]
    if score is not None and score not in known:
        raise ValueError(f"score: {score!r} was not recorded; recorded: {sorted(known)}")
    table = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    for name, values in table.items():
        if values.shape != (n,):
            raise ValueError(f"scores: {name!r} has {values.size} values for {n} answers")
    skipped = {
        name: f"{int(np.sum(~np.isfinite(v)))} non-finite values"
        for name, v in table.items()
        if not np.all(np.isfinite(v))
    }
    select, cal = train_test_split(
        np.arange(n), test_size=n_cal, random_state=seed, stratify=c if _stratifiable(c) else None
    )
    probe = None
    if features is not None and score in (None, PROBE):
        try:
            probe, table[PROBE] = _selection_probe(features, c, select, cal, seed)
        except ValueError as exc:
            skipped[PROBE] = str(exc)
    if score is not None and score in skipped:
        raise ValueError(f"score: {score!r} has {skipped[score]}")
    names = [score] if score is not None else [k for k in table if k not in skipped]
    if not names:
        raise ValueError(f"scores: no score with finite values ({skipped})")

    errors = next((e for e in (2, 1) if first_tested(risk, delta, e) <= n_cal / 2), 0)
    start = first_tested(risk, delta, errors) / n_cal
    candidates, grids = {}, {}
    for name in names:
        u_sel = table[name][select]
        grids[name] = _grid(u_sel, start)
        best, _, n_kept = fixed_sequence_test(c[select], u_sel, grids[name], risk, delta)
        candidates[name] = {
            "selection_coverage": 0.0 if best is None else float(n_kept[best] / select.size),
            "selection_aurc": aurc(c[select], u_sel),
        }
    chosen = max(
        names, key=lambda k: (candidates[k]["selection_coverage"], -candidates[k]["selection_aurc"])
    )
    u = table[chosen]
    best, p, n_kept = fixed_sequence_test(c[cal], u[cal], grids[chosen], risk, delta)
    if best is None:
        raise ValueError(
            f"risk: no threshold on {chosen!r} keeps the error among kept answers at "
            f"{risk:g} with confidence {1 - delta:g} on these {n_cal} calibration items "
            f"(the first one tested has p-value {p[0]:.3g} > {delta:g}); allow a larger "
            "--risk or --delta, or label more items"
        )
    threshold = float(grids[chosen][best])
    kept = u[cal] <= threshold
    return AbstentionRule(
        score=chosen,
        threshold=threshold,
        risk=float(risk),
        delta=float(delta),
        coverage=float(kept.mean()),
        calibration_risk=float(np.mean(~c[cal][kept])),
        p_value=float(p[best]),
        n_items=n,
        n_selection=int(select.size),
        n_calibration=int(cal.size),
        candidates=candidates,
        skipped=skipped,
        probe=probe if chosen == PROBE else None,
    )


def _selection_probe(features, correct, select, cal, seed) -> tuple[Probe, np.ndarray]:
    """A probe fitted on the selection part and its scores: cross-fitted there (to
    compare it with the other candidates, and for its thresholds: closer to how it
    scores unseen answers than its in-sample values), its own on the calibration part
    (which it never saw)."""
    import torch

    columns = {k: np.asarray(v, dtype=np.float64) for k, v in features.items()}
    fit = fit_probe({k: v[select] for k, v in columns.items()}, correct[select], seed=seed)
    values = np.full(correct.size, np.nan)
    values[select] = fit.cross_fitted
    on_cal = {k: torch.from_numpy(v[cal]) for k, v in columns.items()}
    values[cal] = fit.probe.p_wrong(on_cal).numpy()
    return fit.probe, values


def _stratifiable(c: np.ndarray) -> bool:
    return min(int(c.sum()), int((~c).sum())) >= 2
