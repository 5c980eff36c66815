"""Fitting a :class:`~tokur_decode.core.probe.Probe` on a labelled run (scikit-learn).

:func:`fit_probe` standardises the response scores and fits an L2 logistic regression
for "the answer is wrong" whose regularisation strength is chosen by inner
cross-validation (``LogisticRegressionCV``). It returns the probe fitted on every item
and **cross-fitted** scores: each item's probability comes from a probe fitted on the
other folds only, so detection metrics and calibration on them are not flattered by
items the probe has seen.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> wrong = rng.random(200) < 0.5
    >>> table = {"entropy:mean": wrong + rng.normal(0, 0.5, 200),
    ...          "response_length": rng.normal(10, 2, 200)}
    >>> fit = fit_probe(table, ~wrong)
    >>> fit.probe.features, round(float(np.mean((fit.cross_fitted > 0.5) == wrong)), 1)
    (('entropy:mean', 'response_length'), 0.9)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..core import aggregate
from ..core.probe import Probe
from ..core.scores import LENGTH, check_score_name

__all__ = ["ProbeFit", "fit_probe", "probe_features"]

#: Regularisation strengths tried by the inner cross-validation.
CS = np.logspace(-3, 2, 11)


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe and its cross-fitted probabilities of a wrong answer per item."""

    probe: Probe
    cross_fitted: np.ndarray
    folds: int


def probe_features(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """The features a probe can read from ``eval`` records: every response score that
    every record has with a finite value, and the answer's length. Step-level scores
    are left out: on short answers (one step) they repeat the per-token ones, and
    near-duplicate features cost a probe fitted on a small run (a probe over them can
    still be made by name)."""
    names = [
        n
        for n in records[0]["scores"]
        if ":" in n and n.partition(":")[2] not in aggregate.STEP_REDUCERS
    ]
    table = {LENGTH: np.array([float(r["n_tokens"]) for r in records])}
    for name in names:
        values = np.array([r["scores"].get(name, np.nan) for r in records], dtype=np.float64)
        if np.all(np.isfinite(values)):
            table[name] = values
    return table


def _pipeline(folds: int, seed: int):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    inner = StratifiedKFold(folds, shuffle=True, random_state=seed)
    model = LogisticRegressionCV(
        Cs=CS,
        l1_ratios=(0.0,),  # L2
        cv=inner,
        scoring="neg_log_loss",
        max_iter=5000,
        use_legacy_attributes=False,
    )
    return make_pipeline(StandardScaler(), model)


def fit_probe(
    features: Mapping[str, Sequence[float]],
    correct: Sequence[bool],
    *,
    folds: int = 5,
    seed: int = 0,
) -> ProbeFit:
    """Fit a probe for "wrong" on ``features`` (score name -> one value per item).

    Raises:
        ValueError: one class only, a class with fewer than ``2 * folds`` items, a
            non-finite feature value, or a name that is not a response score.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if folds < 2:
        raise ValueError(f"folds: at least 2, got {folds}")
    names = list(features)
    if not names:
        raise ValueError("features: at least one response score is required")
    for name in names:
        check_score_name(name)
    x = np.column_stack([np.asarray(features[n], dtype=np.float64) for n in names])
    wrong = ~np.asarray(correct, dtype=bool)
    if x.shape[0] != wrong.size:
        raise ValueError(f"features: {x.shape[0]} values per feature for {wrong.size} items")
    bad = [n for n, column in zip(names, x.T, strict=True) if not np.all(np.isfinite(column))]
    if bad:
        raise ValueError(f"features: non-finite values in {bad}")
    smaller = min(int(wrong.sum()), int((~wrong).sum()))
    need = 2 * folds  # each outer training part keeps >= folds of each for the inner CV
    if smaller < need:
        which = "wrong" if wrong.sum() <= (~wrong).sum() else "right"
        raise ValueError(
            f"correct: a probe needs at least {need} right and {need} wrong answers for "
            f"{folds}-fold cross-fitting with {folds}-fold regularisation choice; this run "
            f"has {smaller} {which}"
        )
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
    cross = cross_val_predict(_pipeline(folds, seed), x, wrong, cv=outer, method="predict_proba")
    pipeline = _pipeline(folds, seed).fit(x, wrong)
    scaler, model = pipeline[0], pipeline[-1]
    probe = Probe(
        features=tuple(names),
        mean=tuple(float(v) for v in scaler.mean_),
        scale=tuple(float(v) for v in scaler.scale_),
        coef=tuple(float(v) for v in model.coef_[0]),
        intercept=float(model.intercept_[0]),
        C=float(model.C_),
    )
    return ProbeFit(probe, cross[:, 1], folds)
