"""Calibrated abstention and the probe: p-values and thresholds against an independent
computation, the guarantee across many synthetic calibrations (with a naive rule as the
control that breaks it), cross-fitted probe scores against a reference scikit-learn fit,
and every refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from tokur_decode.experiments.calibration import (
    calibrate,
    fixed_sequence_test,
    min_calibration_items,
)
from tokur_decode.experiments.probe import CS, fit_probe


def _reference_p(errors: int, n: int, risk: float) -> float:
    """Binary Hoeffding-Bentkus p-value of H0: risk > alpha (Learn then Test, sec. 3.2)."""
    r = errors / n
    if r >= risk:
        hoeffding = 1.0
    else:
        h1 = (r * math.log(r / risk) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - risk))
        hoeffding = math.exp(-n * h1)
    return min(hoeffding, float(binom.cdf(errors, n, risk)))


def test_p_values_and_the_fixed_sequence_match_an_independent_computation():
    rng = np.random.default_rng(3)
    u = rng.random(300)
    correct = rng.random(300) > u * 0.8
    grid = np.quantile(u, np.linspace(0.1, 1, 40))
    risk, delta = 0.25, 0.1
    best, p, kept = fixed_sequence_test(correct, u, grid, risk, delta)
    expected = []
    for lam in grid:
        k = u <= lam
        expected.append(_reference_p(int(np.sum(~correct[k])), int(k.sum()), risk))
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(kept, [np.sum(u <= lam) for lam in grid])
    first_fail = next(i for i, q in enumerate(expected) if q > delta)
    assert best == first_fail - 1 and best > 0  # everything before the first failure
    # a first threshold that keeps 3 answers fails, and nothing after it counts
    strict = np.r_[np.sort(u)[2], grid]
    assert fixed_sequence_test(correct, u, strict, risk, delta)[0] is None


def test_a_hand_made_set_gets_the_threshold_worked_out_by_hand():
    # 70 right answers below u = 70, 30 wrong above: at risk 0.1 the rule keeps the
    # right ones and a few wrong ones, never an error rate above what the test allows
    u = np.arange(100.0)
    correct = u < 70
    rule = calibrate(correct, {"u": u}, risk=0.1, delta=0.1, seed=1)
    kept = rule.threshold
    assert 60 <= kept < 78  # not below the clean region, not far into the wrong answers
    cal_kept = rule.coverage * rule.n_calibration
    errors = round(rule.calibration_risk * cal_kept)
    assert rule.p_value == pytest.approx(_reference_p(errors, round(cal_kept), 0.1))
    assert rule.p_value <= 0.1
    assert rule.keeps([0.0, kept, kept + 1e-9]).tolist() == [True, True, False]


def _synthetic(rng, n):
    u = rng.random(n)
    return rng.random(n) > u, u  # P(wrong | u) = u, so P(wrong | u <= lam) = lam / 2


def _true_risk(lam: float) -> float:
    """P(wrong | u <= lam) when u ~ U(0, 1) and P(wrong | u) = u ** 2."""
    return min(lam, 1.0) ** 2 / 3


def test_the_guarantee_holds_across_many_calibrations_and_a_naive_rule_breaks_it():
    risk, delta, n, repeats = 0.2, 0.1, 400, 200
    rng = np.random.default_rng(0)
    failures, naive_failures, coverages = 0, 0, []
    for seed in range(repeats):
        u = rng.random(n)
        correct = rng.random(n) > u**2
        try:
            rule = calibrate(correct, {"u": u}, risk=risk, delta=delta, seed=seed)
        except ValueError as exc:  # nothing certified: abstaining on everything is valid
            assert "no threshold" in str(exc)
            coverages.append(0.0)
            continue
        failures += _true_risk(rule.threshold) > risk  # the true error rate among kept
        coverages.append(min(rule.threshold, 1.0))
        # the control: the loosest threshold whose empirical risk is <= alpha
        order = np.argsort(u)
        empirical = np.cumsum(~correct[order]) / np.arange(1, n + 1)
        naive = u[order][np.flatnonzero(empirical <= risk).max()]
        naive_failures += _true_risk(naive) > risk
    assert failures / repeats <= delta
    assert naive_failures / repeats > 0.3  # without the test the guarantee does not hold
    assert np.mean(coverages) > 0.4  # and the calibrated rule still answers (at most 0.775)


def test_too_few_items_one_class_and_bad_scores_are_refused_with_what_is_missing():
    rng = np.random.default_rng(1)
    correct, u = _synthetic(rng, 40)
    needed = min_calibration_items(0.05, 0.1)
    assert needed == math.ceil(math.log(0.1) / math.log(0.95)) == 45
    with pytest.raises(ValueError, match=r"needs at least 45 calibration items \(65 labelled"):
        calibrate(correct, {"u": u}, risk=0.05, delta=0.1)
    correct, u = _synthetic(rng, 200)
    with pytest.raises(ValueError, match="every answer is right"):
        calibrate(np.ones(200, dtype=bool), {"u": u}, risk=0.2)
    with pytest.raises(ValueError, match=r"score: 'nope' was not recorded; recorded: \['u'\]"):
        calibrate(correct, {"u": u}, risk=0.2, score="nope")
    bad = u.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="score: 'bad' has 1 non-finite values"):
        calibrate(correct, {"u": u, "bad": bad}, risk=0.2, score="bad")
    rule = calibrate(correct, {"u": u, "bad": bad}, risk=0.3)  # not named: left out, said so
    assert rule.score == "u" and rule.skipped == {"bad": "1 non-finite values"}
    for kwargs, name in [
        ({"risk": 0.0}, "risk"),
        ({"risk": 1.5}, "risk"),
        ({"risk": float("nan")}, "risk"),
        ({"risk": 0.2, "delta": 0}, "delta"),
        ({"risk": 0.2, "holdout": 1.0}, "holdout"),
        ({"risk": "0.2"}, "risk"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            calibrate(correct, {"u": u}, **kwargs)
    with pytest.raises(ValueError, match="no threshold on 'u'.*p-value"):
        calibrate(correct, {"u": -u}, risk=0.2, delta=0.01)  # a score pointing the wrong way


def test_the_score_with_the_better_ranking_is_chosen_on_the_held_back_part():
    rng = np.random.default_rng(2)
    correct, u = _synthetic(rng, 600)
    noise = rng.random(600)
    rule = calibrate(correct, {"noise": noise, "u": u}, risk=0.2, delta=0.1)
    assert rule.score == "u"
    assert rule.candidates["u"]["selection_aurc"] < rule.candidates["noise"]["selection_aurc"]
    assert rule.n_selection + rule.n_calibration == 600 and rule.n_selection == 180


def _reference_cross_fit(x, wrong, folds=5, seed=0):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model():
        inner = StratifiedKFold(folds, shuffle=True, random_state=seed)
        return make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(
                Cs=CS,
                l1_ratios=(0.0,),
                cv=inner,
                scoring="neg_log_loss",
                max_iter=5000,
                use_legacy_attributes=False,
            ),
        )

    out = np.zeros(len(wrong))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, wrong):
        out[test] = model().fit(x[train], wrong[train]).predict_proba(x[test])[:, 1]
    return out, model().fit(x, wrong)


def test_cross_fitted_probe_scores_equal_a_reference_scikit_learn_fit():
    import torch

    rng = np.random.default_rng(4)
    n = 160
    wrong = rng.random(n) < 0.4
    table = {
        "entropy:mean": wrong * 1.0 + rng.normal(0, 0.7, n),
        "chosen_logprob:mean": -0.5 * wrong + rng.normal(0, 0.5, n),
        "response_length": rng.integers(2, 30, n).astype(float),
    }
    fit = fit_probe(table, ~wrong)
    x = np.column_stack(list(table.values()))
    expected, full = _reference_cross_fit(x, wrong)
    np.testing.assert_allclose(fit.cross_fitted, expected, rtol=1e-10, atol=1e-12)
    # the exported numbers reproduce the fitted pipeline on new answers
    new = {k: v[:20] + 0.3 for k, v in table.items()}
    got = fit.probe.p_wrong({k: torch.from_numpy(v) for k, v in new.items()}).numpy()
    np.testing.assert_allclose(got, full.predict_proba(np.column_stack(list(new.values())))[:, 1])
    assert fit.probe.C in CS
    with pytest.raises(ValueError, match="at least 10 right and 10 wrong answers"):
        fit_probe({k: v[:20] for k, v in table.items()}, np.r_[np.ones(17), np.zeros(3)] > 0)
    bad = {**table, "entropy:mean": np.r_[np.inf, table["entropy:mean"][1:]]}
    with pytest.raises(ValueError, match=r"non-finite values in \['entropy:mean'\]"):
        fit_probe(bad, ~wrong)


def test_a_probe_candidate_is_fitted_on_the_held_back_part_only():
    rng = np.random.default_rng(5)
    n = 400
    correct, u = _synthetic(rng, n)
    features = {"entropy:mean": u + rng.normal(0, 0.05, n), "response_length": rng.random(n)}
    rule = calibrate(correct, {"noise": rng.random(n)}, risk=0.25, features=features)
    assert rule.score == "probe" and rule.probe is not None
    assert rule.probe.coef[0] > 0  # more entropy, more often wrong
    # the probe saw only the selection part: refitting it there gives the same numbers
    from sklearn.model_selection import train_test_split

    select, _ = train_test_split(
        np.arange(n), test_size=n - math.ceil(0.3 * n), random_state=0, stratify=correct
    )
    again = fit_probe({k: v[select] for k, v in features.items()}, correct[select])
    assert again.probe == rule.probe
