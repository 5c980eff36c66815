"""Served traces packed and parsed: float16 / int32 in base64, read back by
``tokur_decode.parse_response`` from the JSON or from the openai client's objects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokur_decode
from tokur_decode.core.packing import pack_trace, unpack_trace

TRACE = {
    "token_ids": [5, 151935, 0],
    "tokens": ["a", "b", "c"],
    "signals": {"entropy": [0.5, 2.25, 7.125], "tokur_total": [math.nan, 0.1, 1e-3]},
    "events": [{"action": "stop", "step": 2}],
    "alternatives": {
        "ids": [[5, 6], [7, 8], [0, 1]],
        "probs": [[0.5, 0.25]] * 3,
        "tokens": [["a", "b"]] * 3,
    },
    "summary": {"n_tokens": 3, "mean_entropy": 3.29},
}


def test_packed_round_trip_is_the_float16_rounding_and_smaller():
    packed = pack_trace(TRACE)
    assert packed["format"] == "packed" and isinstance(packed["signals"]["entropy"], str)
    back = unpack_trace(json.loads(json.dumps(packed)))
    assert back["token_ids"] == TRACE["token_ids"]  # int32: exact
    for name, values in TRACE["signals"].items():
        want = np.asarray(values, dtype=np.float16).astype(float)
        np.testing.assert_array_equal(back["signals"][name], want)
    assert back["alternatives"]["ids"] == TRACE["alternatives"]["ids"]
    assert back["alternatives"]["probs"] == TRACE["alternatives"]["probs"]
    assert back["events"] == TRACE["events"] and back["summary"] == TRACE["summary"]
    assert "format" not in back


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-60000, 60000, allow_nan=False, width=32), min_size=0, max_size=300))
def test_packed_values_stay_within_float16_resolution(values):
    trace = {"token_ids": list(range(len(values))), "signals": {"x": values}}
    back = unpack_trace(pack_trace(trace))["signals"]["x"]
    assert len(back) == len(values)
    for got, want in zip(back, values, strict=True):
        assert abs(got - want) <= max(abs(want) * 2**-10, 2**-24) + 1e-12


def test_a_json_trace_passes_unchanged_and_choices_without_one_are_none():
    response = {"choices": [{"index": 1, "tokur": TRACE}, {"index": 0, "text": "x"}]}
    assert tokur_decode.parse_response(response) == [None, TRACE]
    assert tokur_decode.parse_response({"choices": []}) == []


def test_the_openai_client_objects_are_read_with_their_extra_fields():
    openai = pytest.importorskip("openai")
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "abc"},
                "tokur": pack_trace(TRACE),
            }
        ],
    }
    completion = openai.types.chat.ChatCompletion.model_validate(answer)
    assert "tokur" in completion.choices[0].model_extra  # what the client keeps
    (trace,) = tokur_decode.parse_response(completion)
    assert trace["token_ids"] == TRACE["token_ids"]
    assert trace["signals"]["entropy"] == [0.5, 2.25, 7.125]  # exact in float16
