"""``tokur-decode bench vllm-tokur``: what TokUR's samples cost inside vLLM.

Three engines live side by side for the whole run (starts excluded from the timings): a
plain one (vLLM's own model class), a TokUR one in batched mode (the ``M - 1``
perturbed samples as extra rows of one forward) and a TokUR one in sequential mode
(``M`` decoder passes per step, the reference). At each batch size the same prompts are
timed (greedy, ``ignore_eos`` so every request decodes exactly ``max_tokens``) in
rotating order: plain; each TokUR engine with nobody asking, every other request asking
and every request asking. Next to them, the transformers path's cost at the same batch
(:func:`tokur_decode.bench.hf.tokur_cost`: TokUR in one forward over plain greedy).

Reported per batch size: median generated tokens/s of each run, each TokUR run's cost
(plain throughput over its throughput: ``M`` for running every sample as a full pass),
the batched mode's speed-up over M passes, and its cost over the transformers path's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .vllm import bound_kv_cache, chat_texts, timed_rounds

__all__ = ["TokurBenchResult", "tokur_overhead"]

#: Who asks for TokUR in a run: nobody, every other request, everybody.
ASKING = ("none", "half", "all")


@dataclass
class TokurBenchResult:
    """Median throughputs (generated tokens per second) per batch size and run
    (``"plain"``, ``"batched/none"``, ..., ``"sequential/all"``), and the transformers
    path's cost ratio per batch size."""

    max_tokens: int
    rounds: int
    samples: int
    dtype: str
    tps: dict[int, dict[str, float]] = field(default_factory=dict)
    hf_cost: dict[int, float] = field(default_factory=dict)

    def cost(self, batch: int, run: str) -> float:
        """Plain throughput over the run's (1.0: free; ``M``: a full pass per sample)."""
        return self.tps[batch]["plain"] / self.tps[batch][run]

    def speedup(self, batch: int, asking: str = "all") -> float:
        """Batched mode's throughput over the M passes'."""
        return self.tps[batch][f"batched/{asking}"] / self.tps[batch][f"sequential/{asking}"]

    def vs_transformers(self, batch: int) -> float:
        """Batched mode's cost (everybody asking) over the transformers path's."""
        return self.cost(batch, "batched/all") / self.hf_cost[batch]


def _params(prompts: int, max_tokens: int, asking: str):
    from vllm import SamplingParams

    from ..vllm.args import uncertainty_args

    base = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    off = SamplingParams(**base)
    on = SamplingParams(**base, extra_args=uncertainty_args(["tokur"]))
    pick = {"none": lambda i: off, "half": lambda i: on if i % 2 == 0 else off}
    return [pick.get(asking, lambda i: on)(i) for i in range(prompts)]


def tokur_overhead(
    model: str | None = None,
    *,
    batch_sizes=(1, 4, 16),
    max_tokens: int = 16,
    rounds: int = 3,
    samples: int = 10,
    dtype: str = "bfloat16",
    transformers: bool = True,
    on_batch=None,
    **engine_kwargs,
) -> TokurBenchResult:
    """Run the benchmark (see the module doc) with the model in ``dtype`` on every
    engine and in transformers; ``engine_kwargs`` go to every engine. ``on_batch(result,
    batch)`` is called as each batch size is done (progress).

    Example:
        >>> r = tokur_overhead(batch_sizes=(1, 4), max_tokens=16)         # doctest: +SKIP
        >>> round(r.speedup(1), 1)                                       # doctest: +SKIP
        4.2
    """
    from vllm import LLM

    from ..vllm.client import llm, shutdown
    from ..vllm.tokur import tokur_engine_args

    if model is None:
        from ..models import default_model_path

        model = str(default_model_path())
    kwargs = {
        "enforce_eager": True,
        "max_model_len": 1024,
        "seed": 0,
        "dtype": dtype,
        **engine_kwargs,
    }
    bound_kv_cache()
    engines = {
        "plain": LLM(model=model, **kwargs),
        "batched": llm(model, **tokur_engine_args(samples=samples, mode="batched", **kwargs)),
        "sequential": llm(model, **tokur_engine_args(samples=samples, mode="sequential", **kwargs)),
    }
    result = TokurBenchResult(max_tokens, rounds, samples, dtype)
    hf = None
    if transformers:
        from ..models import load_model

        hf = load_model(model, dtype=dtype)
    try:
        for batch in batch_sizes:
            texts = chat_texts(engines["plain"].get_tokenizer(), batch)
            runs = {"plain": (engines["plain"], _params(batch, max_tokens, "none"))}
            for mode in ("batched", "sequential"):
                for asking in ASKING:
                    runs[f"{mode}/{asking}"] = (engines[mode], _params(batch, max_tokens, asking))
            per_run = timed_rounds(runs, texts, rounds, max_tokens, traces_on=engines["batched"])
            engines["sequential"].collective_rpc("tokur_collect", args=(None,))
            result.tps[batch] = {name: statistics.median(v) for name, v in per_run.items()}
            if hf is not None:
                from .hf import tokur_cost

                cost = tokur_cost(
                    *hf,
                    samples=samples,
                    batch_size=batch,
                    max_new_tokens=max_tokens,
                    repeats=rounds,
                    sequential=False,
                )
                result.hf_cost[batch] = cost.ratios["batched"]
            if on_batch is not None:
                on_batch(result, batch)
    finally:
        for engine in engines.values():
            shutdown(engine)
    return result
