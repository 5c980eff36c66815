"""Typed event records: every kind's dict names its action and carries its fields,
a choice flattened into it, optional fields only when set."""

import dataclasses

import pytest

from tokur_decode.core import events as E

CHOICE = E.Choice(1, "entropy", "mean", False, "argmax", 1.0, "deepconf", [0.5, 0.2], ["a", "b"])
EXAMPLES = [
    E.Rewind(3, "entropy", 2.5, 2.0, "above", 2, 1, [5, 6]),
    E.BestOfNEvent(2, CHOICE),
    E.SelectEvent(3, CHOICE),
    E.DeepConfOnlineEvent(4, 2, 11.5, 8, [1], 40, 12),
    E.AdaptiveSamplingEvent("esc", 4, 16, 8, 100, 100, 0, ["a"] * 8),
    E.ParticleFilterEvent(4, "entropy", "mean", 3, 90, [{"step": 2}], [0.25] * 4, ["a"] * 4, 0),
    E.StepRedrawEvent("entropy", "mean", 5, [{"step": 3}], 70),
    E.AbstainEvent("entropy:mean", "below", 1.0, value=2.0, abstained=True),
]


def test_every_event_kind_has_an_example():
    kinds = {c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E._Event)}
    assert kinds - {E._Event} == {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_to_dict(event):
    out = event.to_dict()
    assert out["action"] == type(event).action
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "choice":
            if value is not None:
                assert {k: out[k] for k in dataclasses.asdict(value)} == dataclasses.asdict(value)
            assert "choice" not in out
        elif value is None and f.name in type(event)._optional:
            assert f.name not in out  # left out, not null
        else:
            assert out[f.name] == value


def test_optional_fields_appear_once_set():
    event = E.Rewind(3, "entropy", 2.5, 2.0, "above", 2, 1, [5, 6])
    assert "kept" not in event.to_dict()
    event.kept, event.old_score, event.new_score = "new", 1.0, 0.5
    assert event.to_dict()["kept"] == "new"
    rule = E.AbstainEvent("s", "above", 0.5, value=0.7, risk=0.1, delta=0.05)
    assert (rule.to_dict()["risk"], "coverage" in rule.to_dict()) == (0.1, False)
