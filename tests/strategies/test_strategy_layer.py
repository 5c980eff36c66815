"""The strategy layer against a scripted backend: what each procedure asks the backend,
what it does with the answers, and the typed configurations it reads."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokur_decode.core.policy import Trigger
from tokur_decode.core.signals import REGISTRY
from tokur_decode.core.trace import Trace
from tokur_decode.hf.actions import ResampleOnTrigger
from tokur_decode.hf.branching import BranchPolicy
from tokur_decode.hf.rollback import RollbackPolicy
from tokur_decode.strategies import Strategy, generate
from tokur_decode.strategies import actions as A
from tokur_decode.strategies import backend as B
from tokur_decode.strategies.candidates import deepconf_thresholds


class Scripted:
    """A backend whose row ``r`` of prompt ``p`` answers ``"p{p}r{r}"``; every output of
    every requested signal has the value ``p + r / 10`` at each of ``r + 2`` steps;
    a Stop act stops (event) the rows whose value is below the prompt's threshold."""

    acts = (B.StopAct, B.ResampleAct)

    def __init__(self):
        self.requests: list[B.Request] = []

    def describe(self) -> dict:
        return {"backend": "scripted"}

    def particles(self, prompts, request):
        raise ValueError("act: particles are not offered")

    def decode(self, prompts, request: B.Request) -> B.Decoded:
        self.requests.append(request)
        n, rows, events = request.n, [], []
        for p in range(len(prompts)):
            for r in range(n):
                rows.append((p, r))
                events.append(self._events(request.act, p, p + r / 10))
        width = max(r for _, r in rows) + 2
        keys = [k for name in request.signals for k in REGISTRY[name].keys]
        values = torch.tensor([[p + r / 10] * width for p, r in rows])
        trace = Trace(
            signals={k: values.clone() for k in keys},
            token_ids=torch.zeros(len(rows), width, dtype=torch.long),
            lengths=torch.tensor([r + 2 for _, r in rows]),
            texts=[f"p{p}r{r}" for p, r in rows],
        )
        return B.Decoded(trace, [p for p, _ in rows], events, int(trace.lengths.sum()))

    @staticmethod
    def _events(act, prompt, value):
        if not isinstance(act, B.StopAct):
            return []
        threshold = act.thresholds[prompt] if act.thresholds else act.trigger.threshold
        return [{"action": "stop", "step": 1, "value": value}] if value < threshold else []


def test_the_backends_follow_the_protocol(tiny_llama):
    from types import SimpleNamespace

    from tokur_decode.hf import HFBackend
    from tokur_decode.verbalized import VerbalizedBackend

    tokenizer = SimpleNamespace(eos_token_id=255)  # describe() reads no tokenizer
    hf = HFBackend(tiny_llama, tokenizer, model_name="tiny")
    deferred = HFBackend.deferred(lambda: (tiny_llama, tokenizer), model_name="tiny")
    for backend in (Scripted(), hf, deferred, VerbalizedBackend(deferred)):
        assert isinstance(backend, B.Backend)
    assert deferred._built is None  # described, checked, not built
    described = hf.describe()
    assert described == {**deferred.describe(), "dtype": "float32"}  # the model's own
    assert VerbalizedBackend(hf).describe()["verbalized"] == {}

    class Partial:  # the control: a backend without describe() is not one
        acts = ()

        def decode(self, prompts, request): ...

        def particles(self, prompts, request): ...

    assert not isinstance(Partial(), B.Backend)


