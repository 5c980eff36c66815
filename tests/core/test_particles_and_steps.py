"""Particle weights and systematic resampling against their definitions; reasoning
steps: the host-side step index and the on-device step ends agree; step reducers
against a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokur_decode.core import aggregate as A
from tokur_decode.core.particles import effective_sample_size, normalized, systematic_resample
from tokur_decode.core.steps import StepEnds, step_index
from tokur_decode.core.trace import Trace

# --------------------------------------------------------------------------- resampling


def test_resampling_on_hand_made_weights():
    w = np.array([0.5, 0.3, 0.15, 0.05])
    # points (u + j) / 4 for u = 0.1: 0.025, 0.275, 0.525, 0.775 against edges .5 .8 .95 1
    assert systematic_resample(w, 0.1).tolist() == [0, 0, 1, 1]
    # u = 0.9: 0.225, 0.475, 0.725, 0.975: the smallest particle survives once
    assert systematic_resample(w, 0.9).tolist() == [0, 0, 1, 3]
    assert effective_sample_size(w) == pytest.approx(1 / (0.25 + 0.09 + 0.0225 + 0.0025))
    assert effective_sample_size(np.full(8, 1 / 8)) == pytest.approx(8.0)
    assert effective_sample_size([0.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert systematic_resample([0.0, 1.0, 0.0], 0.0).tolist() == [1, 1, 1]  # weight 0 never kept


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16).filter(lambda w: sum(w) > 1e-6),
    st.floats(0.0, 0.999999),
)
def test_systematic_counts_are_floor_or_ceil_of_n_times_weight(raw, u):
    w = np.asarray(raw) / np.sum(raw)
    kept = systematic_resample(w, u)
    counts = np.bincount(kept, minlength=w.size)
    n = w.size
    assert counts.sum() == n and np.all(np.diff(kept) >= 0)
    assert np.all(counts >= np.floor(n * w - 1e-9)) and np.all(counts <= np.ceil(n * w + 1e-9))
    assert np.all(counts[w == 0] == 0)


def test_normalized_weights():
    assert normalized(np.log([2.0, 1.0, 1.0])).tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert normalized([1000.0, 1000.0]).tolist() == [0.5, 0.5]  # no overflow
    assert normalized([-math.inf, 0.0]).tolist() == [0.0, 1.0]
    for broken in ([math.nan, 0.0], [math.inf, 0.0], [-math.inf, -math.inf]):
        assert normalized(broken).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="log_weights"):
        normalized([])
    with pytest.raises(ValueError, match="u: "):
        systematic_resample([1.0], 1.0)


# --------------------------------------------------------------------------- steps

PIECES = ["a", "\n", "\n\n", ".\n\n", "b\n", "\nc", " ", "\n\n\n"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(PIECES) - 1), min_size=0, max_size=30))
def test_step_ends_on_device_agree_with_the_step_index(ids):
    """The decoding-time rule (new token, or a split across two tokens) ends steps at
    the same tokens as the text rule for a two-character delimiter."""
    ends = StepEnds(PIECES, "\n\n")
    expected = step_index([[PIECES[i] for i in ids]], "\n\n", width=len(ids))[0].tolist()
    state, step, got = ends.start(1), 0, []
    for i in ids:
        got.append(step)
        ended, state = ends.update(torch.tensor([i]), state)
        if bool(ended[0]):
            step, state = step + 1, ends.start(1)
    assert got == expected


def test_step_ends_ignore_ids_beyond_the_pieces_and_step_index_pads():
    ends = StepEnds(["a", "\n\n"], size=4)  # a padded vocabulary
    ended, _ = ends.update(torch.tensor([1, 3]), ends.start(2))
    assert ended.tolist() == [True, False]
    assert step_index([["\n\n"], []], width=3).tolist() == [[0, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="delimiter"):
        StepEnds(["a"], "")


def _step_ref(values, steps, pick):
    groups: dict[int, list[float]] = {}
    for v, s in zip(values, steps, strict=True):
        groups.setdefault(s, []).append(float(v))
    means = [float(np.mean(np.asarray(g, dtype=np.float64))) for _, g in sorted(groups.items())]
    return pick(means) if means else 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.booleans()), min_size=0, max_size=20))
def test_step_reducers_match_a_float64_reference(tokens):
    values = [v for v, _ in tokens]
    pieces = ["\n\n" if end else "x" for _, end in tokens]
    trace = Trace(
        {"entropy": torch.tensor([values + [99.0]], dtype=torch.float32)},  # padding ignored
        torch.zeros(1, len(values) + 1, dtype=torch.long),
        torch.tensor([len(values)]),
        tokens=[pieces],
    )
    steps = trace.step_index()[0, : len(values)].tolist()
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in values]
    for name, pick in (("step_mean_max", max), ("step_mean_min", min), ("step_mean_last", None)):
        want = _step_ref(f32, steps, pick or (lambda m: m[-1]))
        assert float(trace.aggregate("entropy", name)[0]) == pytest.approx(want, abs=1e-5)


def test_step_reducers_need_token_texts_and_read_the_trace_delimiter():
    trace = Trace(
        {"entropy": torch.tensor([[1.0, 3.0, 5.0]])},
        torch.zeros(1, 3).long(),
        torch.tensor([3]),
        tokens=[["x", "|", "y"]],
    )
    assert trace.aggregate("entropy", "step_mean_max").tolist() == [3.0]  # one step
    trace.meta["step_delimiter"] = "|"
    assert trace.aggregate("entropy", "step_mean_max").tolist() == [5.0]  # steps 1,3 | 5
    assert trace.aggregate("entropy", "step_mean_min").tolist() == [2.0]
    trace.tokens = None
    with pytest.raises(ValueError, match="token texts"):
        trace.aggregate("entropy", "step_mean_last")
    # a control: the per-token max differs from the worst step mean
    assert A.reduce("max", trace.signals["entropy"]).tolist() == [5.0]


def test_steps_from_takes_each_rows_tail():
    trace = Trace(
        {"entropy": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])},
        torch.tensor([[1, 2, 3], [4, 5, 0]]),
        torch.tensor([3, 2]),
        tokens=[["a", "b", "c"], ["d", "e"]],
    )
    tail = trace.steps_from(torch.tensor([1, 2]))
    assert tail.lengths.tolist() == [2, 0]
    assert tail.token_ids[0, :2].tolist() == [2, 3] and tail.texts == ["bc", ""]
    assert tail.signals["entropy"][0, :2].tolist() == [2.0, 3.0]
