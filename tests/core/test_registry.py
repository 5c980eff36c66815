"""The signal registry: every table the library uses agrees with it, and its facts
(direction, range, headline reducer) are true of the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokur_decode.core import aggregate
from tokur_decode.core.signals import (
    CHOSEN_SIGNALS,
    CONFIDENCE_KEYS,
    DEFAULT_SIGNALS,
    OUTPUTS,
    REGISTRY,
    SAMPLE_SIGNALS,
    SIGNALS,
    SignalSpec,
    parse_signals,
    signal_of_output,
)
from tokur_decode.hf import UncertaintyMonitor


def test_derived_tables_agree_with_the_registry():
    assert set(SIGNALS) | set(SAMPLE_SIGNALS) == set(REGISTRY)
    assert not set(SIGNALS) & set(SAMPLE_SIGNALS)
    assert SAMPLE_SIGNALS == {"tokur": REGISTRY["tokur"].keys}
    assert CHOSEN_SIGNALS == {"chosen_prob", "chosen_logprob"}
    assert DEFAULT_SIGNALS == ("max_prob", "chosen_prob", "entropy", "logtoku")
    for name, info in REGISTRY.items():
        for key in info.keys:
            assert signal_of_output(key) == name
    assert all(o.headline in aggregate.REDUCERS for o in OUTPUTS.values())


def test_the_signal_pass_and_the_monitor_record_what_the_registry_lists():
    spec = SignalSpec("all")
    expected = tuple(k for name in SIGNALS for k in REGISTRY[name].keys)
    assert spec.output_names == expected
    logits, tokens = torch.randn(3, 50), torch.tensor([1, 2, 3])
    assert tuple(spec(logits, tokens)) == expected
    monitor = UncertaintyMonitor("all")
    assert monitor.output_names == expected


def test_all_means_the_logit_signals_and_tokur_is_asked_for_by_name():
    assert parse_signals("all") == tuple(SIGNALS)
    assert "tokur" not in parse_signals("all")
    assert parse_signals("all,tokur") == (*SIGNALS, "tokur")
    assert parse_signals(None) == DEFAULT_SIGNALS
    for bad, message in [
        ("all,bogus", "unknown 'bogus'"),
        ("", "at least one"),
        (" , ", "at least one"),
        ([5], "must be strings"),
    ]:
        with pytest.raises(ValueError, match=f"signals: .*{message}"):
            parse_signals(bad)
    with pytest.raises(ValueError, match="need predictive samples"):
        SignalSpec(["entropy", "tokur"])


@given(st.lists(st.sampled_from([*REGISTRY, "all"]), min_size=1, max_size=8))
def test_a_list_and_its_comma_string_parse_alike_without_duplicates(names):
    parsed = parse_signals(names)
    assert parsed == parse_signals(", ".join(names))
    assert len(set(parsed)) == len(parsed)
    assert set(parsed) <= set(REGISTRY)


# Signals whose direction two hand-made rows decide (varentropy is 0 on a uniform row,
# LogTokU's parts read absolute evidence, not concentration).
_ORDERED = ("max_prob", "chosen_prob", "chosen_logprob", "margin", "entropy")
_ORDERED += ("self_certainty", "deepconf")


def test_the_direction_of_each_output_is_true_of_its_formula():
    peaked = torch.zeros(50)
    peaked[0] = 10.0
    logits = torch.stack([peaked, torch.zeros(50)])  # confident row, uniform row
    out = SignalSpec(list(_ORDERED))(logits, torch.tensor([0, 0]))
    for key in (k for name in _ORDERED for k in REGISTRY[name].keys):
        confident, uniform = out[key].tolist()
        if key in CONFIDENCE_KEYS:
            assert confident > uniform, key
        else:
            assert confident < uniform, key


def test_control_a_flipped_direction_would_be_caught():
    peaked = torch.zeros(50)
    peaked[0] = 10.0
    out = SignalSpec(["entropy"])(torch.stack([peaked, torch.zeros(50)]))
    confident, uniform = out["entropy"].tolist()
    assert not confident > uniform  # what the check above would assert for a confidence


@settings(deadline=None, max_examples=50)
@given(st.floats(0.01, 100.0), st.integers(2, 300), st.integers(0, 2**16))
def test_unit_range_outputs_stay_in_zero_one(scale, vocab, seed):
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    out = SignalSpec("all")(logits, torch.zeros(4, dtype=torch.long))
    for key, o in OUTPUTS.items():
        if o.unit and key in out:
            values = out[key]
            assert bool(((values >= 0) & (values <= 1)).all()), key
            assert all(math.isfinite(v) for v in values.tolist())
