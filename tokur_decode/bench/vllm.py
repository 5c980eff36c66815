"""``tokur-decode bench vllm``: the processor's cost inside vLLM.

Two engines live side by side for the whole run (starts excluded from the timings): a
plain one and one with :class:`~tokur_decode.vllm.UncertaintyProcessor` registered.
Each round times the same prompts (greedy, ``ignore_eos`` so that every request decodes
exactly ``max_tokens``) four ways, in rotating order: plain engine; processor attached
but no request opted in; every request opted in with every signal; every request opted
in with entropy and LogTokU (the usage example's signals). Reported: median tokens/s of
each and the ratios to plain. Each timed run starts once the other engine has gone
idle (:data:`SETTLE_S`).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

__all__ = [
    "SETTLE_S",
    "VllmBenchResult",
    "bound_kv_cache",
    "chat_texts",
    "timed_rounds",
    "vllm_overhead",
]

_QUESTIONS = [
    "What is the capital of France?",
    "Who won the 1937 Tour de France?",
    "What is 17 + 25?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "Who wrote Hamlet?",
    "What is the largest planet in the solar system?",
    "Why is the sky blue?",
]


#: Seconds to wait before each timed run: an engine's workers keep busy-polling their
#: message queue for a second after their last step (vLLM's shm broadcast), which on a
#: small CPU takes a core from the engine timed next.
SETTLE_S = 1.5


def bound_kv_cache(gib: int = 2) -> None:
    """Two engines side by side: on the CPU platform each reserves ``gib`` GiB of KV
    cache (``VLLM_CPU_KVCACHE_SPACE``) unless the caller set it; vLLM's default reserves
    most of the memory, and the second engine would not start."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gib))


def chat_texts(tokenizer, prompts: int) -> list[str]:
    """``prompts`` chat-formatted questions (the bench's eight in turn)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": _QUESTIONS[i % len(_QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(prompts)
    ]


def timed_rounds(runs: dict, texts, rounds: int, max_tokens: int, traces_on) -> dict:
    """Tokens/s of every timed run per case. ``runs``: case -> (engine, SamplingParams or
    one per text). Each case is warmed up once, then ``rounds`` rounds time every case
    in rotating order, each run after :data:`SETTLE_S`; every request must decode
    ``max_tokens`` tokens. The traces on engine ``traces_on`` are dropped each round."""
    for engine, params in runs.values():
        warm = params[:4] if isinstance(params, list) else params
        engine.generate(texts[:4], warm, use_tqdm=False)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            engine, params = runs[name]
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            outs = engine.generate(texts, params, use_tqdm=False)
            times[name].append(time.perf_counter() - start)
            if sum(len(o.outputs[0].token_ids) for o in outs) != len(texts) * max_tokens:
                raise RuntimeError(f"{name}: a request stopped before max_tokens")
        traces_on.collective_rpc("tokur_collect", args=(None,))
    return {name: [len(texts) * max_tokens / t for t in ts] for name, ts in times.items()}


@dataclass
class VllmBenchResult:
    """Median throughputs (generated tokens per second) and ratios to the plain engine."""

    prompts: int
    max_tokens: int
    rounds: int
    plain_tps: float
    attached_tps: float
    monitored_tps: float
    typical_tps: float
    #: Every timed run's tokens/s per case ("plain", "attached", "monitored", "typical"):
    #: single runs on a small shared CPU scatter by +-20%.
    runs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def attached_ratio(self) -> float:
        return self.attached_tps / self.plain_tps

    @property
    def monitored_ratio(self) -> float:
        return self.monitored_tps / self.plain_tps

    @property
    def typical_ratio(self) -> float:
        return self.typical_tps / self.plain_tps

    @property
    def same_engine_ratios(self) -> tuple[float, float]:
        """All signals and entropy + LogTokU over "attached, none opted in": the
        processor's cost without the difference between two engines."""
        return self.monitored_tps / self.attached_tps, self.typical_tps / self.attached_tps


def vllm_overhead(
    model: str | None = None,
    *,
    prompts: int = 64,
    max_tokens: int = 64,
    rounds: int = 5,
    **engine_kwargs,
) -> VllmBenchResult:
    """Run the benchmark (see the module doc); ``engine_kwargs`` go to both engines (give
    ``dtype``: the plain engine's default is vLLM's, ours float32 on a CPU).

    Example:
        >>> r = vllm_overhead(prompts=64, max_tokens=32)        # doctest: +SKIP
        >>> round(r.monitored_ratio, 2)                         # doctest: +SKIP
        0.97
    """
    from vllm import LLM, SamplingParams

    from ..vllm.args import uncertainty_args
    from ..vllm.client import llm, shutdown

    if model is None:
        from ..models import default_model_path

        model = str(default_model_path())
    kwargs = {"enforce_eager": True, "max_model_len": 1024, "seed": 0, **engine_kwargs}
    bound_kv_cache()
    plain = LLM(model=model, **kwargs)
    ours = llm(model, **kwargs)
    texts = chat_texts(plain.get_tokenizer(), prompts)
    base = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    off = SamplingParams(**base)
    on = SamplingParams(**base, extra_args=uncertainty_args("all"))
    typical = SamplingParams(**base, extra_args=uncertainty_args(["entropy", "logtoku"]))
    runs = {
        "plain": (plain, off),
        "attached": (ours, off),
        "monitored": (ours, on),
        "typical": (ours, typical),
    }
    runs_tps = timed_rounds(runs, texts, rounds, max_tokens, traces_on=ours)
    tps = {name: statistics.median(values) for name, values in runs_tps.items()}
    for engine in (plain, ours):
        shutdown(engine)
    return VllmBenchResult(
        prompts,
        max_tokens,
        rounds,
        tps["plain"],
        tps["attached"],
        tps["monitored"],
        tps["typical"],
        runs_tps,
    )
