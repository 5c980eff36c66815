"""Particle filtering's procedure on scripted particles: weights move by the step
scores as the recipe says, resampling happens exactly when the effective sample size
falls below the threshold (with the seeded draw), a flat reward never resamples, and
the finished particles vote by weight."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from tokur_decode.core.particles import normalized, systematic_resample
from tokur_decode.core.trace import Trace
from tokur_decode.strategies import backend as B
from tokur_decode.strategies import generate
from tokur_decode.strategies.run import plan


def _recipe(**action) -> dict:
    return {
        "name": "pf-scripted",
        "action": {"type": "particle-filter", "n": 4, "score": "entropy", **action},
    }


class Scripted:
    """Particle ``j`` of prompt ``p`` (its lineage, kept through copies) decodes one
    token per step (its text ``"x\\n\\n"``: one reasoning step) with entropy
    ``values[p][j][k]`` at step ``k``, and finishes after its last value with the text
    ``answers[p][j]``."""

    acts = (B.StepsAct,)

    def __init__(self, values, answers):
        self.values, self.answers = values, answers
        self.selected: list[list[int]] = []

    @contextlib.contextmanager
    def particles(self, prompts, request):
        yield _Session(self, len(prompts), request.n)


class _Session:
    def __init__(self, script: Scripted, prompts: int, n: int):
        self.script, self.n = script, n
        self.lineage = [(p, j) for p in range(prompts) for j in range(n)]
        self.steps = [0] * len(self.lineage)
        self.tokens = 0

    def _done(self, i):
        p, j = self.lineage[i]
        return self.steps[i] >= len(self.script.values[p][j])

    def advance(self):
        values, lengths = [], []
        for i, (p, j) in enumerate(self.lineage):
            if self._done(i):
                values.append(0.0), lengths.append(0)
                continue
            values.append(self.script.values[p][j][self.steps[i]]), lengths.append(1)
            self.steps[i] += 1
        self.tokens += sum(lengths)
        step = Trace(
            {"entropy": torch.tensor(values).unsqueeze(-1)},
            torch.zeros(len(values), 1, dtype=torch.long),
            torch.tensor(lengths),
        )
        return step, [self._done(i) for i in range(len(self.lineage))]

    def select(self, index):
        self.script.selected.append(list(index))
        self.lineage = [self.lineage[i] for i in index]
        self.steps = [self.steps[i] for i in index]

    def trace(self):
        texts = [self.script.answers[p][j] for p, j in self.lineage]
        width = max(max(self.steps), 1)
        entropy = torch.zeros(len(texts), width)
        for i, (p, j) in enumerate(self.lineage):
            entropy[i, : self.steps[i]] = torch.tensor(self.script.values[p][j][: self.steps[i]])
        return Trace(
            {"entropy": entropy},
            torch.zeros(len(texts), width, dtype=torch.long),
            torch.tensor(self.steps),
            tokens=[["x\n\n"] * steps for steps in self.steps],
            texts=texts,
        )


def test_a_flat_reward_never_resamples_and_the_particles_vote():
    values = [[[0.7, 0.7, 0.7]] * 4, [[0.2, 0.2]] * 4]
    answers = [["4", "5", "4", "6"], ["a", "b", "b", "c"]]
    backend = Scripted(values, answers)
    result = generate(backend, ["p0", "p1"], strategy=_recipe(), signals=["entropy"])
    assert backend.selected == []
    assert result.texts == ["4", "b"]  # the majority, as independent samples would vote
    for (record,) in result.actions:
        assert record["resampled"] == [] and record["weights"] == pytest.approx([0.25] * 4)
    assert [r["steps"] for (r,) in result.actions] == [3, 3]
    assert [r["tokens"] for (r,) in result.actions] == [12, 8]
    assert result.tokens_generated == 20


def test_resampling_follows_the_effective_sample_size_and_the_seeded_draw():
    # step 0: entropies 0, 5, 5, 5 -> weights ~ (0.98, 0.007 x 3), ESS ~ 1.04 < 2: resample
    # step 1: all equal -> uniform after the reset, ESS 4: no resampling
    values = [[[0.0, 1.0], [5.0, 1.0], [5.0, 1.0], [5.0, 1.0]]]
    answers = [["right", "w1", "w2", "w3"]]
    backend = Scripted(values, answers)
    result = generate(backend, ["p0"], strategy=_recipe(), signals=["entropy"], seed=11)
    u = np.random.default_rng(11).random()
    kept = systematic_resample(normalized(-np.array([0.0, 5.0, 5.0, 5.0])), u)
    (record,) = result.actions[0]
    assert [r["kept"] for r in record["resampled"]] == [kept.tolist()]
    assert record["resampled"][0]["step"] == 1
    assert record["resampled"][0]["ess"] == pytest.approx(
        1 / np.square(normalized(-np.array([0.0, 5.0, 5.0, 5.0]))).sum()
    )
    assert backend.selected == [kept.tolist()]
    assert result.texts == ["right"] and record["weights"] == pytest.approx([0.25] * 4)

    # a lower threshold keeps the population: the weighted vote then picks the heavy one
    backend = Scripted(values, [["right", "w", "w", "w"]])
    kept_all = generate(backend, ["p0"], strategy=_recipe(ess_threshold=0.2), signals=["entropy"])
    assert backend.selected == [] and kept_all.texts == ["right"]  # 0.98 beats 3 x 0.007
    majority = generate(
        Scripted(values, [["right", "w", "w", "w"]]),
        ["p0"],
        strategy=_recipe(ess_threshold=0.2, weight_temperature=1e9),
        signals=["entropy"],
    )
    assert majority.texts == ["w"]  # the control: with flat weights the majority wins


def test_a_confidence_score_adds_and_an_uncertainty_subtracts():
    values = [[[0.0], [3.0], [0.0], [0.0]]]
    answers = [["a", "b", "a", "a"]]
    by_entropy = generate(
        Scripted(values, answers), ["p"], strategy=_recipe(ess_threshold=0.0), signals=["entropy"]
    )
    w = by_entropy.actions[0][0]["weights"]
    assert w[1] < w[0] == pytest.approx(w[2])


def test_the_weights_score_whole_answers_so_a_long_answer_gains_nothing_by_length():
    """Equal entropy per token, one particle three times as long: equal weights (a sum
    of step scores would weigh the long one down by its extra steps). The control: a
    long particle that is calmer per token does win."""
    values = [[[0.5], [0.5, 0.5, 0.5], [0.5], [0.5]], [[0.5], [0.2, 0.2, 0.2], [0.5], [0.5]]]
    answers = [["a", "b", "a", "a"]] * 2
    recipe = _recipe(ess_threshold=0.0)
    result = generate(Scripted(values, answers), ["p", "q"], strategy=recipe)
    same, calmer = (record["weights"] for (record,) in result.actions)
    assert same == pytest.approx([0.25] * 4)
    assert calmer == pytest.approx(normalized(-np.array([0.5, 0.2, 0.5, 0.5])).tolist())


def test_a_step_reducer_weighs_the_worst_step_so_far():
    """``step_mean_max`` of entropy: the answer's worst step, not its mean token."""
    values = [[[0.0, 3.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]]
    answers = [["a", "b", "b", "b"]]
    for reducer, worst in (("mean", 1.5), ("step_mean_max", 3.0)):
        recipe = _recipe(reducer=reducer, ess_threshold=0.0)
        (record,) = generate(Scripted(values, answers), ["p"], strategy=recipe).actions[0]
        want = normalized(-np.array([worst, 1.0, 1.0, 1.0]))
        assert record["weights"] == pytest.approx(want.tolist()), reducer


def test_the_probe_weighs_each_answer_so_far():
    """A probe whose p(wrong) grows with the mean entropy of the answer so far: the
    particle that was calm early keeps its lead when all later steps are equal."""
    from tokur_decode.core.probe import Probe

    probe = Probe(("entropy:mean",), (0.0,), (1.0,), (2.0,), 0.0, 1.0)
    values = [[[0.0, 1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0]]]
    recipe = _recipe(score="probe", probe=probe.to_dict(), ess_threshold=0.0)
    result = generate(Scripted(values, [["a", "b", "b", "b"]]), ["p"], strategy=recipe)
    (record,) = result.actions[0]

    def p_wrong(mean):
        return 1 / (1 + np.exp(-2.0 * mean))

    calm, others = p_wrong(0.5), p_wrong(1.5)  # the whole answers' mean entropies
    want = normalized(-np.array([calm, others, others, others]))
    assert record["weights"] == pytest.approx(want.tolist())
    with pytest.raises(ValueError, match="action.probe"):
        generate(Scripted(values, [["a"] * 4]), ["p"], strategy=_recipe(score="probe"))


def test_particle_filter_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="continuing particles step by step"):
        # The acts of the OpenAI-client backend (vllm/remote.py), without importing vLLM.
        plan(
            (B.StopAct, B.ResampleAct),
            "q",
            strategy="particle-filter",
            backend_name="RemoteBackend",
        )
    with pytest.raises(ValueError, match="alternatives"):
        generate(Scripted([], []), "q", strategy="particle-filter", alternatives=3)
    with pytest.raises(ValueError, match="action.reducer: unknown 'median'"):
        generate(Scripted([], []), "q", strategy=_recipe(reducer="median"))
    with pytest.raises(ValueError, match="action.ess_threshold"):
        generate(Scripted([], []), "q", strategy=_recipe(ess_threshold=1.5))
    with pytest.raises(ValueError, match="temperature"):
        generate(Scripted([], []), "q", strategy=_recipe(), temperature=0.0)
