"""Triggers, calibration, processor-level actions, selection and voting, recipes."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tokur_decode.core.policy import Trigger, TriggerState, calibrate_from_traces
from tokur_decode.core.select import choose, top_eta, vote
from tokur_decode.core.trace import Trace
from tokur_decode.hf import UncertaintyMonitor
from tokur_decode.hf.actions import ResampleOnTrigger, StopOnTrigger
from tokur_decode.models import tiny_model
from tokur_decode.strategies.recipe import Strategy, available, strategies_dir

from ..helpers import NoHostSync

EOS = 127
PROMPT = torch.tensor([[1, 5, 9, 3], [4, 4, 2, 8]])


def run(model, processors, **kw):
    with torch.inference_mode():
        return model.generate(
            input_ids=PROMPT,
            attention_mask=torch.ones_like(PROMPT),
            logits_processor=processors,
            max_new_tokens=kw.pop("max_new_tokens", 10),
            do_sample=kw.pop("do_sample", False),
            pad_token_id=EOS,
            eos_token_id=EOS,
            return_dict_in_generate=True,
            **kw,
        )


# --------------------------------------------------------------------------- triggers


def fire_pattern(trigger, values):
    state = TriggerState(trigger, 1, "cpu")
    return [bool(state.update(torch.tensor([v]), t)) for t, v in enumerate(values)]


def test_trigger_threshold_direction_patience_min_tokens_window():
    vals = [0.1, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9]
    assert fire_pattern(Trigger("entropy", 0.5), vals) == [
        False,
        True,
        True,
        False,
        True,
        True,
        True,
    ]
    assert fire_pattern(Trigger("entropy", 0.5, patience=2), vals) == [
        False,
        False,
        True,
        False,
        False,
        True,
        True,
    ]
    assert fire_pattern(Trigger("entropy", 0.5, min_tokens=5), vals) == [False] * 4 + [True] * 3
    assert fire_pattern(Trigger("max_prob", 0.5, direction="below"), vals) == [
        True,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    # window 2: mean of the last two values
    assert fire_pattern(Trigger("entropy", 0.6, window=2), [0.1, 0.9, 0.9, 0.1, 0.1]) == [
        False,
        False,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"signal": "entropyy"}, "signal"),
        ({"signal": "entropy", "threshold": math.nan}, "threshold"),
        ({"signal": "entropy", "direction": "sideways"}, "direction"),
        ({"signal": "entropy", "patience": 0}, "patience"),
        ({"signal": "entropy", "min_tokens": -1}, "min_tokens"),
        ({"signal": "entropy", "window": 0}, "window"),
    ],
)
def test_trigger_validation(kwargs, param):
    with pytest.raises(ValueError, match=param):
        Trigger(**kwargs)


def test_uncalibrated_trigger_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        StopOnTrigger(Trigger("entropy"), eos_token_id=EOS)


def test_calibration_gives_the_claimed_percentile():
    scores = np.random.default_rng(0).normal(size=200)
    trig = Trigger("deepconf", direction="below").calibrated(scores, 10)
    assert trig.threshold == pytest.approx(np.percentile(scores, 10))
    assert np.mean(scores < trig.threshold) == pytest.approx(0.10, abs=0.01)
    with pytest.raises(ValueError, match="percentile"):
        Trigger("deepconf").calibrated(scores, 101)


def test_calibration_from_warmup_traces_uses_lowest_group_confidence():
    conf = torch.tensor([[5.0, 1.0, 5.0, 5.0], [3.0, 3.0, 3.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    trace = Trace(
        signals={"deepconf": conf},
        token_ids=torch.zeros(3, 4, dtype=torch.long),
        lengths=torch.tensor([4, 3, 4]),
    )
    trig = calibrate_from_traces(Trigger("deepconf", direction="below", window=2), trace, 50)
    lowest = [3.0, 3.0, 4.0]  # windows of 2 (row 1 only up to its length 3)
    assert trig.threshold == pytest.approx(np.percentile(lowest, 50))


def test_calibration_from_warmup_traces_reads_their_steps_with_a_step_reducer():
    entropy = torch.tensor([[0.0, 4.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    trace = Trace(
        signals={"entropy": entropy},
        token_ids=torch.zeros(2, 4, dtype=torch.long),
        lengths=torch.tensor([4, 4]),
        tokens=[["a", ".\n\n", "b", "c"], ["a", "b", "c", "d"]],
    )
    trig = calibrate_from_traces(Trigger("entropy"), trace, 100, reducer="step_mean_max")
    assert trig.threshold == 2.0  # row 0's worst step (2.0, then 1.0); row 1: one step
    assert calibrate_from_traces(Trigger("entropy"), trace, 100, reducer="max").threshold == 4.0
    with pytest.raises(ValueError, match="token texts"):
        calibrate_from_traces(Trigger("entropy"), replace(trace, tokens=None), 50, "step_mean_max")


# --------------------------------------------------------------------------- actions


def test_stop_forces_eos_exactly_where_the_trigger_fired():
    model = tiny_model("llama", vocab_size=128)
    plain = run(model, [])
    entropy = UncertaintyMonitor(["entropy"], eos_token_id=EOS)
    h = entropy.trace(run(model, [entropy])).signals["entropy"]
    threshold = float(h[0, 3])  # row 0 crosses at step 3, the first allowed by min_tokens=4
    monitor = UncertaintyMonitor(["entropy"], eos_token_id=EOS)
    stop = StopOnTrigger(
        Trigger("entropy", threshold=threshold - 1e-6, min_tokens=4), eos_token_id=EOS
    )
    out = run(model, [monitor, stop])
    events = stop.events()
    for row in range(2):
        fired = [e["step"] for e in events[row]]
        crossing = [t for t in range(3, h.shape[1]) if h[row, t] > threshold - 1e-6]
        generated = out.sequences[row, 4:]
        if crossing:
            t = crossing[0]
            assert fired == [t]
            assert generated[t] == EOS  # EOS at the recorded step
            assert torch.equal(generated[:t], plain.sequences[row, 4 : 4 + t])  # unchanged before
            assert events[row][0]["value"] == pytest.approx(float(h[row, t]), rel=1e-5)
        else:
            assert fired == [] and torch.equal(generated, plain.sequences[row, 4:])


def test_stop_respects_a_grammar_that_forbids_eos():
    class NoEos:
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, EOS] = -math.inf
            return scores

    model = tiny_model("llama", vocab_size=128)
    plain = run(model, [NoEos()])
    stop = StopOnTrigger(Trigger("entropy", threshold=0.0), eos_token_id=EOS)
    out = run(model, [NoEos(), stop])
    assert torch.equal(out.sequences, plain.sequences)  # left alone
    assert all(e.get("blocked") for e in stop.events()[0])


def test_blocked_is_recorded_per_step_not_per_row():
    """EOS forbidden for the first 3 steps only: the trigger fires blocked, then stops."""

    class NoEosEarly:
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - PROMPT.shape[1] < 3:
                scores = scores.clone()
                scores[:, EOS] = -math.inf
            return scores

    model = tiny_model("llama", vocab_size=128)
    stop = StopOnTrigger(Trigger("entropy", threshold=0.0), eos_token_id=EOS)
    out = run(model, [NoEosEarly(), stop])
    for row, events in enumerate(stop.events()):
        assert [e["step"] for e in events] == [0, 1, 2, 3]
        assert all("blocked" in e for e in events[:3])
        assert "blocked" not in events[3]  # the real stop
        assert out.sequences[row, PROMPT.shape[1] + 3] == EOS


def test_veto_changes_the_output_exactly_at_the_first_fired_step():
    model = tiny_model("qwen2", vocab_size=128)
    plain = run(model, [], output_logits=True)
    veto = ResampleOnTrigger(Trigger("max_prob", threshold=1.0, direction="below", min_tokens=3))
    out = run(model, [veto])
    first = [events[0]["step"] for events in veto.events()]
    assert first == [2, 2]
    for row in range(2):
        gen, ref = out.sequences[row, 4:], plain.sequences[row, 4:]
        assert torch.equal(gen[:2], ref[:2])
        second_best = plain.logits[2][row].topk(2).indices[1]
        assert gen[2] == second_best


def test_adaptive_resample_is_deterministic_under_a_seed():
    model = tiny_model("llama", vocab_size=128)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        proc = ResampleOnTrigger(Trigger("entropy", threshold=0.0), mode="adaptive")
        outs.append(run(model, [proc], do_sample=True).sequences)
    assert torch.equal(outs[0], outs[1])
    assert proc.events()[0]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: StopOnTrigger(
            Trigger("logtoku_epistemic", threshold=0.1, patience=2), eos_token_id=[2, 3]
        ),
        lambda: ResampleOnTrigger(Trigger("entropy", threshold=1.0, window=3), mode="adaptive"),
        lambda: ResampleOnTrigger(Trigger("max_prob", threshold=0.5, direction="below")),
    ],
)
def test_actions_perform_no_host_synchronisation(device, make):

    proc = make()
    ids = torch.ones(3, 4, dtype=torch.long, device=device)
    with NoHostSync():
        for _ in range(4):
            proc(ids, torch.randn(3, 5000, device=device))
            ids = torch.cat([ids, ids[:, :1]], dim=1)


# --------------------------------------------------------------------------- selection


def test_selection_and_voting_on_hand_made_scores():
    answers = ["12", "15", "12", "15", "15", None]
    scores = [0.9, 0.2, 0.8, 0.3, 0.1, 5.0]
    assert choose(answers, scores, "argmax") == 5
    assert vote(answers, scores, "majority") == "15"
    assert vote(answers, scores, "weighted") == "12"  # 1.7 vs 0.6
    sm = np.exp(np.array(scores) - 5.0)
    sm /= sm.sum()
    expected = "12" if sm[0] + sm[2] > sm[1] + sm[3] + sm[4] else "15"
    assert vote(answers, scores, "weighted-softmax") == expected
    assert top_eta(scores, 0.5) == [5, 0, 2]
    assert choose(answers, scores, "majority", eta=0.5) == 0  # kept: None, "12", "12"
    assert vote([None, None], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="weighted"):
        vote(["a"], [-1.0], "weighted")
    with pytest.raises(ValueError, match="scores"):
        choose(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="eta"):
        top_eta([1.0], 0.0)


# --------------------------------------------------------------------------- recipes


def test_shipped_recipes_load_and_round_trip():
    names = available()
    for required in (
        "monitor",
        "logtoku-abstain",
        "entropy-resample",
        "tokur-best-of-n",
        "self-certainty-best-of-n",
        "deepconf-offline-vote",
    ):
        assert required in names and names[required]
    for name in names:
        s = Strategy.load(name)
        assert Strategy.from_dict(s.to_dict()) == s
        assert Strategy.load(strategies_dir() / f"{name}.toml") == s


@pytest.mark.parametrize(
    "recipe, key",
    [
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "x", "action": {"type": "explode"}}, "action.type"),
        ({"name": "x", "action": {"type": "stop", "abstain_text": "?"}}, "trigger"),
        (
            {
                "name": "x",
                "action": {"type": "stop", "pause": 1},
                "trigger": {"signal": "entropy", "threshold": 1},
            },
            "action.pause",
        ),
        (
            {"name": "x", "trigger": {"signal": "entropy", "threshold": 1, "patience": 0}},
            "patience",
        ),
        ({"name": "x", "trigger": {"signal": "entropy", "when": 1}}, "trigger"),
        ({"name": "x", "action": {"type": "best-of-n", "n": 0, "score": "entropy"}}, "action.n"),
        (
            {"name": "x", "action": {"type": "best-of-n", "score": "entropy", "method": "best"}},
            "action.method",
        ),
        ({"name": "x", "action": {"type": "best-of-n", "score": "entropy", "n": "4"}}, "action.n"),
        ({"name": "x", "tokur": {"samplez": 3}}, "tokur"),
        ({"name": ""}, "name"),
        (
            {"name": "x", "trigger": {"signal": "entropy", "threshold": 1.0}},
            "action: the recipe has a \\[trigger\\] table but no \\[action\\]",
        ),
    ],
)
def test_bad_recipes_fail_naming_the_key(recipe, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Strategy.from_dict(recipe)


def test_recipe_from_a_toml_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[trigger]\nsignal = "entropy"\nthreshold = 3.0\n[action]\ntype = "stop"\n')
    s = Strategy.load(path)
    assert s.name == "mine" and s.action == "stop" and s.trigger.threshold == 3.0
    with pytest.raises(ValueError, match="no recipe named"):
        Strategy.load("does-not-exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ValueError, match="invalid TOML"):
        Strategy.load(bad)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_logtoku_abstain_on_the_embedded_model(embedded):
    from tokur_decode.hf import generate

    model, tok = embedded
    qs = ["What is the capital of France?", "Who won the 1937 Tour de France?"]
    plain = generate(model, tok, qs, max_new_tokens=24)
    result = generate(model, tok, qs, strategy="logtoku-abstain", max_new_tokens=24)
    assert result.texts[0] == plain.texts[0] and result.actions[0] == []
    assert result.texts[1] == "I don't know."
    (event,) = result.actions[1]
    assert event["action"] == "stop" and event["value"] > event["threshold"]
    step = event["step"]
    assert result.trace.token_ids[1, step] == tok.eos_token_id
    assert torch.equal(result.trace.token_ids[1, :step], plain.trace.token_ids[1, :step])


@pytest.mark.slow
def test_best_of_one_equals_a_single_sample(embedded):
    from tokur_decode.hf import generate

    model, tok = embedded
    recipe = Strategy.load("self-certainty-best-of-n").to_dict()
    recipe["action"]["n"] = 1
    best = generate(
        model, tok, "Name a primary colour.", strategy=recipe, max_new_tokens=12, seed=5
    )
    single = generate(
        model,
        tok,
        "Name a primary colour.",
        temperature=recipe["action"]["temperature"],
        max_new_tokens=12,
        seed=5,
    )
    assert best.texts == single.texts
    assert best.actions[0][0]["chosen"] == 0


@pytest.mark.slow
def test_tokur_best_of_n_on_the_embedded_model(embedded):
    from tokur_decode.hf import generate

    model, tok = embedded
    recipe = Strategy.load("tokur-best-of-n").to_dict()
    recipe["action"]["n"] = 3
    result = generate(model, tok, "What is 17 + 25?", strategy=recipe, max_new_tokens=10)
    event = result.actions[0][0]
    assert len(event["scores"]) == 3 and all(s >= 0 for s in event["scores"])
    assert event["chosen"] == int(np.argmin(event["scores"]))  # lowest mean epistemic
    assert len(result.candidates[0]) == 3


@pytest.mark.slow
def test_cli_strategy_json_reports_actions(capsys, embedded):
    from tokur_decode.cli import main

    assert (
        main(
            [
                "generate",
                "--json",
                "--strategy",
                "logtoku-abstain",
                "--max-new-tokens",
                "24",
                "Who won the 1937 Tour de France?",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["answer"] == "I don't know."
    assert report["actions"][0]["signal"] == "logtoku_epistemic"
    assert main(["strategies"]) == 0
    assert "logtoku-abstain" in capsys.readouterr().out
