"""Action types' capability facts: declared once on the configuration classes and read
by the strategy layer and the vLLM request parser (no list of action names elsewhere)."""

import pytest

from tokur_decode.strategies import Strategy, available
from tokur_decode.strategies import backend as B
from tokur_decode.strategies.actions import ACTIONS
from tokur_decode.strategies.run import PROCEDURES, plan

ALL_ACTS = (B.StopAct, B.ResampleAct, B.BranchAct, B.RollbackAct, B.StepsAct)
#: One shipped recipe of every action type.
SHIPPED = {Strategy.load(name).action: name for name in sorted(available(), reverse=True)}


def test_every_action_type_has_a_shipped_recipe_and_one_procedure():
    assert set(SHIPPED) == set(ACTIONS)
    assert set(PROCEDURES) == set(ACTIONS.values())


@pytest.mark.parametrize("kind", sorted(ACTIONS))
def test_samples_decides_greedy_and_threshold_refusals(kind):
    cls, recipe = ACTIONS[kind], SHIPPED[kind]
    if cls.samples:
        with pytest.raises(ValueError, match="temperature: .* it needs temperature > 0"):
            plan(ALL_ACTS, "q", strategy=recipe, temperature=0.0)
        with pytest.raises(ValueError, match="threshold: .* no trigger threshold to set"):
            plan(ALL_ACTS, "q", strategy=recipe, threshold=0.5)
        return
    # the control: an action that does not sample takes greedy decoding (where its rule
    # allows), and a threshold exactly when it has a trigger
    if kind != "resample":  # the shipped resample rule is adaptive: it needs sampling
        plan(ALL_ACTS, "q", strategy=recipe, temperature=0.0)
    if Strategy.load(recipe).trigger is not None:
        assert plan(ALL_ACTS, "q", strategy=recipe, threshold=0.5).strat.trigger.threshold == 0.5
    else:
        with pytest.raises(ValueError, match="threshold: .*(no trigger|first token)"):
            plan(ALL_ACTS, "q", strategy=recipe, threshold=0.5)


@pytest.mark.parametrize("kind", sorted(ACTIONS))
def test_one_request_runs_what_the_class_says(kind):
    pytest.importorskip("vllm")
    from tokur_decode.vllm.args import parse_settings

    cls = ACTIONS[kind]
    args = {"tokur_strategy": SHIPPED[kind], "tokur_threshold": 1.0}
    if cls.in_one_request is None:
        with pytest.raises(ValueError, match="tokur_strategy: .* spans several requests"):
            parse_settings(args)
    else:
        assert parse_settings(args).action == cls.in_one_request


@pytest.mark.parametrize("kind", sorted(ACTIONS))
def test_alternatives_refused_where_the_class_says_so(kind):
    if ACTIONS[kind].records_alternatives:
        checked = plan(ALL_ACTS, "q", strategy=SHIPPED[kind], alternatives=2)
        assert checked.recording.alternatives == 2
    else:
        with pytest.raises(ValueError, match="alternatives: .* does not record them"):
            plan(ALL_ACTS, "q", strategy=SHIPPED[kind], alternatives=2)


@pytest.mark.parametrize("kind", sorted(set(ACTIONS) - {"none"}))
def test_the_recipe_format_lists_every_key(kind):
    """The recipe module's format comment names each action type's keys (the control:
    a key no type has is not found)."""
    import dataclasses
    import re

    from tokur_decode.strategies import recipe

    lines = re.findall(r"^    # ([\w -]+):(.*(?:\n    #   .*)*)", recipe.__doc__, re.M)
    listed = {name: text for name, text in lines}
    text = listed[kind] + (listed["selection keys"] if "selection keys" in listed[kind] else "")
    for f in dataclasses.fields(ACTIONS[kind]):
        assert re.search(rf"\b{f.name}\b", text), (kind, f.name)
    assert not re.search(r"\bno_such_key\b", text)
