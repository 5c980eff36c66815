"""The vLLM benchmarks' timing loop, with stand-in engines (no vLLM needed): rotation,
warm-up, the settle pause, throughput arithmetic and the check that every request ran
to ``max_tokens``."""

from __future__ import annotations

import types

import pytest

from tokur_decode.bench import vllm as bench


class _Engine:
    """Records what it was asked; 'decodes' ``tokens`` per prompt, taking ``seconds``."""

    def __init__(self, name, clock, seconds, tokens=4):
        self.name, self.clock, self.seconds, self.tokens = name, clock, seconds, tokens
        self.calls, self.collected = [], 0

    def generate(self, texts, params, use_tqdm=True):
        self.calls.append((len(texts), params))
        self.clock.log.append(params[0] if isinstance(params, list) else params)
        self.clock.now += self.seconds
        completion = types.SimpleNamespace(token_ids=[0] * self.tokens)
        return [types.SimpleNamespace(outputs=[completion]) for _ in texts]

    def collective_rpc(self, method, args=()):
        assert method == "tokur_collect" and args == (None,)
        self.collected += 1


@pytest.fixture
def clock(monkeypatch):
    clock = types.SimpleNamespace(now=0.0, slept=[], log=[])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock.now)
    monkeypatch.setattr(bench.time, "sleep", clock.slept.append)
    return clock


def test_timed_rounds_rotates_warms_up_settles_and_counts(clock):
    fast, slow = _Engine("fast", clock, 1.0), _Engine("slow", clock, 2.0)
    runs = {"a": (fast, "pa"), "b": (slow, ["pb"] * 8), "c": (fast, "pc")}
    tps = bench.timed_rounds(runs, ["q"] * 8, rounds=3, max_tokens=4, traces_on=fast)
    assert tps == {"a": [32.0] * 3, "b": [16.0] * 3, "c": [32.0] * 3}  # 8 x 4 tokens / s
    # warm-up on 4 prompts (per-request params sliced), then 3 rotated rounds of 8 prompts
    assert fast.calls[0] == (4, "pa") and slow.calls[0] == (4, ["pb"] * 4)
    rotated = ["pa", "pb", "pc", "pb", "pc", "pa", "pc", "pa", "pb"]
    assert clock.log == ["pa", "pb", "pc", *rotated]
    assert clock.slept == [bench.SETTLE_S] * 9  # before every timed run
    assert fast.collected == 3


def test_timed_rounds_refuses_a_request_that_stopped_early(clock):
    short = _Engine("short", clock, 1.0, tokens=3)
    with pytest.raises(RuntimeError, match="stopped before max_tokens"):
        bench.timed_rounds({"x": (short, "p")}, ["q"] * 2, 1, max_tokens=4, traces_on=short)


def test_bound_kv_cache_keeps_an_explicit_setting(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    bench.bound_kv_cache()
    assert bench.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    bench.bound_kv_cache()
    assert bench.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "5"


def test_tokur_bench_arithmetic_and_report(monkeypatch, capsys):
    from tokur_decode.bench import vllm_tokur
    from tokur_decode.cli import main

    tps = {"plain": 60.0, "batched/none": 59.0, "batched/half": 30.0, "batched/all": 20.0}
    tps |= {"sequential/none": 58.0, "sequential/half": 9.0, "sequential/all": 6.0}
    result = vllm_tokur.TokurBenchResult(16, 3, 10, "bfloat16", {1: tps}, {1: 2.5})
    assert result.cost(1, "batched/all") == pytest.approx(3.0)
    assert result.speedup(1) == pytest.approx(20 / 6)
    assert result.vs_transformers(1) == pytest.approx(3.0 / 2.5)

    def fake(*args, on_batch=None, **kwargs):
        on_batch(result, 1)
        return result

    monkeypatch.setattr(vllm_tokur, "tokur_overhead", fake)
    assert main(["bench", "vllm-tokur", "--batch-sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert "batched over M passes (all ask): 3.33x faster" in out and "(1.20x of it)" in out
    assert main(["bench", "vllm-tokur", "--batch-sizes", "0"]) == 2
    assert (
        "argument --batch-sizes: comma-separated integers >= 1, got '0'" in capsys.readouterr().err
    )
