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
    """Seconds per generated token with and without the monitor, per repetition, and
    the monitor's own cost per step (timed alone on logits of the model's shape)."""

    baseline: list[float]
    monitored: list[float]
    monitor_step: float
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

    @property
    def step_ratio(self) -> float:
        """``1 + monitor cost per step / median plain time per token``: the overhead with
        the machine's run-to-run noise taken out."""
        return 1.0 + self.monitor_step / statistics.median(self.baseline)


def monitor_overhead(
    model,
    tokenizer,
    *,
    signals="all",
    batch_size: int = 1,
    max_new_tokens: int = 32,
    repeats: int = 15,
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
    step = _monitor_step_seconds(monitor, enc["input_ids"], model.config.vocab_size, model.device)
    return OverheadResult(
        baseline, monitored, step, max_new_tokens, batch_size, monitor.spec.output_names
    )


def _monitor_step_seconds(monitor, prompt_ids, vocab_size: int, device, steps: int = 200) -> float:
    """Median seconds of one monitor call (signals + trace write) over ``steps`` steps."""
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(prompt_ids.shape[0], vocab_size, generator=gen, device=device) * 3
    ids = prompt_ids
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            monitor(ids, scores)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            ids = torch.cat([ids, ids[:, -1:]], dim=1)
    return statistics.median(times[10:])
