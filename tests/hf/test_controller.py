"""The controller loop (branch, rollback) and DeepConf online, on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokur_decode import Strategy, generate
from tokur_decode.core.aggregate import group_confidences
from tokur_decode.core.policy import Trigger, TriggerState
from tokur_decode.core.signals import SignalSpec
from tokur_decode.core.text import encode_prompts
from tokur_decode.core.trace import Trace
from tokur_decode.hf import UncertaintyMonitor
from tokur_decode.hf.branching import BranchPolicy
from tokur_decode.hf.controller import Controller
from tokur_decode.hf.rollback import RollbackPolicy

PROMPTS = [
    "What is the capital of France?",
    "Who won the 1937 Tour de France?",
    "Write one sentence about the sea.",
]
SIGNALS = ["max_prob", "chosen_prob", "entropy", "margin", "deepconf"]


def _eos(model):
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def _controller(model, tok, max_new_tokens=24, **kwargs):
    monitor = UncertaintyMonitor(SIGNALS, eos_token_id=_eos(model))
    return Controller(
        model,
        monitor,
        eos_token_ids=_eos(model),
        pad_token_id=tok.pad_token_id,
        max_new_tokens=max_new_tokens,
        **kwargs,
    )


def _greedy(model, tok, prompts, max_new_tokens=24):
    result = generate(model, tok, prompts, signals=SIGNALS, max_new_tokens=max_new_tokens)
    return result.trace


def _teacher_forced(model, tok, prompt: str, answer_ids: list[int]) -> dict[str, torch.Tensor]:
    """Signals of every answer step from one plain forward over prompt + answer."""
    enc = encode_prompts(tok, [prompt])
    ids = torch.cat([enc["input_ids"], torch.tensor([answer_ids])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, enc["input_ids"].shape[1] - 1 : -1].float()
    return SignalSpec(["entropy", "margin"])(logits)


def _assert_consistent(model, tok, prompt, trace_row: Trace):
    """The recorded distributions are those of the answer's own prefix: forks, masked
    columns and fed-again tokens leave no trace in what the model saw."""
    ids = trace_row.token_ids[0].tolist()
    reference = _teacher_forced(model, tok, prompt, ids)
    for name in ("entropy", "margin"):
        torch.testing.assert_close(trace_row.signals[name][0], reference[name], atol=2e-3, rtol=0)


def test_controller_equals_generate_when_no_action_fires(embedded):
    model, tok = embedded
    enc = encode_prompts(tok, PROMPTS)
    reference = _greedy(model, tok, PROMPTS)
    with torch.inference_mode():
        trace = _controller(model, tok).run(enc, tokenizer=tok)
    assert torch.equal(trace.lengths, reference.lengths)
    for b in range(len(PROMPTS)):
        n = int(trace.lengths[b])
        assert torch.equal(trace.token_ids[b, :n], reference.token_ids[b, :n])
        for name in SIGNALS:
            torch.testing.assert_close(
                trace.signals[name][b, :n], reference.signals[name][b, :n], atol=1e-4, rtol=0
            )
    assert trace.texts == reference.texts


def test_branch_with_k1_equals_greedy(embedded):
    model, tok = embedded
    result = generate(
        model,
        tok,
        PROMPTS,
        strategy={"name": "b", "action": {"type": "branch", "k": 1}},
        max_new_tokens=24,
    )
    assert result.texts == _greedy(model, tok, PROMPTS).texts
    assert all(a[0]["action"] == "select" and len(a[0]["scores"]) == 1 for a in result.actions)


def test_cot_branch_forks_the_top_k_first_tokens(embedded):
    model, tok = embedded
    k = 4
    result = generate(model, tok, PROMPTS[:2], strategy="cot-branch", max_new_tokens=16)
    enc = encode_prompts(tok, PROMPTS[:2])
    with torch.inference_mode():
        first = model(**enc).logits[:, -1].float()
    greedy = _greedy(model, tok, PROMPTS[:2], max_new_tokens=16)
    for b, prompt in enumerate(PROMPTS[:2]):
        fork, select = result.actions[b]
        assert fork["action"] == "branch" and fork["step"] == 0
        assert fork["forked_ids"] == first[b].topk(5).indices.tolist()
        candidates = result.candidates[b]
        assert [int(c.token_ids[0, 0]) for c in candidates] == fork["forked_ids"]
        assert candidates.texts[0] == greedy.texts[b]  # the first alternative is greedy's
        # each branch continues greedily after its forced first token
        for i in range(k):
            _assert_consistent(model, tok, prompt, candidates[i])
            n = int(candidates.lengths[i])
            assert np.allclose(
                candidates.signals["max_prob"][i, 1:n], candidates.signals["chosen_prob"][i, 1:n]
            )
        scores = candidates.aggregate("margin", "mean").tolist()
        assert select["chosen"] == int(np.argmax(scores))
        assert result.texts[b] == candidates.texts[select["chosen"]]
    assert result.tokens_generated == sum(int(c.lengths.sum()) for c in result.candidates)


def test_branch_on_a_trigger_forks_where_it_fires(embedded):
    model, tok = embedded
    greedy = _greedy(model, tok, PROMPTS[1:2], max_new_tokens=20)
    entropy = greedy.signals["entropy"][0, : int(greedy.lengths[0])]
    threshold = float(entropy[2:].max()) - 1e-3  # fires at the most uncertain step after 2
    fire = 2 + int(entropy[2:].argmax())
    trigger = Trigger("entropy", threshold=threshold, min_tokens=3)
    policy = BranchPolicy(3, trigger, max_branch_points=1)
    enc = encode_prompts(tok, PROMPTS[1:2])
    with torch.inference_mode():
        trace = _controller(model, tok, max_new_tokens=20).run(enc, policy, tok)
    assert [e["step"] for e in policy.events[0]] == [fire]
    assert policy.origin == [0, 0, 0] and len(trace) == 3
    prefix = greedy.token_ids[0, :fire]
    for i in range(3):
        assert torch.equal(trace.token_ids[i, :fire], prefix)  # shared prefix
        _assert_consistent(model, tok, PROMPTS[1], trace[i])
    assert trace.token_ids[:, fire].tolist() == policy.events[0][0]["forked_ids"]


def test_branch_token_budget_caps_the_fork(embedded):
    model, tok = embedded
    enc = encode_prompts(tok, PROMPTS[:1])
    policy = BranchPolicy(5, token_budget=3 * 10)  # room for 3 rows of 10 tokens
    with torch.inference_mode():
        ctrl = _controller(model, tok, max_new_tokens=10)
        trace = ctrl.run(enc, policy)
    assert len(trace) == 3 and len(policy.events[0][0]["forked_ids"]) == 3
    assert int(ctrl.generated) == int(trace.lengths.sum()) <= 30


def test_branch_points_of_one_prompt_at_one_step_share_the_budget(embedded):
    """A trigger that always fires: step 0 forks, then both rows fire at step 1 and
    fork in turn under the budget (the second sees the first's new row as running)."""
    model, tok = embedded
    enc = encode_prompts(tok, PROMPTS[:1])
    always = Trigger("entropy", threshold=-1.0)
    policy = BranchPolicy(2, always, max_branch_points=3, token_budget=4 * 8)
    with torch.inference_mode():
        ctrl = _controller(model, tok, max_new_tokens=8)
        trace = ctrl.run(enc, policy)
    assert [(e["step"], e["candidate"]) for e in policy.events[0]] == [(0, 0), (1, 0), (1, 1)]
    assert len(trace) == 4 and int(ctrl.generated) <= 4 * 8
    # with room for 3 rows only, row 1's fork at step 1 is refused: 3 rows, 2 forks
    policy = BranchPolicy(2, always, max_branch_points=3, token_budget=3 * 8)
    with torch.inference_mode():
        trace = _controller(model, tok, max_new_tokens=8).run(enc, policy)
    assert [(e["step"], e["candidate"]) for e in policy.events[0]] == [(0, 0), (1, 0)]
    assert len(trace) == 3


def test_rollback_takes_back_and_regenerates_exactly_there(embedded):
    model, tok = embedded
    prompt = PROMPTS[1]
    greedy = _greedy(model, tok, [prompt], max_new_tokens=24)
    trigger = Trigger("entropy", threshold=2.0, window=3, min_tokens=4)
    policy = RollbackPolicy(trigger, rewind=3, temperature=1.5, max_retries=2)
    enc = encode_prompts(tok, [prompt])
    with torch.inference_mode():
        ctrl = _controller(model, tok, max_new_tokens=24, seed=0)
        trace = ctrl.run(enc, policy, tok)
    events = policy.events[0]
    assert events, "the trigger should fire on this uncertain answer"
    first = events[0]
    start = first["step"] - first["rewound"]
    # before the first rollback, the answer is greedy's; the taken-back tokens were greedy's
    assert torch.equal(trace.token_ids[0, :start], greedy.token_ids[0, :start])
    assert first["rewound_ids"] == greedy.token_ids[0, start : first["step"]].tolist()
    for event in events:
        assert event["kept"] == ("new" if event["new_score"] < event["old_score"] else "old")
    assert len(events) <= 2
    # the final answer's distributions are those of its own prefix
    _assert_consistent(model, tok, prompt, trace[0])
    assert int(ctrl.generated) >= int(trace.lengths[0]) + first["rewound"]


def test_rollback_restores_the_old_tokens_when_they_were_better(embedded):
    """A trigger that always fires and a regeneration temperature so high that the new
    tokens are worse: every retry restores the old continuation, so the answer is greedy's."""
    model, tok = embedded
    prompt = PROMPTS[0]
    greedy = _greedy(model, tok, [prompt], max_new_tokens=12)
    trigger = Trigger("entropy", threshold=-1.0, min_tokens=3)  # entropy > -1: always
    policy = RollbackPolicy(trigger, rewind=2, temperature=50.0, max_retries=3)
    enc = encode_prompts(tok, [prompt])
    with torch.inference_mode():
        trace = _controller(model, tok, max_new_tokens=12, seed=1).run(enc, policy, tok)
    assert [e["kept"] for e in policy.events[0]] == ["old"] * 3
    assert trace.texts == greedy.texts
    assert torch.equal(trace.lengths, greedy.lengths)
    n = int(trace.lengths[0])
    assert torch.equal(trace.token_ids[:, :n], greedy.token_ids[:, :n])
    _assert_consistent(model, tok, prompt, trace[0])


def test_deepconf_online_thresholds_stops_and_votes(embedded):
    model, tok = embedded
    recipe = Strategy.load("deepconf-online").to_dict()
    recipe["action"].update(n=6, warmup=3, window=4, keep=50)
    result = generate(model, tok, PROMPTS[:2], strategy=recipe, max_new_tokens=20, seed=3)
    for b, actions in enumerate(result.actions):
        (event,) = actions
        voters = result.candidates[b]
        warm = voters.select(range(3))  # the warm-up traces always vote
        lowest = warm.aggregate("deepconf", "deepconf_lowest_group", window=4).numpy()
        assert event["threshold"] == pytest.approx(float(np.percentile(lowest, 50)), rel=1e-5)
        assert event["voters"] == len(voters) == 6 - len(event["stopped"])
        for i in range(3, len(voters)):  # later voters never dipped below the threshold
            groups, n = group_confidences(
                voters.signals["deepconf"][i : i + 1], voters.lengths[i : i + 1], window=4
            )
            assert float(groups[0, : int(n[0])].min()) >= event["threshold"] - 1e-4
    assert result.tokens_generated == sum(a[0]["tokens"] for a in result.actions)


def test_trigger_state_rows_follow_forks_and_resets():
    trigger = Trigger("entropy", threshold=1.0, window=2, patience=2)
    state = TriggerState(trigger, 2, "cpu", thresholds=[1.0, 5.0])
    values = torch.tensor([2.0, 2.0])
    assert state.update(values, 0).tolist() == [False, False]
    assert state.update(values, 1).tolist() == [True, False]  # row 1 has its own threshold
    state.select_rows(torch.tensor([0, 0, 1]))
    state.reset_rows(torch.tensor([False, True, False]))
    values = torch.tensor([2.0, 2.0, 2.0])
    assert state.update(values, 2).tolist() == [True, False, False]
    inactive = state.update(values, 3, active=torch.tensor([False, True, True]))
    assert inactive.tolist() == [False, True, False]
    assert state.seen.tolist() == [3, 2, 4]


@pytest.mark.parametrize(
    ("recipe", "key"),
    [
        ({"name": "x", "action": {"type": "branch", "at": "middle"}}, "action.at"),
        ({"name": "x", "action": {"type": "branch", "at": "trigger"}}, "trigger"),
        (
            {
                "name": "x",
                "action": {"type": "branch"},
                "trigger": {"signal": "entropy", "threshold": 1.0},
            },
            "trigger",
        ),
        ({"name": "x", "action": {"type": "rollback"}}, "trigger"),
        (
            {"name": "x", "action": {"type": "deepconf-online", "warmup": 8, "n": 8}},
            "action.warmup",
        ),
        ({"name": "x", "action": {"type": "deepconf-online", "keep": 0}}, "action.keep"),
        ({"name": "x", "action": {"type": "branch", "token_budget": -1}}, "action.token_budget"),
    ],
)
def test_bad_controller_recipes_name_the_key(recipe, key):
    with pytest.raises(ValueError, match=key):
        Strategy.from_dict(recipe)


def test_controller_rejects_bad_parameters(tiny_llama):
    monitor = UncertaintyMonitor(["entropy"], eos_token_id=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Controller(tiny_llama, monitor, eos_token_ids=[1], pad_token_id=0, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_ids"):
        Controller(tiny_llama, monitor, eos_token_ids=[], pad_token_id=0)
    with pytest.raises(ValueError, match="k must"):
        BranchPolicy(0)
    with pytest.raises(ValueError, match="rewind"):
        RollbackPolicy(Trigger("entropy", threshold=1.0), rewind=0)
    ctrl = Controller(tiny_llama, monitor, eos_token_ids=[1], pad_token_id=0, max_new_tokens=2)
    enc = {"input_ids": torch.tensor([[3, 4]]), "attention_mask": torch.ones(1, 2)}
    with pytest.raises(ValueError, match="chosen_prob"):
        ctrl.run(enc, RollbackPolicy(Trigger("chosen_prob", threshold=0.5, direction="below")))


@pytest.mark.embedded  # the command loads the embedded model
def test_bench_actions_reports_cost_against_greedy(capsys):
    import json

    from tokur_decode.cli import main

    assert (
        main(
            [
                "bench",
                "actions",
                "--strategies",
                "monitor,cot-branch",
                "--max-new-tokens",
                "6",
                "--json",
            ]
        )
        == 0
    )
    greedy, monitor, branch = json.loads(capsys.readouterr().out)
    assert greedy["strategy"] == "greedy" and monitor["strategy"] == "monitor"
    assert monitor["tokens"] == greedy["tokens"] and monitor["token_ratio"] == 1.0
    assert monitor["correct"] == greedy["correct"]  # no action: the same answers
    assert 1.0 < branch["token_ratio"] <= 5.0  # at most k = 5 paths per question
    assert all(
        r["seconds"] > 0 and 0 <= r["correct"] <= r["questions"] == 8
        for r in (greedy, monitor, branch)
    )


def test_recipe_generation_table_sets_defaults_the_caller_overrides(embedded):
    model, tok = embedded
    recipe = Strategy.load("entropy-resample")
    assert recipe.generation == {"temperature": 0.7}
    assert Strategy.from_dict(recipe.to_dict()) == recipe
    sampled = generate(model, tok, PROMPTS[1], strategy=recipe, max_new_tokens=12, seed=0)
    explicit = generate(
        model, tok, PROMPTS[1], strategy=recipe, max_new_tokens=12, seed=0, temperature=0.7
    )
    assert sampled.texts == explicit.texts
    # greedy decoding would make the adaptive rule a no-op: refused (issue 15); the
    # caller's temperature 0 still overrides a recipe's [generation] table
    with pytest.raises(ValueError, match="temperature: the adaptive resample rule"):
        generate(model, tok, PROMPTS[1], strategy=recipe, max_new_tokens=12, temperature=0)
    table_only = {"name": "t", "generation": {"temperature": 0.7}}
    greedy = generate(model, tok, PROMPTS[1], strategy=table_only, max_new_tokens=12, temperature=0)
    assert greedy.texts == _greedy(model, tok, PROMPTS[1:2], max_new_tokens=12).texts
    assert sampled.texts != greedy.texts
    with pytest.raises(ValueError, match="generation.temperature"):
        Strategy.from_dict({"name": "x", "generation": {"temperature": -1}})
    with pytest.raises(ValueError, match="generation.seed"):
        Strategy.from_dict({"name": "x", "generation": {"seed": 1}})
