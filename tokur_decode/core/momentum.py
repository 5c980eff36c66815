"""MUR's gate on reasoning steps: the momentum of an answer's step scores, and whether
a new step falls below it (docs/reference.md section 2, uncertainty-gated steps).

An answer's step scores ``c_1, c_2, ...`` (higher is better: MUR's is a step's mean
token log-probability) have the momentum ``M_t = a M_{t-1} + (1 - a) c_t``, ``M_0 = 0``.
MUR (Yan et al. 2025) redraws step ``t > 1`` when ``exp(c_t) < g exp(M_{t-1})``, i.e.
``c_t < M_{t-1} + ln g`` (``g``: the scaling rate, 0.8 in MUR's code). Read against
``M_0 = 0``, the first steps of a log-probability score (always below 0) look worse
than the later ones; here the momentum is divided by the weights' sum ``1 - a^t``
(as Adam corrects its moving averages), so ``mean`` is a weighted mean of the past
steps' scores from the first step on.

Pure host-side functions of small arrays: they run once per step of the strategy.

Example:
    >>> import numpy as np
    >>> m = StepMomentum(rows=2, momentum=0.5, scaling_rate=0.8)
    >>> m.falls_below(np.array([-1.0, -0.2])).tolist()          # no past step: never
    [False, False]
    >>> m.update(np.array([-0.2, -0.2]), np.array([True, True]))
    >>> m.mean.tolist()
    [-0.2, -0.2]
    >>> m.falls_below(np.array([-1.0, -0.3])).tolist()          # ln 0.8 = -0.223
    [True, False]
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["StepMomentum", "check_gate"]


def check_gate(momentum: float, scaling_rate: float, prefix: str = "") -> None:
    """Raise ``ValueError`` naming ``prefix + "momentum"`` unless it is in ``[0, 1)``,
    or ``prefix + "scaling_rate"`` unless it is in ``(0, 1]``."""
    if not 0 <= momentum < 1:
        raise ValueError(f"{prefix}momentum: in [0, 1), got {momentum}")
    if not 0 < scaling_rate <= 1:
        raise ValueError(f"{prefix}scaling_rate: in (0, 1], got {scaling_rate}")


class StepMomentum:
    """The momentum of ``rows`` answers' step scores (weight ``momentum`` on the past,
    in ``[0, 1)``) and MUR's test against it (``scaling_rate`` in ``(0, 1]``)."""

    def __init__(self, rows: int, momentum: float, scaling_rate: float) -> None:
        check_gate(momentum, scaling_rate)
        self.momentum, self.margin = momentum, -math.log(scaling_rate)
        self._average = np.zeros(rows)
        self.steps = np.zeros(rows, dtype=np.int64)

    @property
    def mean(self) -> np.ndarray:
        """The bias-corrected momentum (``nan`` for an answer without a step yet)."""
        weight = 1.0 - self.momentum ** self.steps.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.steps > 0, self._average / weight, np.nan)

    def falls_below(self, scores: np.ndarray) -> np.ndarray:
        """Whether each new step's score is more than ``-ln(scaling_rate)`` below the
        momentum of the answer's earlier steps (never for a first step)."""
        with np.errstate(invalid="ignore"):
            return (self.steps > 0) & (np.asarray(scores) < self.mean - self.margin)

    def update(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Take the kept steps' ``scores`` into the momentum of the answers ``rows``
        (bool) says."""
        a = self.momentum
        blended = a * self._average + (1 - a) * np.asarray(scores, dtype=np.float64)
        self._average = np.where(rows, blended, self._average)
        self.steps = self.steps + np.asarray(rows, dtype=np.int64)