def test_abstain_replaces_exactly_the_answers_whose_score_fails_and_records_the_rule():
    backend = Scripted()
    recipe = {
        "name": "a",
        "generation": {"max_new_tokens": 7},
        "action": {
            "type": "abstain",
            "score": "entropy:max",
            "keep": "below",
            "threshold": 1.0,
            "risk": 0.2,
            "delta": 0.1,
        },
    }
    result = generate(backend, ["q0", "q1", "q2"], strategy=recipe)
    (request,) = backend.requests
    assert "entropy" in request.signals and request.sampling.max_new_tokens == 7
    assert result.texts == ["p0r0", "p1r0", "I don't know."]  # entropy 0, 1, 2: 1 <= 1 kept
    decisions = [a[-1] for a in result.actions]
    assert [d["abstained"] for d in decisions] == [False, False, True]
    assert decisions[2] == {
        "action": "abstain",
        "score": "entropy:max",
        "keep": "below",
        "threshold": 1.0,
        "risk": 0.2,
        "delta": 0.1,
        "value": 2.0,
        "abstained": True,
    }
    above = {**recipe, "action": {**recipe["action"], "keep": "above"}}
    assert generate(Scripted(), ["q0", "q1", "q2"], strategy=above).texts == [
        "I don't know.",
        "p1r0",
        "p2r0",
    ]
    # the caller's budget wins over the recipe's
    generate(backend, ["q0"], strategy=recipe, max_new_tokens=3)
    assert backend.requests[-1].sampling.max_new_tokens == 3


def test_best_of_n_asks_for_n_samples_at_the_recipe_temperature_and_keeps_the_best():
    backend = Scripted()
    recipe = {"name": "b", "action": {"type": "best-of-n", "n": 3, "score": "max_prob"}}
    result = generate(backend, ["q0", "q1"], strategy=recipe, seed=7)
    (request,) = backend.requests
    assert (request.n, request.sampling.temperature, request.sampling.seed) == (3, 0.7, 7)
    assert "max_prob" in request.signals  # the score's signal is recorded
    assert result.texts == ["p0r2", "p1r2"]  # highest max_prob: the last row
    assert result.actions[0][0]["scores"] == pytest.approx([0.0, 0.1, 0.2])
    assert [len(c) for c in result.candidates] == [3, 3]
    assert result.tokens_generated == 2 * (2 + 3 + 4)


def test_deepconf_online_stops_later_samples_at_the_warm_ups_thresholds():
    backend = Scripted()
    strat = Strategy.load("deepconf-online")
    result = generate(backend, ["q0", "q1"], strategy=strat, seed=3)
    warm, later = backend.requests
    c = strat.config
    assert (warm.n, later.n) == (c.warmup, c.n - c.warmup)
    assert later.sampling.seed == 3 + c.warmup  # seeded after the warm-up's samples
    assert isinstance(later.act, B.StopAct) and later.act.trigger.window == c.window
    warm_trace = backend.decode(["q0", "q1"], warm).trace
    assert list(later.act.thresholds) == deepconf_thresholds(warm_trace, c.warmup, c)
    action = result.actions[0][0]
    assert action["voters"] == c.warmup + (c.n - c.warmup) - len(action["stopped"])


def test_abstain_text_replaces_stopped_answers_only():
    backend = Scripted()
    recipe = {
        "name": "s",
        "trigger": {"signal": "entropy", "threshold": 0.5, "direction": "above"},
        "action": {"type": "stop", "abstain_text": "I don't know."},
    }
    result = generate(backend, ["q0", "q1"], strategy=recipe)
    # the scripted backend stops values below the threshold: prompt 0 (0.0), not 1 (1.0)
    assert result.texts == ["I don't know.", "p1r0"]
    assert backend.requests[0].act.trigger.threshold == 0.5
    overridden = generate(Scripted(), ["q0", "q1"], strategy=recipe, threshold=2.0)
    assert overridden.texts == ["I don't know.", "I don't know."]


def test_an_action_the_backend_lacks_is_refused_before_anything_is_decoded():
    backend = Scripted()
    with pytest.raises(ValueError, match="'rollback' needs tokur-decode's own decoding loop"):
        generate(backend, "q", strategy="entropy-rollback")
    with pytest.raises(ValueError, match="'branch' needs forking"):
        generate(backend, "q", strategy="cot-branch")
    assert backend.requests == []
    generate(backend, "q", strategy="logtoku-abstain")  # control: a supported one runs
    assert len(backend.requests) == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"signals": "all,bogus"}, "signals"),
        ({"threshold": 1.0, "strategy": "self-certainty-best-of-n"}, "threshold"),
        ({"tokur": {"samples": 4}}, "tokur"),
    ],
)
def test_bad_inputs_are_refused_naming_the_parameter(kwargs, name):
    backend = Scripted()
    with pytest.raises(ValueError, match=name):
        generate(backend, "q", **kwargs)
    assert backend.requests == []


