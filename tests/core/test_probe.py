"""Response scores by name and the probe over them: a float64 reference, plain-data round
trips, and clear errors for what is missing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokur_decode.core import aggregate
from tokur_decode.core.probe import Probe
from tokur_decode.core.scores import LENGTH, outputs_read, response_scores
from tokur_decode.core.trace import Trace


def _trace() -> Trace:
    g = torch.Generator().manual_seed(0)
    return Trace(
        {"entropy": torch.rand(3, 5, generator=g), "max_prob": torch.rand(3, 5, generator=g)},
        torch.zeros(3, 5, dtype=torch.long),
        torch.tensor([5, 2, 0]),
    )


def test_response_scores_are_the_aggregates_and_name_what_is_missing():
    trace = _trace()
    got = response_scores(trace, ["entropy:mean", "max_prob:naive", LENGTH])
    torch.testing.assert_close(
        got["entropy:mean"], aggregate.mean(trace.signals["entropy"], trace.lengths)
    )
    torch.testing.assert_close(
        got["max_prob:naive"], aggregate.naive(trace.signals["max_prob"], trace.lengths)
    )
    assert got[LENGTH].tolist() == [5.0, 2.0, 0.0]
    assert all(torch.isfinite(v).all() for v in got.values())  # an empty answer included
    with pytest.raises(ValueError, match="'margin:mean' reads 'margin', which was not recorded"):
        response_scores(trace, ["margin:mean"])
    for bad in ("entropy", "entropy:median", ":mean"):
        with pytest.raises(ValueError, match="is not a response score"):
            response_scores(trace, [bad])
    assert outputs_read(["entropy:max", LENGTH, "entropy:sum", "margin:min"]) == (
        "entropy",
        "margin",
    )


def _probe(**changes) -> Probe:
    fields = dict(
        features=("entropy:mean", "max_prob:min", LENGTH),
        mean=(0.5, 0.4, 3.0),
        scale=(0.2, 0.3, 2.0),
        coef=(1.5, -2.0, 0.25),
        intercept=-0.3,
        C=0.1,
    )
    return Probe(**{**fields, **changes})


def test_the_probe_is_a_logistic_regression_on_standardised_scores():
    probe, trace = _probe(), _trace()
    got = probe.p_wrong_trace(trace)
    scores = response_scores(trace, probe.features)
    for row in range(len(trace)):  # a float64 reference, one answer at a time
        z = probe.intercept + sum(
            c * (float(scores[f][row]) - m) / s
            for f, m, s, c in zip(probe.features, probe.mean, probe.scale, probe.coef, strict=True)
        )
        assert float(got[row]) == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-6)
    assert got.dtype == torch.float64 and probe.outputs == ("entropy", "max_prob")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    st.lists(st.floats(-50, 50), min_size=3, max_size=3),
)
def test_probabilities_stay_in_zero_one_and_rise_with_a_positive_coefficient(x, coef):
    probe = _probe(coef=tuple(coef))
    scores = {f: torch.tensor([v, v + 1.0]) for f, v in zip(probe.features, x, strict=True)}
    p = probe.p_wrong(scores)
    assert torch.all((p >= 0) & (p <= 1)) and torch.isfinite(p).all()
    shifted = {**scores, probe.features[0]: scores[probe.features[0]] + 1.0}
    moved = probe.p_wrong(shifted) - p
    if coef[0] > 0:
        assert torch.all(moved >= 0)
    elif coef[0] < 0:
        assert torch.all(moved <= 0)


def test_plain_data_round_trips_and_bad_tables_name_the_key(tmp_path):
    probe = _probe()
    assert Probe.from_dict(json.loads(json.dumps(probe.to_dict()))) == probe
    probe.save(tmp_path / "p.json")
    assert Probe.load(tmp_path / "p.json") == probe
    base = probe.to_dict()
    for change, message in [
        ({"coef": [1.0]}, "probe.coef: 1 values for 3 features"),
        ({"scale": [1.0, 0.0, 1.0]}, "probe.scale: every value must be > 0"),
        ({"mean": [1.0, float("nan"), 1.0]}, "probe.mean: every value must be a finite"),
        ({"features": ["entropy:mean", "nope", LENGTH]}, "'nope' is not a response score"),
        ({"extra": 1}, "unknown key"),
        ({"coef": "1,2,3"}, "probe.coef: a list"),
    ]:
        with pytest.raises(ValueError, match=message):
            Probe.from_dict({**base, **change})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['intercept'\]"):
        Probe.from_dict({k: v for k, v in base.items() if k != "intercept"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Probe.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"needs the scores \['max_prob:min'\]"):
        probe.p_wrong({"entropy:mean": torch.zeros(1), LENGTH: torch.zeros(1)})
