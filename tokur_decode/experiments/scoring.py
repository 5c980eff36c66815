"""Response-level scores of generated answers, and which way each one points.

Every recorded signal output is reduced by every reducer of
:data:`tokur_decode.core.aggregate.REDUCERS` into a score named ``"<output>:<reducer>"``
(``"entropy:mean"``, ``"tokur_epistemic:sum"``); ``naive`` and ``vanilla`` read
probabilities, so they are computed for ``max_prob`` and ``chosen_prob`` only.
Scores a backend adds outside the trace (``Generation.extra``, e.g.
``"verbalized_confidence"``) have no colon and are confidences by contract; the
exceptions are :data:`LENGTH`, the answer's length, and ``"probe"``, a probe's
probability of a wrong answer (:mod:`tokur_decode.core.probe`), both uncertainties.

:func:`uncertainty` orients any score so that higher means "more likely wrong":
confidence outputs (:data:`tokur_decode.core.signals.CONFIDENCE_KEYS`) and extra scores are
negated; ``naive``/``vanilla`` are uncertainties whatever they read.

Example:
    >>> import torch
    >>> from tokur_decode.core.trace import Trace
    >>> t = Trace({"entropy": torch.tensor([[0.5, 1.5]])}, torch.tensor([[1, 2]]),
    ...           torch.tensor([2]))
    >>> trace_scores(t)[0]["entropy:mean"]
    1.0
    >>> uncertainty("chosen_logprob:mean", -0.2), uncertainty("max_prob:naive", 0.3)
    (0.2, 0.3)
"""

from __future__ import annotations

import torch

from ..core import aggregate
from ..core.probe import PROBE
from ..core.scores import LENGTH
from ..core.signals import CONFIDENCE_KEYS, OUTPUTS
from ..core.trace import Trace

__all__ = [
    "BASELINE",
    "LENGTH",
    "PROBABILITY_SCORES",
    "headline_scores",
    "is_confidence",
    "trace_scores",
    "uncertainty",
]

#: The baseline every signal is compared with: mean log-probability of the emitted tokens.
BASELINE = "chosen_logprob:mean"

#: Extra scores that are probabilities of being right (calibration error is reported).
PROBABILITY_SCORES = frozenset(
    {"verbalized_confidence", "verbalized_expected", "verbalized_combined", "answer_geomean_prob"}
)

_PROBABILITY_OUTPUTS = frozenset({"max_prob", "chosen_prob"})
_UNCERTAINTY_REDUCERS = frozenset({"naive", "vanilla"})

#: Each output's reducer in the headline table (the one its paper uses); others: mean.
HEADLINE_REDUCER = {key: o.headline for key, o in OUTPUTS.items() if o.headline != "mean"}


def trace_scores(trace: Trace) -> list[dict[str, float]]:
    """Every ``"<output>:<reducer>"`` score of every row of ``trace``."""
    columns: dict[str, torch.Tensor] = {}
    for key in trace.signals:
        for name in aggregate.REDUCERS:
            if name in _UNCERTAINTY_REDUCERS and key not in _PROBABILITY_OUTPUTS:
                continue
            if name in aggregate.STEP_REDUCERS and trace.tokens is None:
                continue
            columns[f"{key}:{name}"] = trace.aggregate(key, name)
    table = {k: v.detach().cpu().tolist() for k, v in columns.items()}
    return [{k: float(v[i]) for k, v in table.items()} for i in range(len(trace))]


def is_confidence(name: str) -> bool:
    """Whether a larger value of score ``name`` means more confident."""
    if name in (LENGTH, PROBE):
        return False
    if ":" not in name:
        return True
    key, reducer = name.split(":", 1)
    return reducer not in _UNCERTAINTY_REDUCERS and key in CONFIDENCE_KEYS


def uncertainty(name: str, value: float) -> float:
    """``value`` of score ``name`` oriented as an uncertainty (higher = more likely wrong)."""
    return -value if is_confidence(name) else value


def headline_scores(names) -> list[str]:
    """One score per recorded output (its :data:`HEADLINE_REDUCER`, else the mean), the
    baselines first, then the extra scores.

    Example:
        >>> headline_scores(["entropy:mean", "entropy:max", "chosen_logprob:mean",
        ...                  "response_length", "verbalized_confidence"])
        ['chosen_logprob:mean', 'response_length', 'entropy:mean', 'verbalized_confidence']
    """
    names = list(names)
    keys = list(dict.fromkeys(n.split(":", 1)[0] for n in names if ":" in n))
    out = [b for b in (BASELINE, LENGTH) if b in names]
    for key in keys:
        name = f"{key}:{HEADLINE_REDUCER.get(key, 'mean')}"
        if name in names and name not in out:
            out.append(name)
    return out + [n for n in names if ":" not in n and n not in out]
