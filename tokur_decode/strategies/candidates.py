"""Choosing among candidate responses, backend-neutral: best-of-N, branch selection and
DeepConf online, and how many tokens a branch point may fork into.

A backend (transformers, vLLM) decodes the candidates and hands their
:class:`~tokur_decode.core.trace.Trace` here; the scoring, the choice and the records in
``result.actions`` are the same whichever backend decoded them.

Example:
    >>> import torch
    >>> from tokur_decode.core.trace import Trace
    >>> trace = Trace(signals={"self_certainty": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
    ...               token_ids=torch.zeros(2, 2, dtype=torch.long), lengths=torch.tensor([2, 2]),
    ...               texts=["4", "5"])
    >>> from tokur_decode.strategies.actions import BestOfNConfig
    >>> params = BestOfNConfig(score="self_certainty")
    >>> chosen, records, _ = choose_candidates(trace, [[0, 1]], params, str.strip)
    >>> chosen, records[0].scores
    ([1], [1.5, 3.5])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from ..core import aggregate
from ..core.events import Choice, DeepConfOnlineEvent
from ..core.policy import Trigger
from ..core.select import choose
from ..core.trace import Trace
from .actions import DeepConfOnlineConfig, SelectionConfig

__all__ = [
    "deepconf_thresholds",
    "deepconf_trigger",
    "deepconf_vote",
    "fork_tokens",
    "choose_candidates",
]


def choose_candidates(
    trace: Trace,
    groups: Sequence[Sequence[int]],
    params: SelectionConfig,
    extract: Callable[[str], object],
    **reducer_params,
) -> tuple[list[int], list[Choice], list[Trace]]:
    """Per group of candidate rows of ``trace``, the row chosen by a recipe's selection
    (``params``; see :func:`tokur_decode.core.select.choose`); ``extract`` turns a text
    into the answer that votes.

    Returns ``(chosen rows, one :class:`~tokur_decode.core.events.Choice` per group,
    candidate traces per group)``.
    """
    raw = trace.aggregate(params.score, params.reducer, **reducer_params).tolist()
    scores = raw if params.higher_is_better else [-x for x in raw]
    answers = [extract(text) for text in trace.texts or []]
    chosen, records, candidates = [], [], []
    for rows in groups:
        rows = list(rows)
        pick = rows[
            choose(
                [answers[i] for i in rows],
                [scores[i] for i in rows],
                params.method,
                params.eta,
                eta_rule=params.eta_rule,
                borda_p=params.borda_p,
            )
        ]
        chosen.append(pick)
        candidates.append(trace.select(rows))
        records.append(
            Choice(
                chosen=rows.index(pick),
                score=params.score,
                reducer=params.reducer,
                higher_is_better=params.higher_is_better,
                method=params.method,
                eta=params.eta,
                eta_rule=params.eta_rule,
                scores=[raw[i] for i in rows],
                answers=[answers[i] for i in rows],
            )
        )
    return chosen, records, candidates


def fork_tokens(
    alternatives: Sequence[int],
    token_budget: int | None,
    *,
    spent: int,
    running: int,
    remaining: int,
) -> list[int]:
    """The ``alternatives`` (best first) a branch point forks into under a per-prompt
    ``token_budget``: as many as keep every row of the prompt within the budget if all
    of them, the new ones included, ran on for the ``remaining`` steps. ``spent``: the
    prompt's tokens decoded so far; ``running``: its rows still decoding (the forking
    row included). The first alternative (the row's own continuation) is always kept;
    fewer than two left means no fork. ``None``: no budget.

    Example:
        >>> fork_tokens([7, 3, 9, 4], 100, spent=20, running=1, remaining=20)
        [7, 3, 9, 4]
        >>> fork_tokens([7, 3, 9, 4], 60, spent=20, running=1, remaining=20)
        [7, 3]
    """
    if token_budget is None:
        return list(alternatives)
    affordable = (token_budget - spent) // remaining - running
    return list(alternatives[: 1 + max(affordable, 0)])


def deepconf_trigger(window: int) -> Trigger:
    """DeepConf online's stop trigger (threshold still unset): the mean confidence of the
    last ``window`` tokens below the threshold, not before ``window`` tokens.

    Example:
        >>> deepconf_trigger(16).calibrated([10.0, 12.0], 50).threshold
        11.0
    """
    return Trigger("deepconf", direction="below", window=window, min_tokens=window)


def deepconf_thresholds(warm: Trace, warmup: int, params: DeepConfOnlineConfig) -> list[float]:
    """One threshold per prompt from its ``warmup`` consecutive warm-up rows of ``warm``:
    the ``100 - keep`` percentile of their lowest group confidence (DeepConf online)."""
    window = params.window
    lowest = aggregate.reduce(
        "deepconf_lowest_group", warm.signals["deepconf"], warm.lengths, window=window
    ).tolist()
    base = deepconf_trigger(window)
    prompts = len(lowest) // warmup
    calibrated = [
        base.calibrated(lowest[b * warmup : (b + 1) * warmup], 100 - params.keep)
        for b in range(prompts)
    ]
    return [cast(float, t.threshold) for t in calibrated]  # calibrated: always set


def deepconf_vote(
    warm: Trace,
    later: Trace,
    stopped: Sequence[bool],
    thresholds: Sequence[float],
    params: DeepConfOnlineConfig,
    extract: Callable[[str], object],
    max_new_tokens: int,
) -> tuple[Trace, list[int], list[list[dict]], list[Trace]]:
    """DeepConf online's vote: per prompt, the warm-up rows and the later rows that were
    not ``stopped`` vote (:func:`choose_candidates`).

    ``warm`` holds ``warmup`` rows per prompt, ``later`` ``n - warmup`` rows per prompt
    (prompt-major). Returns ``(all rows, chosen rows, actions per prompt, candidates per
    prompt)``; each action reports the threshold, the stopped later rows, the tokens
    decoded for the prompt and ``tokens_saved``: what the stopped rows did not decode
    of their ``max_new_tokens`` budget (an upper bound: they might have ended sooner).
    """
    n, warmup, window = params.n, params.warmup, params.window
    online = n - warmup
    trace = Trace.concat([warm, later])
    lengths = trace.lengths.tolist()
    groups, actions = [], []
    for b, threshold in enumerate(thresholds):
        mine_warm = list(range(b * warmup, (b + 1) * warmup))
        mine_later = [len(warm) + b * online + j for j in range(online)]
        stops = [j for j in range(online) if stopped[b * online + j]]
        groups.append(mine_warm + [r for j, r in enumerate(mine_later) if j not in stops])
        actions.append(
            DeepConfOnlineEvent(
                n=n,
                warmup=warmup,
                threshold=threshold,
                window=window,
                stopped=stops,
                tokens=sum(lengths[r] for r in mine_warm + mine_later),
                tokens_saved=sum(max_new_tokens - lengths[mine_later[j]] for j in stops),
            )
        )
    chosen, records, candidates = choose_candidates(trace, groups, params, extract, window=window)
    for action, record, rows in zip(actions, records, groups, strict=True):
        action.choice, action.voters = record, len(rows)
    return trace, chosen, [[a.to_dict()] for a in actions], candidates