def test_a_request_validates_itself():
    with pytest.raises(ValueError, match="temperature: n > 1"):
        B.Request(("entropy",), B.Sampling(temperature=0.0), n=2)
    with pytest.raises(ValueError, match="n: must be"):
        B.Request(("entropy",), n=0)
    assert B.Request("all,tokur").wants_samples
    assert not B.Request("all").wants_samples


# ----------------------------------------------------------------- typed configurations


def test_every_action_type_has_one_config_class_and_valid_defaults():
    assert set(A.ACTIONS) == {
        "none",
        "stop",
        "resample",
        "best-of-n",
        "branch",
        "rollback",
        "deepconf-online",
        "adaptive-sampling",
        "particle-filter",
        "step-redraw",
        "abstain",
    }
    for kind, cls in A.ACTIONS.items():
        # best-of-n and abstain have no default score: what they read is the recipe's choice
        score = {"best-of-n": "entropy", "abstain": "entropy:mean"}.get(kind)
        config = A.action_config({"type": kind, **({"score": score} if score else {})})
        assert isinstance(config, cls)
        assert A.action_config(config.to_dict()) == config


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"type": "best-of-n", "score": "entropy", "n": 0}, "action.n"),
        ({"type": "best-of-n", "score": "entropy", "n": True}, "action.n"),
        ({"type": "best-of-n", "score": "entropy", "temperature": math.inf}, "action.temp"),
        ({"type": "best-of-n"}, "action.score: selection needs a score"),
        ({"type": "best-of-n", "score": "bogus"}, "signal"),
        ({"type": "best-of-n", "bogus": 1}, "action.bogus"),
        ({"type": "branch", "at": "middle"}, "action.at"),
        ({"type": "deepconf-online", "warmup": 8}, "action.warmup"),
        ({"type": "step-redraw", "delimiter": ""}, "action.delimiter"),
        ({"type": "step-redraw", "score": "bogus"}, "signal"),
        ({"type": "resample", "mode": "random"}, "action.mode"),
        ({"type": "stop", "abstain_text": 3}, "action.abstain_text"),
        ({"type": "jump"}, "action.type"),
        ({"type": "abstain"}, "action.score: the rule needs a response score"),
        ({"type": "abstain", "score": "entropy"}, "is not a response score"),
        ({"type": "abstain", "score": "probe"}, "action.probe: score 'probe' needs"),
        ({"type": "abstain", "score": "entropy:mean", "keep": "inside"}, "action.keep"),
        ({"type": "abstain", "score": "entropy:mean", "risk": 1.5}, "action.risk"),
        ({"type": "abstain", "score": "entropy:mean", "threshold": math.nan}, "action.threshold"),
        ({"type": "abstain", "score": "entropy:mean", "probe": {"coef": []}}, "probe: missing key"),
    ],
)
def test_a_bad_action_table_is_refused_naming_the_key(table, key):
    with pytest.raises(ValueError, match=key):
        A.action_config(table)


@given(st.integers(1, 64), st.floats(0.01, 5.0), st.floats(0.01, 1.0))
def test_best_of_n_configs_round_trip(n, temperature, top_p):
    config = A.BestOfNConfig(score="entropy", n=n, temperature=temperature, top_p=top_p)
    assert A.action_config(config.to_dict()) == config


def test_the_backends_defaults_are_the_configs():
    """One place for every default: the processors and the controller's policies read
    the typed configurations' defaults."""
    resample = inspect.signature(ResampleOnTrigger.__init__).parameters
    rule = A.ResampleConfig()
    for f in dataclasses.fields(rule):
        assert resample[f.name].default == getattr(rule, f.name), f.name
    branch = inspect.signature(BranchPolicy.__init__).parameters
    assert (branch["k"].default, branch["max_branch_points"].default) == (5, 1)
    assert branch["k"].default == A.BranchConfig().k
    rollback = inspect.signature(RollbackPolicy.__init__).parameters
    for name in ("rewind", "temperature", "max_retries"):
        assert rollback[name].default == getattr(A.RollbackConfig(), name)


