"""Response-level reducers against per-row Python references; empty responses; k > n."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokur_decode.core import aggregate as A


def ref(name: str, row: list[float], **kw) -> float:
    n = len(row)
    if name == "sum":
        return float(np.sum(row))
    if name == "naive":
        return 1.0 - float(np.prod(row))
    if name == "vanilla":
        return 0.0 if n == 0 else 1.0 - float(np.mean(row))
    if n == 0:
        return 0.0
    if name == "mean":
        return float(np.mean(row))
    if name == "max":
        return float(np.max(row))
    if name == "min":
        return float(np.min(row))
    if name == "topk_mean":
        k = min(kw.get("k", 25), n)
        ordered = sorted(row, reverse=kw.get("largest", True))
        return float(np.mean(ordered[:k]))
    if name in ("head_mean", "tail_mean"):
        c = max(1, math.ceil(n * kw.get("frac", 0.1)))
        return float(np.mean(row[:c] if name == "head_mean" else row[-c:]))
    w = kw.get("window", 2048)
    groups = [np.mean(row)] if n < w else [np.mean(row[i : i + w]) for i in range(n - w + 1)]
    if name == "deepconf_lowest_group":
        return float(np.min(groups))
    if name == "deepconf_bottom_groups":
        c = max(1, int(len(groups) * kw.get("frac", 0.1)))  # DeepConf's count
        return float(np.mean(sorted(groups)[:c]))
    if name == "deepconf_tail":
        return float(np.mean(row[-w:]))
    raise KeyError(name)


CASES = [
    ("mean", {}),
    ("sum", {}),
    ("max", {}),
    ("min", {}),
    ("topk_mean", {"k": 3}),
    ("topk_mean", {"k": 3, "largest": False}),
    ("topk_mean", {"k": 100}),
    ("head_mean", {}),
    ("tail_mean", {"frac": 0.3}),
    ("naive", {}),
    ("vanilla", {}),
    ("deepconf_lowest_group", {"window": 4}),
    ("deepconf_bottom_groups", {"window": 3, "frac": 0.25}),
    ("deepconf_tail", {"window": 5}),
]


@pytest.mark.parametrize("name, kw", CASES)
def test_reducers_match_reference_with_ragged_lengths(name, kw):
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(6, 23, generator=gen)
    lengths = torch.tensor([23, 10, 4, 1, 0, 2])
    values[torch.arange(23) >= lengths.unsqueeze(-1)] = math.nan  # padding is ignored
    got = A.reduce(name, values, lengths, **kw)
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    for i, n in enumerate(lengths.tolist()):
        want = ref(name, values[i, :n].double().tolist(), **kw)
        assert float(got[i]) == pytest.approx(want, abs=1e-5), (name, i)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12), min_size=1, max_size=4),
    st.sampled_from(CASES),
)
def test_reducers_property(rows, case):
    name, kw = case
    t = max(1, max(len(r) for r in rows))
    values = torch.zeros(len(rows), t, dtype=torch.float64)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    lengths = torch.tensor([len(r) for r in rows])
    got = A.reduce(name, values, lengths, **kw)
    for i, r in enumerate(rows):
        assert float(got[i]) == pytest.approx(ref(name, r, **kw), abs=1e-5)


def test_empty_responses_return_documented_values():
    values = torch.empty(2, 0)
    lengths = torch.zeros(2, dtype=torch.long)
    for name in A.REDUCERS:
        steps = {"step_of": torch.zeros(2, 0, dtype=torch.long)} if name in A.STEP_REDUCERS else {}
        got = A.reduce(name, values, lengths, **steps)
        assert got.tolist() == [0.0, 0.0], name
    assert A.mean(values, lengths, empty=-1.0).tolist() == [-1.0, -1.0]


def test_lengths_default_to_full_rows_and_out_of_range_ones_are_refused():
    """A length beyond T or below 0 is a caller's mistake (it used to be clamped, and
    the mean came back without a word)."""
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert A.mean(v).tolist() == [2.0]
    assert A.mean(v, torch.tensor([3])).tolist() == [2.0]  # the control: T itself
    for bad in (99, -1):
        with pytest.raises(ValueError, match=r"lengths: each from 0 to T = 3"):
            A.mean(v, torch.tensor([bad]))
    with pytest.raises(ValueError, match=r"lengths: one per row \(1\)"):
        A.mean(v, torch.tensor([1, 2]))


def test_naive_is_stable_for_long_confident_answers():
    v = torch.full((1, 5000), 0.9999)
    p = float(v[0, 0])  # the float32 value actually stored
    assert float(A.naive(v)) == pytest.approx(-math.expm1(5000 * math.log(p)), rel=1e-6)


def test_invalid_parameters():
    v = torch.rand(1, 4)
    with pytest.raises(ValueError, match="k"):
        A.topk_mean(v, k=0)
    with pytest.raises(ValueError, match="frac"):
        A.head_mean(v, frac=0.0)
    with pytest.raises(ValueError, match="window"):
        A.deepconf_lowest_group(v, window=0)
    with pytest.raises(ValueError, match="reducer"):
        A.reduce("median", v)
    with pytest.raises(ValueError, match="values"):
        A.mean(torch.rand(4))
