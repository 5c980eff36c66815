"""Response-level reducers over a trace of token-level values (docs/reference.md 1.3).

Every reducer takes ``values`` ``[B, T]`` (one row per response, right-padded) and
``lengths`` ``[B]`` (the number of valid tokens of each row; ``None`` means all ``T``)
and returns float32 ``[B]`` on the same device. Padding beyond a row's length is
ignored whatever it holds (NaN included).

The step reducers (:data:`STEP_REDUCERS`) also take ``step_of``, each token's reasoning
step (:mod:`tokur_decode.core.steps`), and reduce the per-step means: the worst step
(``step_mean_max`` of an uncertainty, ``step_mean_min`` of a confidence) or the last.

Empty responses (length 0) never crash and never yield NaN:

* ``sum`` is 0 (empty sum); ``naive`` and ``vanilla`` are 0 (empty product 1, and
  ``vanilla`` follows ``naive``);
* every other reducer returns ``empty`` (default ``0.0``), a keyword of each reducer.

Example:
    >>> import torch
    >>> from tokur_decode.core import aggregate
    >>> v = torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.0, 0.0]])
    >>> aggregate.mean(v, torch.tensor([2, 1]))
    tensor([0.7000, 0.2000])
    >>> aggregate.topk_mean(v, torch.tensor([2, 0]), k=10)
    tensor([0.7000, 0.0000])
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable

import torch

__all__ = [
    "REDUCERS",
    "STEP_REDUCERS",
    "deepconf_bottom_groups",
    "deepconf_lowest_group",
    "deepconf_tail",
    "group_confidences",
    "head_mean",
    "max",
    "mean",
    "min",
    "naive",
    "reduce",
    "step_means",
    "step_mean_last",
    "step_mean_max",
    "step_mean_min",
    "sum",
    "tail_mean",
    "topk_mean",
    "vanilla",
]

Reducer = Callable[..., torch.Tensor]


def _prepare(values: torch.Tensor, lengths: torch.Tensor | None):
    """float64 values, int64 lengths, and the validity mask.

    Raises:
        ValueError: a shape other than ``[B, T]``, or a length outside ``[0, T]`` (a
            response-level reduction, not per step: one read of the lengths is fine).
    """
    if values.dim() != 2:
        raise ValueError(f"values: expected shape [B, T], got {tuple(values.shape)}")
    b, t = values.shape
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=values.device)
    lengths = torch.as_tensor(lengths, device=values.device).long()
    if lengths.shape != (b,):
        raise ValueError(f"lengths: one per row ({b}), got shape {tuple(lengths.shape)}")
    if b and bool(((lengths < 0) | (lengths > t)).any()):
        raise ValueError(f"lengths: each from 0 to T = {t}, got {lengths.tolist()}")
    if t == 0:  # no step at all: one padding column keeps reductions defined
        values = values.new_zeros(b, 1)
        t = 1
    mask = torch.arange(t, device=values.device) < lengths.unsqueeze(-1)
    v = values.to(torch.float64)
    return torch.where(mask, v, 0.0), lengths, mask


def _finish(x: torch.Tensor, lengths: torch.Tensor, empty: float) -> torch.Tensor:
    return torch.where(lengths > 0, x, empty).to(torch.float32) + 0.0


def sum(values: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A001
    """Sum over each response (TokUR's detection aggregate); 0 when empty."""
    v, _, _ = _prepare(values, lengths)
    return v.sum(dim=-1).to(torch.float32)


def mean(values: torch.Tensor, lengths: torch.Tensor | None = None, *, empty: float = 0.0):
    """Mean over each response."""
    v, n, _ = _prepare(values, lengths)
    return _finish(v.sum(dim=-1) / n.clamp_min(1), n, empty)


def max(values: torch.Tensor, lengths: torch.Tensor | None = None, *, empty: float = 0.0):  # noqa: A001
    """Largest value of each response."""
    v, n, mask = _prepare(values, lengths)
    return _finish(torch.where(mask, v, -math.inf).amax(dim=-1), n, empty)


def min(values: torch.Tensor, lengths: torch.Tensor | None = None, *, empty: float = 0.0):  # noqa: A001
    """Smallest value of each response."""
    v, n, mask = _prepare(values, lengths)
    return _finish(torch.where(mask, v, math.inf).amin(dim=-1), n, empty)


def _sorted_prefix_mean(
    v: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, largest: bool
) -> torch.Tensor:
    """Mean of the ``count`` largest (or smallest) valid entries of each row."""
    fill = -math.inf if largest else math.inf
    ordered = torch.where(mask, v, fill).sort(dim=-1, descending=largest).values
    take = torch.arange(v.shape[-1], device=v.device) < count.unsqueeze(-1)
    return torch.where(take, ordered, 0.0).sum(dim=-1) / count.clamp_min(1)


def topk_mean(
    values: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    k: int = 25,
    largest: bool = True,
    empty: float = 0.0,
) -> torch.Tensor:
    """Mean of the ``k`` largest values (``largest=False``: smallest), ``k_eff = min(k, n)``.

    LogTokU's response score is ``topk_mean(unreliability, k=25)`` (authors; the seed
    notebook uses 10).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    v, n, mask = _prepare(values, lengths)
    return _finish(_sorted_prefix_mean(v, mask, n.clamp_max(k), largest), n, empty)


def _edge_mean(values, lengths, frac: float, empty: float, from_end: bool) -> torch.Tensor:
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    v, n, mask = _prepare(values, lengths)
    count = torch.ceil(n.to(torch.float64) * frac).long().clamp_min(1)
    pos = torch.arange(v.shape[-1], device=v.device).expand_as(v)
    take = (pos >= (n - count).unsqueeze(-1)) if from_end else (pos < count.unsqueeze(-1))
    take = take & mask
    return _finish(torch.where(take, v, 0.0).sum(dim=-1) / count, n, empty)


def head_mean(values, lengths=None, *, frac: float = 0.1, empty: float = 0.0) -> torch.Tensor:
    """Mean over the first ``ceil(frac * n)`` tokens (at least one)."""
    return _edge_mean(values, lengths, frac, empty, from_end=False)


def tail_mean(values, lengths=None, *, frac: float = 0.1, empty: float = 0.0) -> torch.Tensor:
    """Mean over the last ``ceil(frac * n)`` tokens (at least one)."""
    return _edge_mean(values, lengths, frac, empty, from_end=True)


def naive(max_prob: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Naive uncertainty ``1 - prod_j max_prob_j`` (seed notebook), computed in log space.

    Example:
        >>> import torch
        >>> naive(torch.tensor([[0.5, 0.5]]))
        tensor([0.7500])
    """
    v, _, mask = _prepare(max_prob, lengths)
    log_prod = torch.where(mask, torch.log(v.clamp_min(1e-300)), 0.0).sum(dim=-1)
    return (-torch.expm1(log_prod)).to(torch.float32) + 0.0


def vanilla(max_prob: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Vanilla uncertainty ``1 - mean_j max_prob_j`` (seed notebook); 0 when empty."""
    return 1.0 - mean(max_prob, lengths, empty=1.0)


# --------------------------------------------------------------------------- DeepConf


def group_confidences(
    values: torch.Tensor, lengths: torch.Tensor | None = None, *, window: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepConf group confidences: means over sliding windows of ``window`` tokens.

    Returns ``(groups [B, G], group_lengths [B])`` with ``G = max(T - window + 1, 1)``.
    Row ``b`` has ``max(n_b - window + 1, 1)`` valid groups; a response shorter than the
    window has a single group, its plain mean (an empty one: ``group_lengths = 0``).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    v, n, _ = _prepare(values, lengths)
    b, t = v.shape
    csum = torch.nn.functional.pad(v.cumsum(dim=-1), (1, 0))  # [B, T+1]
    g = builtins.max(t - window + 1, 1)  # this module shadows max()
    if t >= window:
        groups = (csum[:, window:] - csum[:, :g]) / window
    else:
        groups = v.new_zeros(b, 1)
    short = n < window
    plain_mean = v.sum(dim=-1) / n.clamp_min(1)
    groups = torch.where(
        short.unsqueeze(-1) & (torch.arange(g, device=v.device) == 0),
        plain_mean.unsqueeze(-1),
        groups,
    )
    group_lengths = torch.where(short, (n > 0).long(), n - window + 1)
    return groups, group_lengths


def deepconf_lowest_group(values, lengths=None, *, window: int = 2048, empty: float = 0.0):
    """Lowest group confidence (DeepConf's online stopping statistic)."""
    groups, gl = group_confidences(values, lengths, window=window)
    return min(groups, gl, empty=empty)


def deepconf_bottom_groups(
    values,
    lengths=None,
    *,
    window: int = 2048,
    frac: float = 0.1,
    rule: str = "deepconf",
    empty: float = 0.0,
):
    """Mean of the lowest group confidences (DeepConf's bottom-10% confidence): of
    ``G`` groups, ``max(1, int(frac * G))`` as DeepConf's code keeps them (``rule =
    "deepconf"``), or ``max(1, ceil(frac * G))`` (``"ceil"``)."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    if rule not in ("deepconf", "ceil"):
        raise ValueError(f"rule: 'deepconf' or 'ceil', got {rule!r}")
    groups, gl = group_confidences(values, lengths, window=window)
    g, _, mask = _prepare(groups, gl)
    scaled = gl.to(torch.float64) * frac
    count = (torch.ceil(scaled) if rule == "ceil" else torch.floor(scaled)).long().clamp_min(1)
    return _finish(_sorted_prefix_mean(g, mask, count, largest=False), gl, empty)


def deepconf_tail(values, lengths=None, *, window: int = 2048, empty: float = 0.0):
    """Mean over the last ``window`` tokens (the whole response when shorter)."""
    v, n, mask = _prepare(values, lengths)
    pos = torch.arange(v.shape[-1], device=v.device)
    take = mask & (pos >= (n - window).unsqueeze(-1))
    return _finish(torch.where(take, v, 0.0).sum(dim=-1) / n.clamp(1, window), n, empty)


# --------------------------------------------------------------------------- steps


def step_means(
    values: torch.Tensor, lengths: torch.Tensor | None, step_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step means ``[B, S]`` (float64) and each row's number of steps ``[B]``:
    ``step_of[b, t]`` is token ``t``'s step (:func:`tokur_decode.core.steps.step_index`),
    non-decreasing along a row.

    Example:
        >>> import torch
        >>> means, n = step_means(torch.tensor([[1.0, 3.0, 5.0]]), None,
        ...                       torch.tensor([[0, 0, 1]]))
        >>> means.tolist(), n.tolist()
        ([[2.0, 5.0]], [2])
    """
    v, n, mask = _prepare(values, lengths)
    index = torch.as_tensor(step_of, device=v.device).long()
    if index.shape != v.shape:  # _prepare may have padded an empty trace
        index = torch.zeros_like(v, dtype=torch.long)
    index = torch.where(mask, index, 0)
    width = int(index.max()) + 1 if index.numel() else 1
    sums = v.new_zeros(v.shape[0], width).scatter_add(1, index, v)
    counts = v.new_zeros(v.shape[0], width).scatter_add(1, index, mask.to(v.dtype))
    steps = torch.where(n > 0, torch.where(mask, index, 0).amax(dim=-1) + 1, 0)
    return sums / counts.clamp_min(1), steps


def _over_steps(values, lengths, step_of, empty, pick) -> torch.Tensor:
    means, steps = step_means(values, lengths, step_of)
    valid = torch.arange(means.shape[1], device=means.device) < steps.unsqueeze(-1)
    return _finish(pick(means, valid, steps), steps, empty)


def step_mean_max(values, lengths=None, *, step_of, empty: float = 0.0) -> torch.Tensor:
    """The largest step mean (the worst step of an uncertainty)."""
    return _over_steps(
        values, lengths, step_of, empty, lambda m, ok, _: torch.where(ok, m, -math.inf).amax(-1)
    )


def step_mean_min(values, lengths=None, *, step_of, empty: float = 0.0) -> torch.Tensor:
    """The smallest step mean (the worst step of a confidence)."""
    return _over_steps(
        values, lengths, step_of, empty, lambda m, ok, _: torch.where(ok, m, math.inf).amin(-1)
    )


def step_mean_last(values, lengths=None, *, step_of, empty: float = 0.0) -> torch.Tensor:
    """The last step's mean."""
    return _over_steps(
        values,
        lengths,
        step_of,
        empty,
        lambda m, _, s: m.gather(1, (s - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1),
    )


# --------------------------------------------------------------------------- by name

#: Reducers by name, for strategies and the experiment runners.
REDUCERS: dict[str, Reducer] = {
    "mean": mean,
    "sum": sum,
    "max": max,
    "min": min,
    "topk_mean": topk_mean,
    "head_mean": head_mean,
    "tail_mean": tail_mean,
    "naive": naive,
    "vanilla": vanilla,
    "deepconf_lowest_group": deepconf_lowest_group,
    "deepconf_bottom_groups": deepconf_bottom_groups,
    "deepconf_tail": deepconf_tail,
    "step_mean_max": step_mean_max,
    "step_mean_min": step_mean_min,
    "step_mean_last": step_mean_last,
}
#: Reducers over the steps of an answer: they take ``step_of`` (supplied by
#: :meth:`tokur_decode.core.trace.Trace.aggregate` from the trace's token texts).
STEP_REDUCERS = ("step_mean_max", "step_mean_min", "step_mean_last")


def reduce(
    name: str, values: torch.Tensor, lengths: torch.Tensor | None = None, **params
) -> torch.Tensor:
    """Apply the reducer called ``name`` (a key of :data:`REDUCERS`).

    Example:
        >>> import torch
        >>> reduce("topk_mean", torch.tensor([[3.0, 1.0, 2.0]]), k=2)
        tensor([2.5000])
    """
    if name not in REDUCERS:
        raise ValueError(f"reducer: unknown {name!r}; choose from {sorted(REDUCERS)}")
    return REDUCERS[name](values, lengths, **params)
