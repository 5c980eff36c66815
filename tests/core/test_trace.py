"""Trace export and rendering; StepBuffer growth and grouped writes."""

from __future__ import annotations

import json

import pytest
import torch

from tokur_decode.core.trace import StepBuffer, Trace, uncertainty_scale


@pytest.fixture
def trace():
    return Trace(
        signals={
            "chosen_prob": torch.tensor([[0.9, 0.2, 0.7], [0.5, 0.0, 0.0]]),
            "entropy": torch.tensor([[0.1, 2.5, 0.4], [1.0, 0.0, 0.0]]),
            "max_prob": torch.tensor([[0.9, 0.3, 0.7], [0.5, 0.0, 0.0]]),
        },
        token_ids=torch.tensor([[11, 12, 2], [13, 2, 2]]),
        lengths=torch.tensor([3, 1]),
        tokens=[["Par", "is", "<end>"], ["<x&y>"]],
        texts=["Paris", "<x&y>"],
    )


def test_to_dict_and_json_round_trip(trace):
    data = json.loads(trace.to_json())
    assert data["signals"] == ["chosen_prob", "entropy", "max_prob"]
    row0, row1 = data["rows"]
    assert row0["tokens"] == ["Par", "is", "<end>"] and row0["token_ids"] == [11, 12, 2]
    assert row1["n_tokens"] == 1 and row1["values"]["entropy"] == [1.0]
    assert row0["summary"]["naive"] == pytest.approx(1 - 0.9 * 0.3 * 0.7, abs=1e-6)
    assert row0["summary"]["mean_entropy"] == pytest.approx(1.0, abs=1e-6)


def test_indexing_trims_to_the_row_length(trace):
    row = trace[1]
    assert row.signals["entropy"].tolist() == [[1.0]]
    assert row.texts == ["<x&y>"]
    assert [r.texts[0] for r in trace] == ["Paris", "<x&y>"]
    with pytest.raises(IndexError):
        trace[2]


def test_html_colours_tokens_and_escapes_text(trace):
    page = trace._repr_html_()
    assert "chosen_prob" in page
    assert "&lt;x&amp;y&gt;" in page and "<x&y>" not in page
    # the least confident token is the reddest
    assert page.count("rgb(255,") >= 1
    assert page.index("is</span>") > page.index("Par</span>")


def test_to_pandas_long_format(trace):
    pd = pytest.importorskip("pandas")
    frame = trace.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == 4 and set(frame["row"]) == {0, 1}
    assert frame.loc[(frame.row == 0) & (frame.step == 1), "entropy"].item() == pytest.approx(2.5)


def test_uncertainty_scale_directions():
    assert uncertainty_scale("chosen_prob", [1.0, 0.0]) == [0.0, 1.0]
    assert uncertainty_scale("entropy", [0.0, 2.0, 1.0]) == [0.0, 1.0, 0.5]
    assert uncertainty_scale("deepconf", [10.0, 5.0]) == [0.0, 1.0]
    assert uncertainty_scale("entropy", []) == []


def test_step_buffer_grows_and_writes_groups():
    buf = StepBuffer(["a", "b", "c"], batch_size=2, device="cpu", capacity=1)
    for step in range(5):
        buf.write(step, {"a": torch.full((2,), float(step)), "b": torch.full((2,), 10.0 + step)})
        buf.write(step, {"c": torch.full((2,), -1.0)})
    view = buf.view(5)
    assert view["a"][0].tolist() == [0, 1, 2, 3, 4]
    assert view["b"][1].tolist() == [10, 11, 12, 13, 14]
    assert view["c"].eq(-1).all()
    buf.write(5, {"c": torch.zeros(2), "a": torch.ones(2)})  # not in buffer order
    assert buf.view(6)["a"][:, 5].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="capacity"):
        StepBuffer(["a"], 1, "cpu", capacity=0)
