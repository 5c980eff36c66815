"""Response-level scores of a trace, by name: ``"<output>:<reducer>"`` (a signal
output reduced over the response, :mod:`tokur_decode.core.aggregate`) or
:data:`LENGTH`, the response's length in tokens.

These names are what ``eval`` records per answer, what a probe reads and what a
calibrated abstention rule tests, so that a score measured in an experiment is the same
number when a recipe acts on it.

Example:
    >>> import torch
    >>> from tokur_decode.core.trace import Trace
    >>> t = Trace({"entropy": torch.tensor([[0.5, 1.5, 9.0]])}, torch.tensor([[1, 2, 0]]),
    ...           torch.tensor([2]))
    >>> response_scores(t, ["entropy:mean", "entropy:max", LENGTH])
    {'entropy:mean': tensor([1.]), 'entropy:max': tensor([1.5000]), 'response_length': tensor([2.])}
    >>> outputs_read(["entropy:mean", LENGTH, "chosen_logprob:sum"])
    ('entropy', 'chosen_logprob')
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import aggregate
from .trace import Trace

__all__ = ["LENGTH", "check_score_name", "outputs_read", "response_scores"]

#: The answer's length in tokens (longer = more uncertain): the trivial baseline. Sums
#: grow with length, so a sum that does not beat it detects length, not uncertainty.
LENGTH = "response_length"


def check_score_name(name: str) -> tuple[str, str] | None:
    """``(output, reducer)`` of a score name (``None`` for :data:`LENGTH`).

    Raises:
        ValueError: the name is neither ``"<output>:<reducer>"`` with a known reducer
            nor :data:`LENGTH`.
    """
    if name == LENGTH:
        return None
    output, sep, reducer = name.partition(":")
    if not sep or not output or reducer not in aggregate.REDUCERS:
        raise ValueError(
            f"score: {name!r} is not a response score ('<signal output>:<reducer>' with a "
            f"reducer in {sorted(aggregate.REDUCERS)}, or {LENGTH!r})"
        )
    return output, reducer


def outputs_read(names: Iterable[str]) -> tuple[str, ...]:
    """The signal outputs that the scores ``names`` reduce, in order, once each."""
    parts = (check_score_name(name) for name in names)
    return tuple(dict.fromkeys(part[0] for part in parts if part is not None))


def response_scores(trace: Trace, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Each score of ``names`` for every row of ``trace``: float tensors ``[B]`` on the
    trace's device.

    Raises:
        ValueError: a score reads an output the trace did not record.
    """
    out: dict[str, torch.Tensor] = {}
    for name in names:
        part = check_score_name(name)
        if part is None:
            out[name] = trace.lengths.to(torch.float32)
            continue
        output, reducer = part
        if output not in trace.signals:
            raise ValueError(
                f"score: {name!r} reads {output!r}, which was not recorded "
                f"(recorded: {sorted(trace.signals)})"
            )
        out[name] = trace.aggregate(output, reducer)
    return out
