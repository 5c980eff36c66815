"""Benchmarks that report ratios against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .hf.generation import encode_prompts
from .hf.monitor import UncertaintyMonitor

__all__ = ["OverheadResult", "monitor_overhead"]

BENCH_PROMPTS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 17 + 25?",
    "Name a primary colour.",
)


@dataclass
class OverheadResult:
    """Seconds per generated token with and without the monitor, per repetition."""

    baseline: list[float]
    monitored: list[float]
    tokens_per_run: int
    batch_size: int
    signals: tuple[str, ...]

    @property
    def ratios(self) -> list[float]:
        """Per repetition, monitored / baseline (the two runs are adjacent in time)."""
        return [m / b for m, b in zip(self.monitored, self.baseline, strict=True)]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)


def monitor_overhead(
    model,
    tokenizer,
    *,
    signals="all",
    batch_size: int = 1,
    max_new_tokens: int = 64,
    repeats: int = 7,
) -> OverheadResult:
    """Time ``model.generate`` with the monitor (``signals``) against plain ``generate``.

    Both runs decode greedily exactly ``max_new_tokens`` tokens (``min_new_tokens`` is
    set for both) on the same prompts; the order of the pair alternates between
    repetitions, and one warm-up pair is discarded.
    """
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(batch_size)]
    enc = encode_prompts(tokenizer, prompts, device=model.device)
    common = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    eos = model.generation_config.eos_token_id
    monitor = UncertaintyMonitor(signals, eos_token_id=eos)

    def timed(with_monitor: bool) -> float:
        kwargs = {"logits_processor": [monitor]} if with_monitor else {}
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, **common, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / max_new_tokens

    timed(False), timed(True)  # warm-up
    baseline, monitored = [], []
    for rep in range(repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)
        times = {flag: timed(flag) for flag in order}
        baseline.append(times[False])
        monitored.append(times[True])
    return OverheadResult(
        baseline, monitored, max_new_tokens, batch_size, monitor.spec.output_names
    )
