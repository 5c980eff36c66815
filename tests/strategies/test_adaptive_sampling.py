"""Adaptive sampling: the stopping rules on hand-made votes, against their definitions;
the procedure on a scripted backend (it stops exactly where its rule says), and the
scaling runner's simulation of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from tokur_decode.core.adaptive import beta_confidence, drawn_until_settled, settled
from tokur_decode.core.trace import Trace
from tokur_decode.experiments import scaling_methods, scaling_simulation
from tokur_decode.strategies import backend as B
from tokur_decode.strategies import generate

ESC = {
    "name": "esc-test",
    "action": {"type": "adaptive-sampling", "rule": "esc", "window": 3, "n": 9},
}


def _beta_by_integration(v1: int, v2: int) -> float:
    """P(p1 > p2) with (p1, p2) the shares of the leader and the runner-up under a
    uniform prior, by integrating the Beta(v1 + 1, v2 + 1) density over (0.5, 1)."""
    density = stats.beta(v1 + 1, v2 + 1).pdf
    return integrate.quad(density, 0.5, 1.0)[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=20))
def test_beta_confidence_is_the_probability_the_leader_beats_the_runner_up(answers):
    counts = sorted((answers.count(a) for a in set(answers)), reverse=True) + [0]
    assert beta_confidence(answers) == pytest.approx(_beta_by_integration(*counts[:2]), abs=1e-7)


def test_the_rules_stop_exactly_where_they_say():
    votes = ["1", "2", "1", "3", "3", "4", "5", "5", "5", "5", "5", "5"]
    assert drawn_until_settled(votes, window=3, rule="esc") == 9  # 5, 5, 5 is window 3
    assert drawn_until_settled(votes[:8], window=3, rule="esc") == 8  # never settled: all
    assert not settled(["1", "1", None], window=3)  # no answer never settles
    assert not settled([None] * 3, window=3)
    # beta: 1 - 0.5^(v1 + 1) with one answer: 0.9375 after 3, 0.96875 after 4
    assert drawn_until_settled(["7"] * 8, window=1, rule="beta", threshold=0.95) == 4
    assert drawn_until_settled(["7"] * 8, window=2, rule="beta", threshold=0.95) == 4
    mixed = ["7", "8", "7", "7", "7", "7", "7", "7"]  # (6, 1) first reaches 0.95: 0.9648
    assert drawn_until_settled(mixed, window=1, rule="beta") == 7
    assert _beta_by_integration(5, 1) < 0.95 < _beta_by_integration(6, 1)
    with pytest.raises(ValueError, match="rule"):
        settled(["1"], window=1, rule="vote")


class Voting:
    """A backend whose prompt ``p``'s ``k``-th answer (over all calls) is ``script[p][k]``;
    each answer is ``k + 1`` tokens long."""

    acts = ()

    def __init__(self, script: list[list[str]]):
        self.script, self.used = script, [0] * len(script)
        self.calls: list[tuple[int, int]] = []  # (prompts in the call, n)
        self.index = {}

    def decode(self, prompts, request: B.Request) -> B.Decoded:
        self.calls.append((len(prompts), request.n))
        rows, texts = [], []
        for local, prompt in enumerate(prompts):
            p = int(prompt)
            for _ in range(request.n):
                k = self.used[p]
                self.used[p] += 1
                rows.append((local, k))
                texts.append(self.script[p][k])
        width = max(k for _, k in rows) + 1
        trace = Trace(
            signals={
                k: torch.zeros(len(rows), width) for k in ("max_prob", "chosen_prob", "entropy")
            },
            token_ids=torch.zeros(len(rows), width, dtype=torch.long),
            lengths=torch.tensor([k + 1 for _, k in rows]),
            texts=texts,
        )
        return B.Decoded(trace, [p for p, _ in rows], [[] for _ in rows], int(trace.lengths.sum()))


def test_adaptive_sampling_draws_until_each_prompt_is_settled():
    script = [
        ["x", "x", "x"] + ["y"] * 6,  # settled after one window
        ["a", "b", "c", "d", "d", "e", "f", "f", "f"],  # after three
        ["u", "v", "w", "u", "v", "w", "u", "v", "w"],  # never: the budget n = 9
    ]
    backend = Voting(script)
    result = generate(backend, ["0", "1", "2"], strategy=ESC, signals=["entropy"])
    assert backend.calls == [(3, 3), (2, 3), (2, 3)]  # only the open prompts continue
    drawn = [a[0]["drawn"] for a in result.actions]
    assert drawn == [3, 9, 9]
    assert result.texts == ["x", "f", "u"]  # majority of the drawn; ties: earliest drawn
    (first,) = result.actions[0]
    assert first["tokens"] == 1 + 2 + 3 and first["tokens_saved"] == round(6 * 6 / 3)
    assert first["answers"] == ["x", "x", "x"]
    assert len(result.candidates[1]) == 9
    with pytest.raises(ValueError, match="action.window"):
        generate(Voting(script), ["0"], strategy={**ESC, "action": {**ESC["action"], "window": 10}})


def test_the_scaling_simulation_follows_the_same_rule():
    (m,) = scaling_methods.recipe_methods(["esc"])
    assert (m.kind, m.rule, m.step) == ("adaptive-sampling", "esc", 4)
    answers = ["1", "1", "1", "1", "2", "2", "2", "2"]
    right = np.array([1.0] * 4 + [0.0] * 4)
    lengths = np.arange(1, 9, dtype=float)
    subsets = np.array([list(range(8)), list(range(7, -1, -1))])
    correct, tokens = scaling_simulation._adaptive(answers, right, lengths, subsets, m)
    assert correct == 0.5  # the first order settles on "1", the reversed one on "2"
    assert tokens == (10 + 26) / 2
