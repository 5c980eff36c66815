"""Rules named after a peer compute what the peer computes: each against a copy written
from the peer's definition (DeepConf's bottom-10% and top-eta filter, TokUR's top-p,
Self-Certainty's Borda vote), with a control where the rules differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokur_decode.core import aggregate
from tokur_decode.core.select import choose, top_eta, vote

scores_lists = st.lists(
    st.floats(-5, 5, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 2)),
    min_size=1,
    max_size=24,
)
etas = st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]) | st.floats(0.01, 1.0)


def deepconf_filter(confs, eta):
    """DeepConf's offline filter: keep the traces at or above the (1 - eta) percentile."""
    threshold = np.percentile(confs, (1 - eta) * 100)
    return {i for i, c in enumerate(confs) if c >= threshold}


def tokur_top_p(scores, p):
    """TokUR's evaluation: the int(N * p) best (at least one)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return set(order[: max(1, int(len(scores) * p))].tolist())


def deepconf_bottom_10(confs, window, bottom=0.1):
    """DeepConf's bottom-10% group confidence: sliding-window means, the mean of the
    lowest max(1, int(G * bottom))."""
    confs = list(confs)
    if len(confs) < window:
        groups = [np.mean(confs)]
    else:
        groups = [np.mean(confs[i : i + window]) for i in range(len(confs) - window + 1)]
    k = max(1, int(len(groups) * bottom))
    return float(np.mean(sorted(groups)[:k]))


def borda(answers, scores, p):
    """Self-Certainty's Borda vote: rank r (1 = most confident) casts (N - r + 1)^p."""
    n = len(scores)
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    totals = {}
    for r, i in enumerate(ranked, start=1):
        if answers[i] is not None:
            totals[answers[i]] = totals.get(answers[i], 0.0) + (n - r + 1) ** p
    return max(totals, key=lambda a: (totals[a], -answers.index(a))) if totals else None


@settings(max_examples=200, deadline=None)
@given(scores_lists, etas)
def test_top_eta_rules_equal_their_definitions(scores, eta):
    assert set(top_eta(scores, eta)) == deepconf_filter(scores, eta)  # the default
    assert set(top_eta(scores, eta, "tokur")) == tokur_top_p(scores, eta)
    kept = top_eta(scores, eta, "ceil")
    assert len(kept) == max(1, int(np.ceil(eta * len(scores))))
    for rule in ("deepconf", "tokur", "ceil"):
        got = top_eta(scores, eta, rule)
        assert [scores[i] for i in got] == sorted((scores[i] for i in got), reverse=True)


def test_control_the_three_filters_differ():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert len(top_eta(scores, 0.5)) == 4  # >= the median: 0.6 included
    assert len(top_eta(scores, 0.5, "tokur")) == 3  # int(3.5)
    assert len(top_eta(scores, 0.5, "ceil")) == 4
    assert len(top_eta([1.0, 1.0, 1.0, 0.0], 0.1)) == 3  # ties at the threshold all kept
    assert len(top_eta([1.0, 1.0, 1.0, 0.0], 0.1, "tokur")) == 1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=60),
    st.integers(1, 12),
)
def test_bottom_groups_equal_deepconf(values, window):
    got = aggregate.reduce("deepconf_bottom_groups", torch.tensor([values]), window=window)
    assert float(got[0]) == pytest.approx(deepconf_bottom_10(values, window), abs=1e-4)


def test_control_bottom_groups_int_versus_ceil():
    values = torch.arange(16.0)[None]  # 15 groups of 2: int(1.5) = 1, ceil(1.5) = 2
    deepconf = aggregate.reduce("deepconf_bottom_groups", values, window=2)
    ceil = aggregate.reduce("deepconf_bottom_groups", values, window=2, rule="ceil")
    assert float(deepconf[0]) == 0.5 and float(ceil[0]) == 1.0
    with pytest.raises(ValueError, match="rule"):
        aggregate.reduce("deepconf_bottom_groups", values, rule="floor")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=12),
    st.data(),
    st.sampled_from([0.3, 0.5, 1.0, 2.0]),
)
def test_borda_vote_equals_self_certainty(answers, data, p):
    scores = data.draw(st.lists(st.floats(-3, 3), min_size=len(answers), max_size=len(answers)))
    assert vote(answers, scores, "borda", borda_p=p) == borda(answers, scores, p)


def test_control_borda_differs_from_majority_and_argmax():
    answers, scores = ["x", "y", "y", "z"], [0.9, 0.1, 0.2, 0.3]
    # ranks: x 1 (4 votes), z 2 (3), y 3 and 4 (2 + 1): p = 1 ties x and y -> x first
    assert vote(answers, scores, "majority") == "y"
    assert vote(answers, scores, "borda", borda_p=2.0) == "x"  # 16 vs 4 + 1
    assert vote(answers, scores, "borda", borda_p=0.3) == "y"  # 1.23 + 1 > 1.52
    assert choose(answers, scores, "borda", borda_p=2.0) == 0
    with pytest.raises(ValueError, match="borda_p"):
        vote(answers, scores, "borda", borda_p=0.0)