def test_the_triggers_of_recipes_are_checked_against_their_action():
    with pytest.raises(ValueError, match="needs a \\[trigger\\]"):
        Strategy.from_dict({"name": "x", "action": {"type": "stop"}})
    with pytest.raises(ValueError, match="does not use a \\[trigger\\]"):
        Strategy.from_dict(
            {
                "name": "x",
                "trigger": {"signal": "entropy", "threshold": 1.0},
                "action": {"type": "best-of-n", "score": "entropy"},
            }
        )
    branch = {"type": "branch", "at": "trigger"}
    assert Strategy.from_dict(
        {"name": "x", "trigger": {"signal": "entropy", "threshold": 1.0}, "action": branch}
    ).config.uses_trigger
    assert Trigger("entropy", threshold=1.0)  # control: the trigger itself is valid


def test_the_callers_sampling_overrides_a_candidate_recipes():
    backend = Scripted()
    generate(backend, "q", strategy="self-certainty-best-of-n", temperature=1.3, top_p=0.9)
    sampling = backend.requests[0].sampling
    assert (sampling.temperature, sampling.top_p) == (1.3, 0.9)
    generate(backend, "q", strategy="self-certainty-best-of-n")  # control: the recipe's
    assert backend.requests[1].sampling.temperature == 0.7
    for recipe in ("self-certainty-best-of-n", "deepconf-online"):
        with pytest.raises(ValueError, match="temperature: .* needs temperature > 0, got 0"):
            generate(Scripted(), "q", strategy=recipe, temperature=0)


def test_an_adaptive_resample_under_greedy_decoding_is_refused():
    with pytest.raises(ValueError, match="temperature: the adaptive resample rule"):
        generate(Scripted(), "q", strategy="entropy-resample", temperature=0)
    generate(Scripted(), "q", strategy="entropy-resample")  # control: its own T = 0.7


def test_a_plan_is_checked_without_a_backend():
    """What an entry point checks before it starts an engine."""
    from tokur_decode.strategies.run import plan

    with pytest.raises(ValueError, match="'rollback' needs .* which the engine does not offer"):
        plan(
            (B.StopAct, B.ResampleAct, B.BranchAct),
            "q",
            strategy="entropy-rollback",
            backend_name="the engine",
        )
    checked = plan((B.StopAct,), "q", signals="entropy,tokur")
    assert checked.wants_samples and checked.kind == "none"


def test_no_prompts_and_no_signals_are_refused():
    backend = Scripted()
    with pytest.raises(ValueError, match="prompts: at least one prompt"):
        generate(backend, [])
    with pytest.raises(ValueError, match="signals: at least one"):
        generate(backend, "q", signals=[])
    assert backend.requests == []


def test_rows_that_cannot_fit_in_memory_are_refused_before_decoding(embedded):
    """n x batch rows of step logits beyond the device's free memory are refused, naming
    the settings (n = 10**5 sampled answers grew to 23 GB before the kernel killed it)."""
    from tokur_decode.hf import HFBackend

    backend = HFBackend(*embedded, batch_size=2)
    huge = B.Request(("entropy",), B.Sampling(temperature=1.0, max_new_tokens=2), n=10**6)
    with pytest.raises(ValueError, match="n x batch_size: 2000000 rows of 49152 logits"):
        backend.decode(["a", "b", "c"], huge)
    with pytest.raises(ValueError, match="x TokUR's samples"):
        backend.decode(["a"], B.Request(("tokur",), B.Sampling(), tokur={"samples": 10**7}))
    small = B.Request(("entropy",), B.Sampling(temperature=1.0, max_new_tokens=2), n=2)
    assert len(backend.decode(["a"], small).trace) == 2  # the control


def test_a_prompt_beyond_the_context_is_refused_before_decoding(embedded):
    """9,000 words and an answer budget past the embedded model's 8,192 positions: a
    clear error (it was accepted silently); the control fits."""
    from tokur_decode.hf import generate

    model, tok = embedded
    with pytest.raises(
        ValueError, match=r"prompts: prompt 1 has \d+ tokens; .* the model has 8192"
    ):
        generate(model, tok, ["Hi.", "word " * 9000], max_new_tokens=4)
    assert generate(model, tok, "word " * 100, max_new_tokens=2).texts[0] is not None
