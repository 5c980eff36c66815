"""Step redrawing's procedure on scripted draws: a step is redrawn exactly when its
score falls below the answer's (bias-corrected) momentum by MUR's margin, the best
draw continues, the other prompts' answers wait unchanged, and steady answers cost one
draw per step."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from tokur_decode.core.trace import Trace
from tokur_decode.strategies import backend as B
from tokur_decode.strategies import generate


def _recipe(**action) -> dict:
    return {"name": "redraw-scripted", "action": {"type": "step-redraw", "n": 4, **action}}


class Scripted:
    """Prompt ``p``'s draws in the order they are asked for: each draw of a step is one
    token with ``signal`` ``score`` and text ``text``; an answer finishes after
    ``steps[p]`` steps."""

    acts = (B.StepsAct,)

    def __init__(self, draws, steps: list[int], signal: str = "chosen_logprob"):
        self.draws, self.steps, self.signal = [list(d) for d in draws], steps, signal

    @contextlib.contextmanager
    def particles(self, prompts, request):
        yield _Session(self, len(prompts), request.n)


class _Session:
    def __init__(self, script: Scripted, prompts: int, n: int):
        self.script = script
        self.rows = [{"prompt": p, "answer": []} for p in range(prompts) for _ in range(n)]
        self.tokens = 0

    def _done(self, row) -> bool:
        return len(row["answer"]) >= self.script.steps[row["prompt"]]

    def advance(self, hold=None):
        hold = hold or [False] * len(self.rows)
        step = []
        for row, held in zip(self.rows, hold, strict=True):
            drawn = []
            if not (held or self._done(row)):
                drawn = [self.script.draws[row["prompt"]].pop(0)]
                row["answer"] = row["answer"] + drawn
            step.append(drawn)
        self.tokens += sum(len(d) for d in step)
        return _trace(step, self.script.signal), [self._done(row) for row in self.rows]

    def select(self, index):
        self.rows = [dict(self.rows[i]) for i in index]

    def trace(self):
        return _trace([row["answer"] for row in self.rows], self.script.signal)


def _trace(answers: list[list[tuple[float, str]]], signal: str) -> Trace:
    width = max(max(len(a) for a in answers), 1)
    values = torch.zeros(len(answers), width)
    for i, answer in enumerate(answers):
        values[i, : len(answer)] = torch.tensor([score for score, _ in answer])
    return Trace(
        {signal: values},
        torch.zeros(len(answers), width, dtype=torch.long),
        torch.tensor([len(a) for a in answers]),
        texts=[" ".join(text for _, text in a) for a in answers],
    )


def test_a_step_below_the_momentum_is_redrawn_and_the_best_draw_continues():
    # prompt 0: steps -0.1, -0.1, then -1.0 < -0.1 + ln 0.8 -> three more draws, the best
    # (-0.05, "e") is kept; prompt 1 is steady and waits while prompt 0 redraws
    draws = [
        [(-0.1, "a"), (-0.1, "b"), (-1.0, "c"), (-0.5, "d"), (-0.05, "e"), (-2.0, "f")],
        [(-0.2, "x"), (-0.2, "y"), (-0.2, "z")],
    ]
    backend = Scripted(draws, [3, 3])
    result = generate(backend, ["p0", "p1"], strategy=_recipe())
    assert result.texts == ["a b e", "x y z"]
    first, second = (record for (record,) in result.actions)
    (redraw,) = first["redrawn"]
    assert redraw["step"] == 2 and redraw["kept"] == 2
    assert redraw["scores"] == pytest.approx([-1.0, -0.5, -0.05, -2.0])
    assert redraw["momentum"] == pytest.approx(-0.1)
    assert (first["tokens"], first["steps"]) == (6, 3)
    assert second["redrawn"] == [] and (second["tokens"], second["steps"]) == (3, 3)
    assert result.tokens_generated == 9 and backend.draws == [[], []]


def test_the_margin_is_the_scaling_rates_log_and_the_first_step_is_never_redrawn():
    """Momentum 0: each step is compared with the step before it, minus ln(1 / 0.8)."""
    margin = -math.log(0.8)  # 0.223

    def run(second: float) -> dict:
        # the first step is terrible but has nothing to fall below; the third step is
        # compared with the second; the fourth falls below: redrawn, the best draw kept
        steps = [(-5.0, "s"), (-0.3, "a"), (second, "b"), (-3.0, "c")]
        draws = [[*steps, (-0.1, "d"), (-9.0, "e"), (-9.0, "f"), *[(-0.1, "g")] * 4]]
        strategy = _recipe(momentum=0.0)
        result = generate(Scripted(draws, [4]), ["p"], strategy=strategy)
        return result.actions[0][0] | {"text": result.texts[0]}

    inside = run(-0.3 - margin + 0.01)
    assert [r["step"] for r in inside["redrawn"]] == [3] and inside["text"] == "s a b d"
    outside = run(-0.3 - margin - 0.01)  # the control: just past the margin
    assert outside["redrawn"][0]["step"] == 2


def test_a_steady_answer_costs_one_draw_per_step_as_plain_sampling():
    """Constant step scores never fall below their own mean, however long. Uncorrected
    (MUR's code: the momentum starts at 0), step 1 would compare -0.5 with -0.05 and be
    redrawn."""
    draws = [[(-0.5, str(i)) for i in range(6)]]
    result = generate(Scripted(draws, [6]), ["p"], strategy=_recipe())
    (record,) = result.actions[0]
    assert record["redrawn"] == [] and record["tokens"] == 6
    assert result.texts == ["0 1 2 3 4 5"]


def test_an_uncertainty_is_better_low():
    """Entropy: a step more uncertain than the momentum is redrawn, the calmest draw kept."""
    draws = [[(0.5, "a"), (3.0, "b"), (2.0, "c"), (0.1, "d"), (4.0, "e")]]
    result = generate(
        Scripted(draws, [2], signal="entropy"), ["p"], strategy=_recipe(score="entropy")
    )
    assert result.texts == ["a d"]
    assert result.actions[0][0]["redrawn"][0]["scores"] == pytest.approx([-3.0, -2.0, -0.1, -4.0])


def test_bad_settings_are_refused_before_anything_runs():
    nothing = Scripted([[]], [1])
    with pytest.raises(ValueError, match="action.n"):
        generate(nothing, "q", strategy=_recipe(n=1))
    with pytest.raises(ValueError, match="action.momentum"):
        generate(nothing, "q", strategy=_recipe(momentum=1.0))
    with pytest.raises(ValueError, match="action.scaling_rate"):
        generate(nothing, "q", strategy=_recipe(scaling_rate=0.0))
    with pytest.raises(ValueError, match="action.reducer"):
        generate(nothing, "q", strategy=_recipe(reducer="median"))
    with pytest.raises(ValueError, match="temperature"):
        generate(nothing, "q", strategy=_recipe(), temperature=0.0)
    with pytest.raises(ValueError, match="alternatives"):
        generate(nothing, "q", strategy=_recipe(), alternatives=2)
    with pytest.raises(ValueError, match="continuing particles step by step"):
        generate(_NoSteps(), "q", strategy=_recipe())


class _NoSteps:
    acts = (B.StopAct,)


def test_a_probe_is_the_critic_that_picks_the_draw():
    """A probe whose p(wrong) grows with the answer's mean log-probability (the control
    of a critic that disagrees with the score): the gate still reads the step's score,
    the draw kept is the one whose answer so far the probe finds least likely wrong."""
    from tokur_decode.core.probe import Probe

    probe = Probe(("chosen_logprob:mean",), (0.0,), (1.0,), (2.0,), 0.0)
    draws = [[(-0.1, "a"), (-1.0, "b"), (-0.5, "c"), (-0.05, "d"), (-2.0, "e")]]
    by_score = generate(Scripted(draws, [2]), ["p"], strategy=_recipe())
    assert by_score.texts == ["a d"]  # without the probe: the best scored draw
    result = generate(Scripted(draws, [2]), ["p"], strategy=_recipe(probe=probe.to_dict()))
    assert result.texts == ["a e"]
    (redraw,) = result.actions[0][0]["redrawn"]
    means = np.array([-1.0, -0.5, -0.05, -2.0]) / 2 + -0.1 / 2  # the answers so far
    assert redraw["p_wrong"] == pytest.approx((1 / (1 + np.exp(-2.0 * means))).tolist())
    assert redraw["kept"] == 3 and redraw["scores"] == pytest.approx([-1.0, -0.5, -0.05, -2.0])
