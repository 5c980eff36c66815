"""``tokur-decode bench vllm-tokur``: what TokUR's samples cost inside vLLM.

Two engines live side by side for the whole run (starts excluded from the timings): a
plain one (vLLM's own model class) and a TokUR one (:func:`~tokur_decode.vllm.
tokur_engine_args`, ``M`` samples). Each round times the same prompts (greedy,
``ignore_eos`` so every request decodes exactly ``max_tokens``) four ways, in rotating
order:

* ``plain``: the plain engine;
* ``attached``: the TokUR engine, no request asks (one pass per step: what requests
  that do not ask pay);
* ``tokur``: the TokUR engine, every request asks for ``"tokur"``;
* ``mixed``: the TokUR engine, every other request asks.

Reported: median generated tokens/s of each, their ratios to plain, and the ratio of
``tokur`` to ``plain / M``, the throughput of running the ``M`` samples as ``M``
sequential generations (what the official implementation does).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .vllm import bound_kv_cache, chat_texts, timed_rounds

__all__ = ["TokurBenchResult", "tokur_overhead"]


@dataclass
class TokurBenchResult:
    """Median throughputs (generated tokens per second)."""

    prompts: int
    max_tokens: int
    rounds: int
    samples: int
    plain_tps: float
    attached_tps: float
    tokur_tps: float
    mixed_tps: float

    @property
    def ratios(self) -> dict[str, float]:
        """Each throughput over plain, and TokUR over ``M`` sequential generations."""
        return {
            "attached": self.attached_tps / self.plain_tps,
            "tokur": self.tokur_tps / self.plain_tps,
            "mixed": self.mixed_tps / self.plain_tps,
            "tokur_vs_sequential": self.tokur_tps / (self.plain_tps / self.samples),
        }


def tokur_overhead(
    model: str | None = None,
    *,
    prompts: int = 16,
    max_tokens: int = 32,
    rounds: int = 3,
    samples: int = 10,
    **engine_kwargs,
) -> TokurBenchResult:
    """Run the benchmark (see the module doc); ``engine_kwargs`` go to both engines.

    Example:
        >>> r = tokur_overhead(prompts=16, max_tokens=32, samples=10)     # doctest: +SKIP
        >>> round(r.ratios["tokur"], 2)                                  # doctest: +SKIP
        0.12
    """
    from vllm import LLM, SamplingParams

    from ..vllm.args import uncertainty_args
    from ..vllm.client import llm
    from ..vllm.tokur import tokur_engine_args

    if model is None:
        from ..models import default_model_path

        model = str(default_model_path())
    kwargs = {"enforce_eager": True, "max_model_len": 1024, "seed": 0, **engine_kwargs}
    bound_kv_cache()
    plain = LLM(model=model, **kwargs)
    ours = llm(model, **tokur_engine_args(samples=samples, **kwargs))
    texts = chat_texts(plain.get_tokenizer(), prompts)
    base = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    off = SamplingParams(**base)
    on = SamplingParams(**base, extra_args=uncertainty_args(["tokur"]))
    runs = {
        "plain": (plain, [off] * prompts),
        "attached": (ours, [off] * prompts),
        "tokur": (ours, [on] * prompts),
        "mixed": (ours, [on, off] * (prompts // 2) + [on] * (prompts % 2)),
    }
    runs_tps = timed_rounds(runs, texts, rounds, max_tokens, traces_on=ours)
    tps = {name: statistics.median(values) for name, values in runs_tps.items()}
    for engine in (plain, ours):
        engine.llm_engine.engine_core.shutdown()
    return TokurBenchResult(
        prompts,
        max_tokens,
        rounds,
        samples,
        tps["plain"],
        tps["attached"],
        tps["tokur"],
        tps["mixed"],
    )
