"""Particles advancing in steps on the embedded model: they continue from the right
prefixes after resampling (tokens equal to re-running each surviving prefix alone under
greedy decoding; recorded distributions equal a plain forward over prompt + answer when
sampling), and particle filtering end to end."""

from __future__ import annotations

import math

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
    return B.Request(SIGNALS, sampling, n, B.StepsAct("\n\n", 6))


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


def test_held_particles_wait_and_then_draw_the_step_from_where_they_waited(embedded):
    """Greedy, one prompt twice: the held copy does not move; advanced later it
    decodes the step the other decoded (same prefix), and both then finish as plain
    greedy decoding; the recorded distributions are a plain forward's."""
    model, tok = embedded
    backend = HFBackend(model, tok)
    plain = backend.decode(PROMPTS[:1], B.Request(SIGNALS, B.Sampling(max_new_tokens=40))).trace
    with backend.particles(PROMPTS[:1] * 2, _steps(0.0, 1)) as particles:
        first, _ = particles.advance(hold=[False, True])
        second, _ = particles.advance(hold=[True, False])
        n = int(first.lengths[0])
        assert n > 0 and int(first.lengths[1]) == 0 and int(second.lengths[0]) == 0
        assert second.token_ids[1, :n].tolist() == first.token_ids[0, :n].tolist()
        with pytest.raises(ValueError, match="hold: one per particle"):
            particles.advance(hold=[True])
        trace = _run(particles)
    assert trace.texts == [plain.texts[0]] * 2
    for row in range(2):
        _assert_consistent(model, tok, PROMPTS[0], trace[row])


def test_step_redraw_spends_extra_draws_only_on_the_steps_it_redraws(embedded):
    backend = HFBackend(*embedded)
    recipe = {
        "name": "redraw-test",
        "signals": list(SIGNALS),
        "action": {"type": "step-redraw", "n": 3, "step_tokens": 6, "scaling_rate": 0.95},
    }
    result = generate(backend, PROMPTS, strategy=recipe, max_new_tokens=32)
    assert any(record["redrawn"] for (record,) in result.actions)  # the gate opened
    for (record,), n in zip(result.actions, result.trace.lengths, strict=True):
        for redraw in record["redrawn"]:
            assert redraw["scores"][redraw["kept"]] == max(redraw["scores"])
            assert redraw["momentum"] - redraw["scores"][0] > -math.log(0.95)
        redrawn, n = len(record["redrawn"]), int(n)  # each redraw: at most 3 x 6 tokens
        assert n < record["tokens"] <= n + 3 * 6 * redrawn if redrawn else record["tokens"] == n
    assert result.tokens_generated == sum(r["tokens"] for (r,) in result.actions)
    never = {**recipe, "action": {**recipe["action"], "scaling_rate": 1e-9}}  # the control
    steady = generate(backend, PROMPTS, strategy=never, max_new_tokens=32)
    for (record,), n in zip(steady.actions, steady.trace.lengths, strict=True):
        assert record["redrawn"] == [] and record["tokens"] == int(n)


def test_step_redraw_with_a_probe_keeps_the_draw_it_finds_least_likely_wrong(embedded):
    """The probe reads the mean entropy, which the recipe does not list: it is recorded
    all the same, and each redrawn step keeps the draw of least p(wrong)."""
    from tokur_decode.core.probe import Probe

    probe = Probe(("entropy:mean",), (1.0,), (1.0,), (1.5,), 0.0)
    action = {"type": "step-redraw", "n": 3, "step_tokens": 6, "scaling_rate": 0.95}
    recipe = {
        "name": "redraw-probe-test",
        "signals": ["chosen_prob"],
        "action": {**action, "probe": probe.to_dict()},
    }
    result = generate(HFBackend(*embedded), PROMPTS, strategy=recipe, max_new_tokens=32)
    assert "entropy" in result.trace.signals
    redraws = [redraw for (record,) in result.actions for redraw in record["redrawn"]]
    assert redraws  # the gate opened
    for redraw in redraws:
        wrong = redraw["p_wrong"]
        assert len(wrong) == 3 and all(0 < w < 1 for w in wrong)
        assert redraw["kept"] == wrong.index(min(wrong))
