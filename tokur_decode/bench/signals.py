"""The signal pass alone: compiled and op by op, against one ``torch.log_softmax`` over the
same logits, timed in the same run.

Each step is what a logits processor does per decoding step with every single-pass
signal (the 11 outputs): the read of the logits with the top-20 and a kept copy
(:func:`~tokur_decode.core.logit_stats.read_logits` through
:meth:`~tokur_decode.core.signals.SignalSpec.compute`), the signals, and the chosen-token
signals from the kept copy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core import logit_stats
from ..core.signals import CHOSEN_SIGNALS, SIGNALS, SignalSpec, Workspace, chosen_signals

__all__ = ["PassTiming", "signal_pass_cost"]


@dataclass
class PassTiming:
    """Median milliseconds per step at one shape, and the ratios to ``log_softmax``."""

    rows: int
    vocab: int
    log_softmax_ms: float
    compiled_ms: float
    op_by_op_ms: float

    @property
    def compiled_ratio(self) -> float:
        return self.compiled_ms / self.log_softmax_ms

    @property
    def op_by_op_ratio(self) -> float:
        return self.op_by_op_ms / self.log_softmax_ms


def signal_pass_cost(
    rows: Sequence[int] = (1, 8, 64, 256),
    vocabs: Sequence[int] = (49152, 151936),
    *,
    device: str = "cpu",
    repeats: int = 30,
) -> list[PassTiming]:
    """Time the three at every shape, interleaved (``repeats`` rounds after a warm-up
    round that also compiles), on logits of scale 3 (a language model's spread)."""
    dev = torch.device(device)
    return [_timed(n, vocab, dev, repeats) for vocab in vocabs for n in rows]


def _timed(rows: int, vocab: int, device: torch.device, repeats: int) -> PassTiming:
    spec = SignalSpec([n for n in SIGNALS if n not in CHOSEN_SIGNALS])
    chosen = tuple(sorted(CHOSEN_SIGNALS))
    gen = torch.Generator(device=device).manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen, device=device) * 3
    tokens = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    workspace = Workspace()

    def step(compiled: bool) -> None:
        logit_stats.compilation.enabled = compiled
        _, read = spec.compute(logits, top=20, keep=True, workspace=workspace)
        chosen_signals(read, tokens, chosen)

    candidates: dict[str, Callable[[], object]] = {
        "log_softmax": lambda: torch.log_softmax(logits, dim=-1),
        "compiled": lambda: step(True),
        "op_by_op": lambda: step(False),
    }
    was = logit_stats.compilation.enabled
    try:
        times = _interleaved(candidates, repeats, device)
    finally:
        logit_stats.compilation.enabled = was
    return PassTiming(rows, vocab, times["log_softmax"], times["compiled"], times["op_by_op"])


def _interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds of each candidate, run in turn ``repeats`` times after one
    warm-up round."""
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for name, fn in candidates.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                if round_:
                    runs[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times) for name, times in runs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
