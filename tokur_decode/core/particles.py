"""Particle filtering's weights: normalisation, effective sample size, systematic
resampling (docs/reference.md section 2, particle filtering).

``N`` particles (partial answers) of one prompt carry log-weights. After each reasoning
step a particle's log-weight moves by the change of its potential (its answer so far
scored, divided by a temperature: :mod:`tokur_decode.strategies.run`); when
the effective sample size ``ESS = 1 / sum(w_i^2)`` of the normalised weights falls
below ``ess_threshold * N``, the particles are resampled *systematically* (Kitagawa
1996): one uniform draw ``u`` places ``N`` evenly spaced points ``(u + j) / N`` on the
weights' cumulative sum, particle ``i`` is copied once per point in its interval, and
the weights return to uniform. Systematic resampling keeps ``floor(N w_i)`` or
``ceil(N w_i)`` copies of particle ``i`` (lower variance than multinomial draws).

Pure host-side functions of small arrays: they run once per step of the strategy, not
per token.

Example:
    >>> import numpy as np
    >>> w = normalized(np.log([0.5, 0.25, 0.25]))
    >>> w.tolist(), round(effective_sample_size(w), 4)
    ([0.5, 0.25, 0.25], 2.6667)
    >>> systematic_resample(w, u=0.5).tolist()     # points 1/6, 1/2, 5/6
    [0, 1, 2]
    >>> systematic_resample(normalized(np.log([0.8, 0.1, 0.1])), u=0.5).tolist()
    [0, 0, 1]
"""

from __future__ import annotations

import numpy as np

__all__ = ["effective_sample_size", "normalized", "systematic_resample"]


def normalized(log_weights) -> np.ndarray:
    """Weights summing to 1 from log-weights (float64; ``-inf`` gives weight 0; all
    ``-inf`` or any NaN/``+inf``: uniform, so a broken reward never empties the
    population)."""
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 1 or lw.size == 0:
        raise ValueError(f"log_weights: expected a non-empty 1-d array, got shape {lw.shape}")
    if np.isnan(lw).any() or np.isposinf(lw).any() or np.isneginf(lw).all():
        return np.full(lw.size, 1.0 / lw.size)
    w = np.exp(lw - lw.max())
    return w / w.sum()


def effective_sample_size(weights) -> float:
    """``1 / sum(w_i^2)`` of normalised ``weights``: ``N`` when uniform, 1 when one
    particle holds all the weight."""
    w = np.asarray(weights, dtype=np.float64)
    return float(1.0 / np.square(w).sum())


def systematic_resample(weights, u: float) -> np.ndarray:
    """Indices of the particles kept, in order, one per point ``(u + j) / N``
    (``u`` in ``[0, 1)``, one uniform draw).

    Raises:
        ValueError: ``u`` outside ``[0, 1)``.
    """
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u: must be in [0, 1), got {u}")
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    edges = np.cumsum(w)
    edges[-1] = 1.0  # rounding must not leave the last point outside
    points = (u + np.arange(n)) / n
    return np.searchsorted(edges, points, side="right").clip(0, n - 1)
