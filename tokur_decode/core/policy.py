"""Triggers: when a token-level signal says "act now", per row, as device tensors.

A :class:`Trigger` reads one signal output (e.g. ``"logtoku_epistemic"``), optionally
averaged over a moving window of the last ``window`` steps (DeepConf's group
confidence), and fires for a row once the value has been above (or below) the
threshold for ``patience`` consecutive steps, not before the row has ``min_tokens``
tokens. Thresholds are fixed, or calibrated from scores (:meth:`Trigger.calibrated`)
or from warm-up traces (:func:`calibrate_from_traces`, DeepConf-style percentiles).

:class:`TriggerState` evaluates a trigger step by step for a batch: pure tensor code,
no host synchronisation.

Example:
    >>> import torch
    >>> trig = Trigger("entropy", threshold=1.0, patience=2)
    >>> state = TriggerState(trig, batch_size=2, device="cpu")
    >>> steps = [[2.0, 0.5], [3.0, 2.0]]
    >>> [state.update(torch.tensor(v), step).tolist() for step, v in enumerate(steps)]
    [[False, False], [True, False]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .signals import signal_of_output

__all__ = ["Trigger", "TriggerState", "calibrate_from_traces"]


@dataclass(frozen=True)
class Trigger:
    """A per-row condition on one signal output.

    Args:
        signal: an output key, e.g. ``"entropy"``, ``"logtoku_epistemic"``, ``"deepconf"``.
        threshold: the value to cross; ``None`` until calibrated.
        direction: ``"above"`` (fire when value > threshold) or ``"below"``.
        patience: consecutive crossing steps needed (>= 1).
        min_tokens: never fire before the row has generated this many tokens.
        window: compare the mean of the last ``window`` steps (1: the step's own value).

    Raises:
        ValueError: naming the parameter.
    """

    signal: str
    threshold: float | None = None
    direction: str = "above"
    patience: int = 1
    min_tokens: int = 0
    window: int = 1

    def __post_init__(self) -> None:
        signal_of_output(self.signal)
        if self.threshold is not None and not (
            isinstance(self.threshold, int | float) and math.isfinite(self.threshold)
        ):
            raise ValueError(f"threshold must be a finite number or None, got {self.threshold!r}")
        if self.direction not in ("above", "below"):
            raise ValueError(f"direction must be 'above' or 'below', got {self.direction!r}")
        for name, low in (("patience", 1), ("min_tokens", 0), ("window", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def calibrated(self, scores: Sequence[float], percentile: float) -> Trigger:
        """A copy whose threshold is the ``percentile`` (0-100) of ``scores``.

        Example:
            >>> Trigger("deepconf", direction="below").calibrated([1, 2, 3, 4, 5], 10).threshold
            1.4
        """
        values = np.asarray(list(scores), dtype=np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError("scores: need at least one finite score to calibrate")
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        return replace(self, threshold=float(np.percentile(values, percentile)))


def calibrate_from_traces(
    trigger: Trigger, traces, percentile: float, reducer: str = "deepconf_lowest_group", **params
) -> Trigger:
    """Calibrate ``trigger`` from warm-up traces: the ``percentile`` of each trace's
    ``reducer`` statistic of ``trigger.signal`` (DeepConf: lowest group confidence,
    ``window`` = the trigger's window; a step reducer such as ``step_mean_max`` reads
    the traces' steps, :meth:`~tokur_decode.core.trace.Trace.aggregate`).

    ``traces``: one :class:`~tokur_decode.core.trace.Trace` or several.
    """
    traces = [traces] if hasattr(traces, "signals") else list(traces)
    if reducer.startswith("deepconf") and "window" not in params:
        params["window"] = trigger.window
    scores = [
        value
        for trace in traces
        for value in trace.aggregate(trigger.signal, reducer, **params).tolist()
    ]
    return trigger.calibrated(scores, percentile)


class TriggerState:
    """Step-by-step evaluation of a :class:`Trigger` for ``batch_size`` rows on ``device``.

    :meth:`update` takes the step's values ``[B]`` and a Python step index and returns
    a boolean tensor ``[B]``: whether the trigger fires for the row at this step.
    ``thresholds`` (``[B]``) gives each row its own threshold (DeepConf online
    calibrates one per prompt); otherwise every row uses ``trigger.threshold``.

    A decoding controller that forks or rewinds rows keeps the state in step with
    :meth:`select_rows` and :meth:`reset_rows`; each row's window counts the values it
    was fed since its last reset.
    """

    def __init__(
        self, trigger: Trigger, batch_size: int, device, thresholds: Sequence[float] | None = None
    ) -> None:
        if thresholds is not None:
            if len(thresholds) != batch_size:
                raise ValueError(f"thresholds: {len(thresholds)} for {batch_size} rows")
            self.threshold: torch.Tensor | float = torch.tensor(
                list(thresholds), dtype=torch.float32, device=device
            )
        elif trigger.threshold is None:
            raise ValueError(f"threshold: the trigger on {trigger.signal!r} is not calibrated")
        else:
            self.threshold = trigger.threshold
        self.trigger = trigger
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ring = torch.zeros(batch_size, trigger.window, device=device)
        #: The value compared with the threshold at the last update, ``[B]``.
        self.smoothed_value = torch.zeros(batch_size, device=device)

    def smoothed(self, values: torch.Tensor) -> torch.Tensor:
        """The value the threshold is compared with: the mean of the row's last
        ``window`` values (fewer right after the start or a reset)."""
        window = self.trigger.window
        if window == 1:
            return values.float()
        slot = (self.seen % window).unsqueeze(-1)
        self.ring = self.ring.scatter(-1, slot, values.float().unsqueeze(-1))
        return self.ring.sum(dim=-1) / (self.seen + 1).clamp(max=window)

    #: The per-row tensors that make up the state (all replaced, never mutated in place).
    ROW_FIELDS = ("count", "seen", "ring", "smoothed_value")

    def update(
        self, values: torch.Tensor, step: int | torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed the step's ``values``; ``active`` (``[B]`` bool) limits the update to
        those rows (the others keep their state and do not fire). ``step`` is the step
        index shared by all rows, or a ``[B]`` tensor of per-row step indices (rows of a
        continuous batch are at different steps)."""
        trig = self.trigger
        before = (self.count, self.seen, self.ring)
        value = self.smoothed(values)
        crossed = value > self.threshold if trig.direction == "above" else value < self.threshold
        self.count = torch.where(crossed, self.count + 1, 0)
        self.seen = self.seen + 1
        if active is not None:
            self.count = torch.where(active, self.count, before[0])
            self.seen = torch.where(active, self.seen, before[1])
            self.ring = torch.where(active.unsqueeze(-1), self.ring, before[2])
        self.smoothed_value = value
        fired = self.count >= trig.patience
        if active is not None:
            fired = fired & active
        if isinstance(step, torch.Tensor):
            fired = fired & (step + 1 >= trig.min_tokens)
        elif step + 1 < trig.min_tokens:
            fired = torch.zeros_like(fired)
        return fired

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """The current per-row state, for :meth:`restore_rows` (no copy: :meth:`update`
        replaces the tensors instead of writing into them)."""
        return tuple(getattr(self, name) for name in self.ROW_FIELDS)

    def restore_rows(self, rows: torch.Tensor, snapshot: tuple[torch.Tensor, ...]) -> None:
        """Put the rows where ``rows`` (``[B]`` bool) is true back to ``snapshot``: a step
        that is fed again (vLLM's chunked prefill) replaces its first feeding."""
        for name, saved in zip(self.ROW_FIELDS, snapshot, strict=True):
            current = getattr(self, name)
            mask = rows.view(-1, *([1] * (current.dim() - 1)))
            setattr(self, name, torch.where(mask, saved, current))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (``[B']``, repeats allowed), in that order."""
        for name in self.ROW_FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, index))
        if isinstance(self.threshold, torch.Tensor):
            self.threshold = self.threshold.index_select(0, index)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Start the rows where ``rows`` (``[B]`` bool) is true afresh."""
        self.count = self.count.masked_fill(rows, 0)
        self.seen = self.seen.masked_fill(rows, 0)
        self.ring = self.ring.masked_fill(rows.unsqueeze(-1), 0.0)
