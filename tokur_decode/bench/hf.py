"""Benchmarks that report ratios against a baseline measured in the same run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from ..core.text import encode_prompts
from ..hf.backend import sampling_kwargs
from ..hf.monitor import UncertaintyMonitor
from ..hf.tokur import perturbed

__all__ = [
    "ActionCost",
    "OverheadResult",
    "TokurCostResult",
    "actions_cost",
    "monitor_overhead",
    "tokur_cost",
]

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
    def median_baseline(self) -> float:
        """Median seconds per token of plain ``generate``."""
        return statistics.median(self.baseline)

    @property
    def median_monitored(self) -> float:
        """Median seconds per token with the monitor."""
        return statistics.median(self.monitored)

    @property
    def step_ratio(self) -> float:
        """``1 + monitor cost per step / median plain time per token``: the overhead with
        the machine's run-to-run noise taken out."""
        return 1.0 + self.monitor_step / self.median_baseline


def monitor_overhead(
    model,
    tokenizer,
    *,
    signals="all",
    batch_size: int = 1,
    max_new_tokens: int = 32,
    repeats: int = 15,
    **recorded,
) -> OverheadResult:
    """Time ``model.generate`` with the monitor (``signals``, and what ``recorded``
    asks for: :class:`~tokur_decode.core.recording.Recording`'s fields) against plain
    ``generate``.

    Both runs decode greedily exactly ``max_new_tokens`` tokens (``min_new_tokens`` is
    set for both) on the same prompts; the order of the pair alternates between
    repetitions, and one warm-up pair is discarded.
    """
    timer = _GenerateTimer(model, tokenizer, batch_size, max_new_tokens)
    monitor = UncertaintyMonitor(
        signals, eos_token_id=model.generation_config.eos_token_id, **recorded
    )

    def timed(with_monitor: bool) -> float:
        return timer(logits_processor=[monitor] if with_monitor else None)

    timed(False), timed(True)  # warm-up
    baseline, monitored = [], []
    for rep in range(repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)
        times = {flag: timed(flag) for flag in order}
        baseline.append(times[False])
        monitored.append(times[True])
    step = _monitor_step_seconds(
        monitor, timer.enc["input_ids"], model.config.vocab_size, model.device
    )
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


