"""Particles advancing in steps on the embedded model: they continue from the right
prefixes after resampling (tokens equal to re-running each surviving prefix alone under
greedy decoding; recorded distributions equal a plain forward over prompt + answer when
sampling), and particle filtering end to end."""

from __future__ import annotations

import pytest

from tokur_decode.core.text import normalize_answer
from tokur_decode.hf import HFBackend
from tokur_decode.strategies import backend as B
from tokur_decode.strategies import generate

from .test_controller import _assert_consistent

PROMPTS = ["What is 17 + 25? Explain step by step.", "List three colours, one per line."]
SIGNALS = ("max_prob", "chosen_prob", "entropy", "margin")
PF = {
    "name": "pf-test",
    "signals": list(SIGNALS),
    "action": {"type": "particle-filter", "n": 4, "score": "entropy", "step_tokens": 6},
}


def _steps(temperature: float, n: int, max_new_tokens: int = 40) -> B.Request:
    sampling = B.Sampling(temperature=temperature, seed=3, max_new_tokens=max_new_tokens)
    return B.Request(SIGNALS, sampling, n, B.Steps("\n\n", 6))


def _run(particles, order=None):
    """Advance to the end, applying ``order`` after the first step."""
    step, done = particles.advance()
    if order is not None:
        particles.select(order)
    while not all(done if order is None else [done[i] for i in order]):
        step, done = particles.advance()
        order = None
    return particles.trace()


def test_greedy_particles_continue_the_prefix_they_were_given(embedded):
    backend = HFBackend(*embedded)
    plain = backend.decode(PROMPTS, B.Request(SIGNALS, B.Sampling(max_new_tokens=40))).trace
    with backend.particles(PROMPTS, _steps(0.0, 1)) as particles:
        stepped = _run(particles)
    with backend.particles(PROMPTS, _steps(0.0, 1)) as particles:
        swapped = _run(particles, order=[1, 1])  # both continue prompt 1's first step
    for row, source in ((0, 0), (1, 1)):
        n = int(plain.lengths[source])
        assert stepped.texts[row] == plain.texts[source]
        assert stepped.token_ids[row, :n].tolist() == plain.token_ids[source, :n].tolist()
    for row in (0, 1):  # prompt 1's prefix, continued from prompt 1's cache rows
        assert swapped.texts[row] == plain.texts[1]
    assert plain.texts[0] != plain.texts[1]  # the control: the swap is visible


def test_resampled_particles_see_their_own_prefix(embedded):
    model, tok = embedded
    backend = HFBackend(model, tok)
    with backend.particles(PROMPTS[:1], _steps(0.8, 4)) as particles:
        first, _ = particles.advance()
        assert len(set(first.texts)) > 1  # the particles differ, so a wrong prefix shows
        particles.select([2, 2, 0, 3])
        for _ in range(3):
            step, done = particles.advance()
        trace = particles.trace()
        assert trace.texts[0].startswith(first.texts[2]) and trace.texts[2].startswith(
            first.texts[0]
        )
    for row in range(4):
        _assert_consistent(model, tok, PROMPTS[0], trace[row])
    assert step.lengths.max() <= 6  # a step is at most step_tokens long


def test_particle_filter_with_a_flat_reward_is_independent_sampling(embedded):
    backend = HFBackend(*embedded)
    flat = {**PF, "action": {**PF["action"], "weight_temperature": 1e12}}
    result = generate(backend, PROMPTS, strategy=flat, max_new_tokens=32)
    for actions, candidates in zip(result.actions, result.candidates, strict=True):
        (record,) = actions
        assert record["resampled"] == []
        assert record["weights"] == pytest.approx([0.25] * 4)
        assert record["answers"] == [
            t.strip().rstrip(".").strip().lower() for t in candidates.texts
        ]
        assert record["steps"] >= 2
    guided = generate(backend, PROMPTS, strategy=PF, max_new_tokens=32)
    assert any(record["resampled"] for (record,) in guided.actions)  # the control
    for (record,), text, n in zip(guided.actions, guided.texts, guided.trace.lengths, strict=True):
        assert record["answers"][record["chosen"]] == normalize_answer(text)
        assert record["tokens"] >= 4 * int(n) > 0 or record["resampled"]
    assert guided.tokens_generated == sum(r["tokens"] for (r,) in guided.actions)
