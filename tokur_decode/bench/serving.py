"""What traces cost a server: bytes per response and generated tokens per second at
several concurrencies, for plain requests, vLLM's own ``logprobs=5``, JSON traces and
packed traces, against one running ``tokur-decode serve``, in one run.

Every request is a ``/v1/completions`` of ``max_tokens`` tokens (greedy, ``ignore_eos``);
at each concurrency the cases run in turn, ``requests`` requests each, from that many
client threads.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["CASES", "PayloadTiming", "serving_cost"]

#: Each case: what its requests add to a plain completion request.
CASES: dict[str, dict] = {
    "plain": {},
    "vLLM logprobs=5": {"logprobs": 5},
    "JSON traces (all signals)": {"vllm_xargs": {"tokur_signals": "all"}},
    "packed traces (all signals)": {
        "vllm_xargs": {"tokur_signals": "all", "tokur_format": "packed"}
    },
}


@dataclass
class PayloadTiming:
    case: str
    concurrency: int
    tokens_per_s: float
    bytes_per_response: float


def serving_cost(
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    concurrency: tuple[int, ...] = (1, 16, 64),
    requests: int = 64,
    max_tokens: int = 64,
) -> list[PayloadTiming]:
    """Time every case at every concurrency (see the module docstring)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    out = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as client:

        def one(i: int, extra: dict) -> tuple[int, int]:
            prompt = f"Question {i}: name a city and say why it is known."
            resp = client.post("/v1/completions", json={**body, "prompt": prompt, **extra})
            resp.raise_for_status()
            return resp.json()["usage"]["completion_tokens"], len(resp.content)

        for extra in CASES.values():  # warm-up: every path once
            one(0, extra)
        for n in concurrency:
            for case, extra in CASES.items():
                start = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    done = list(pool.map(lambda i, e=extra: one(i, e), range(requests)))
                seconds = time.perf_counter() - start
                tokens = sum(t for t, _ in done)
                size = sum(b for _, b in done) / len(done)
                out.append(PayloadTiming(case, n, tokens / seconds, size))
    return out