class _GenerateTimer:
    """Seconds per token of greedy ``generate`` of exactly ``max_new_tokens`` tokens on
    ``batch_size`` fixed prompts."""

    def __init__(self, model, tokenizer, batch_size: int, max_new_tokens: int) -> None:
        prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(batch_size)]
        self.model = model
        self.enc = encode_prompts(tokenizer, prompts, device=model.device)
        self.tokens = max_new_tokens
        self.common = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling_kwargs(0.0),
        )

    def __call__(self, **kwargs) -> float:
        cuda = self.model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(**self.enc, **self.common, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / self.tokens


@dataclass
class TokurCostResult:
    """Median seconds per token and peak extra memory (bytes) of each way of decoding."""

    seconds: dict[str, float]
    peak_bytes: dict[str, int]
    samples: int
    batch_size: int
    memory_kind: str

    @property
    def ratios(self) -> dict[str, float]:
        """Seconds per token over plain greedy's."""
        return {k: v / self.seconds["plain"] for k, v in self.seconds.items()}


def tokur_cost(
    model,
    tokenizer,
    *,
    samples: int = 10,
    batch_size: int = 1,
    max_new_tokens: int = 16,
    repeats: int = 3,
    sequential: bool = True,
) -> TokurCostResult:
    """Time greedy decoding without TokUR (``plain``), with ``samples`` TokUR samples in
    one forward per step (``batched``) and (unless ``sequential=False``) as ``samples``
    passes per step (``sequential``, the official implementation's cost), interleaved
    over ``repeats`` rounds after a warm-up round; and the peak memory each adds (CUDA:
    allocator peak; CPU: peak resident-set growth, sampled every millisecond)."""
    timer = _GenerateTimer(model, tokenizer, batch_size, max_new_tokens)
    eos = model.generation_config.eos_token_id

    def run(mode: str | None) -> tuple[float, int]:
        if mode is None:
            return _with_peak_memory(model.device, timer)
        with perturbed(model, samples=samples, mode=mode) as pm:
            monitor = pm.processor(["tokur"], eos_token_id=eos)
            return _with_peak_memory(model.device, lambda: timer(logits_processor=[monitor]))

    modes = {"plain": None, "batched": "batched"} | (
        {"sequential": "sequential"} if sequential else {}
    )
    times: dict[str, list[float]] = {k: [] for k in modes}
    peaks: dict[str, int] = dict.fromkeys(modes, 0)
    for rnd in range(repeats + 1):
        for name, mode in modes.items():
            seconds, peak = run(mode)
            if rnd:  # round 0 warms up (and computes or loads the SVD bases)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
    kind = "cuda allocator peak" if model.device.type == "cuda" else "peak RSS growth"
    return TokurCostResult(
        {k: statistics.median(v) for k, v in times.items()}, peaks, samples, batch_size, kind
    )


def _with_peak_memory(device: torch.device, fn) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        return result, torch.cuda.max_memory_allocated(device) - start
    with _RssSampler() as sampler:
        result = fn()
    return result, sampler.peak - sampler.start


class _RssSampler(contextlib.AbstractContextManager):
    """Peak resident set size of this process while the block runs (Linux /proc).

    Freed heap memory is first returned to the OS (glibc ``malloc_trim``), so that the
    growth measured is what the block itself needs, not what earlier runs left cached.
    """

    def __enter__(self):
        _malloc_trim()
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth may undercount
        pass


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no sampling
        return 0


#: Questions with short known answers for ``bench actions`` (accepted spellings).
BENCH_QA = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Australia?", ("canberra",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is 17 + 25?", ("42",)),
    ("What is 9 times 8?", ("72",)),
    ("What is the chemical symbol for gold?", ("au",)),
)


@dataclass
class ActionCost:
    """One strategy on :data:`BENCH_QA`: wall time, tokens the model decoded (every
    candidate, branch and taken-back token) and answers that mention the right one,
    with time and tokens as ratios to a plain greedy run right before it."""

    strategy: str
    seconds: float
    tokens: int
    correct: int
    questions: int
    time_ratio: float
    token_ratio: float


def actions_cost(
    model, tokenizer, strategies, *, max_new_tokens: int = 32, seed: int = 0, qa=BENCH_QA
) -> list[ActionCost]:
    """Run each strategy (recipe name or object) on the questions of ``qa``, batched,
    right after a run of plain greedy decoding (its own baseline, adjacent in time); a
    warm-up run comes first. The first row is greedy itself (median of its runs).

    A response counts as correct when it mentions an accepted answer as a whole word; a
    coarse check, enough to see whether a strategy changes answers.
    """
    from ..hf.generation import generate

    questions = [q for q, _ in qa]

    def run(strategy) -> tuple[float, int, int]:
        start = time.perf_counter()
        result = generate(
            model, tokenizer, questions, strategy=strategy, max_new_tokens=max_new_tokens, seed=seed
        )
        seconds = time.perf_counter() - start
        correct = sum(
            any(re.search(rf"\b{re.escape(a)}\b", text.lower()) for a in accepted)
            for text, (_, accepted) in zip(result.texts, qa, strict=True)
        )
        return seconds, result.tokens_generated, correct

    run(None)  # warm-up
    rows, base_times = [], []
    for strategy in strategies:
        base = run(None)
        seconds, tokens, correct = run(strategy)
        base_times.append(base[0])
        rows.append(
            ActionCost(
                strategy=str(getattr(strategy, "name", strategy)),
                seconds=seconds,
                tokens=tokens,
                correct=correct,
                questions=len(qa),
                time_ratio=seconds / base[0],
                token_ratio=tokens / base[1],
            )
        )
    greedy = ActionCost("greedy", statistics.median(base_times), base[1], base[2], len(qa), 1, 1)
    return [greedy, *rows]
